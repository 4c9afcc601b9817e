"""The arguments of a generation, typed once for both front doors.

JSON-RPC `generate` takes these as its parameters (their annotations are its validation
and its `rpc_methods` description); the gRPC server converts each `GenerateRequest` and
`ForwardRequest` into `GenerateInput` / `ForwardInput` through the same `params.convert`.
So a value is refused by both or by neither, with the same message.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from msgspec import Meta

from daemon.errors import InvalidParams

DEFAULT_MAX_TOKENS = 32
MAX_NEW_TOKENS = 4096
MAX_PROMPT_CHARS = 1 << 20
MAX_PROMPT_TOKENS = 32768
MAX_FORWARD_TOKENS = 4096
MAX_MODEL_CHARS = 256
MAX_TEMPERATURE = 10.0
MAX_CLIENT_ID_CHARS = 64
MAX_JOB_ID_CHARS = 64

TokenId = Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]
Model = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_MODEL_CHARS,
        description="model id the shards were deployed under",
    ),
]
Prompt = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_PROMPT_CHARS,
        description="text (needs a local shard for the tokenizer)",
    ),
]
PromptTokens = Annotated[
    list[TokenId],
    Meta(min_length=1, max_length=MAX_PROMPT_TOKENS, description="token ids instead of a prompt"),
]
ForwardTokens = Annotated[
    list[TokenId], Meta(min_length=1, max_length=MAX_FORWARD_TOKENS, description="token ids")
]
MaxTokens = Annotated[
    int, Meta(ge=1, le=MAX_NEW_TOKENS, description=f"new tokens, default {DEFAULT_MAX_TOKENS}")
]
Temperature = Annotated[float, Meta(ge=0, le=MAX_TEMPERATURE, description="0 (default) is greedy")]
# int64; gRPC's uint64 seeds arrive as their two's complement (`int64_seed`), which seeds
# torch's generator exactly as the unsigned value does
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1, description="sampling seed")]
PaidJobId = Annotated[
    str,
    Meta(
        pattern=r"^(0x)?[0-9a-fA-F]{64}$",
        description="run as this paid job (its id, 64 hex digits, from `job_create` on this "
        "node): providers attach signed receipts, this node checks and acknowledges them",
    ),
]


def paid_job_id(job_id: str | None) -> dict[str, bytes]:
    """`service.generate`'s keyword for a paid job: {} for free work (called as before)."""
    return {"job_id": bytes.fromhex(job_id.removeprefix("0x"))} if job_id else {}


def int64_seed(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


ClientId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_CLIENT_ID_CHARS,
        description="an id for this client: running generations are capped per id "
        "(default: per connection)",
    ),
]
JobId = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=MAX_JOB_ID_CHARS,
        description="job id from generate with stream=true",
    ),
]


def one_prompt(prompt: str | None, token_ids: list[int] | None) -> None:
    """Exactly one of the two prompt forms, or `InvalidParams`."""
    if (prompt is None) == (token_ids is None):
        raise InvalidParams("give a prompt: exactly one of prompt (text) or token_ids")


class GenerateInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """A generation as the gRPC `Generate` call asks for it."""

    model: Model
    prompt: Prompt | None = None
    token_ids: PromptTokens | None = None
    max_tokens: MaxTokens = DEFAULT_MAX_TOKENS
    temperature: Temperature = 0.0
    seed: Seed | None = None
    job_id: PaidJobId | None = None


class ForwardInput(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    """One step through the chain, as the gRPC `Forward` call asks for it."""

    model: Model
    token_ids: ForwardTokens
