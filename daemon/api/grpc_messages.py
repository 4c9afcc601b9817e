"""gRPC inference messages in and out: requests validated into the typed inputs that
JSON-RPC `generate` validates against too (`daemon.api.generation`), replies built from a
job's state.
"""

from __future__ import annotations

import array
import sys
from collections.abc import Sequence
from typing import Any

from daemon.api import params
from daemon.api.generation import ForwardInput, GenerateInput, int64_seed, one_prompt
from daemon.api.proto import gridmesh_inference_pb2 as pb2


def generate_input(request: pb2.GenerateRequest) -> GenerateInput:
    """The request as a checked `GenerateInput`; `InvalidParams` naming what is wrong."""
    which = request.WhichOneof("prompt")
    values: dict[str, Any] = {"model": request.model, "temperature": request.temperature}
    if which == "text":
        values["prompt"] = request.text
    elif which == "token_ids":
        values["token_ids"] = list(request.token_ids.ids)
    if request.HasField("max_tokens"):
        values["max_tokens"] = request.max_tokens
    if request.HasField("seed"):
        values["seed"] = int64_seed(request.seed)
    if request.HasField("job_id"):
        values["job_id"] = request.job_id
    checked = params.convert(GenerateInput, values)
    one_prompt(checked.prompt, checked.token_ids)
    return checked


def forward_input(request: pb2.ForwardRequest) -> ForwardInput:
    """The request as a checked `ForwardInput`; `InvalidParams` naming what is wrong."""
    return params.convert(
        ForwardInput, {"model": request.model, "token_ids": list(request.token_ids)}
    )


def text_delta(emitted: str, text: str, *, final: bool) -> tuple[str, str]:
    """(new text since `emitted`, what has been emitted after it).

    A trailing U+FFFD is held back until the end: it is usually a character whose bytes are
    still arriving. If the tokenizer rewrote earlier text, nothing more is emitted; the final
    reply's `text` is authoritative.
    """
    if not final:
        text = text.rstrip("\ufffd")
    if not text.startswith(emitted):
        return "", emitted
    return text[len(emitted) :], text


def pack_floats(values: Sequence[float]) -> bytes:
    """Little-endian float32s, as `ForwardReply.logits` carries them."""
    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


def final_reply(state: dict[str, Any], n_tokens: int, emitted: str, text: str) -> Any:
    """The last `GenerateReply` of a finished generation: its text, route and counts."""
    delta, _ = text_delta(emitted, text, final=True)
    recoveries = state.get("recoveries") or 0
    route = [
        pb2.Hop(peer_id=str(h.get("peer_id", "")), start=int(h["start"]), end=int(h["end"]))
        for h in state.get("route") or ()
    ]
    return pb2.GenerateReply(
        index=n_tokens,
        text_delta=delta,
        done=True,
        text=text,
        route=route,
        recoveries=len(recoveries) if isinstance(recoveries, list) else int(recoveries),
        n_tokens=int(state.get("n_tokens") or n_tokens),
        seconds=float(state.get("seconds") or 0.0),
    )
