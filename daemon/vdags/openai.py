"""The OpenAI-compatible endpoint's `model` naming a vDAG (a vDAG whose output is text).

The endpoint (daemon.api.openai_http) asks `VdagCompletions.answer` first: a `model` that is
a model served here stays the engine's; one that names a stored vDAG is run by the daemon's
VdagService and answered as one chat completion (or completion) choice whose text is the
vDAG's output. Input: the last user message's text (chat) or the prompt (completions).
Output: a string, or a map with a string `text` (what a model node gives). The API key is
the quota's `apikey:` key. Refused in OpenAI's shape: `stream` and `n` > 1 (400), an output
that is not text (502), and every vDAG failure with its kind's HTTP status (a failed node
503 naming it, over quota 429). Usage counts are 0: a vDAG's tokens are its nodes'.
"""

from __future__ import annotations

import secrets
import time
from typing import Any

import msgspec

from daemon.api.httpio import Response
from daemon.errors import GridmeshError, NotFound, status_of
from daemon.serving import openai_wire as wire
from daemon.vdags.values import DEFAULT_DEADLINE_S

JSON = b"application/json"


class VdagCompletions:
    def __init__(self, resolve: Any, service: Any) -> None:
        self.resolve = resolve  # (name) -> (spec, plan); NotFound when no such vDAG
        self.service = service

    async def answer(
        self, request: Any, chat: bool, served: Any, api_key: str | None
    ) -> Response | None:
        """The answer when `request.model` names a vDAG (not a model in `served`), else None."""
        model = request.model
        if model in served:
            return None
        try:
            spec, plan = self.resolve(model)
        except NotFound:
            return None
        except GridmeshError as exc:
            raise _openai_error(exc) from None
        if request.stream:
            raise wire.bad_param("stream", "a vDAG answers whole: stream is not supported")
        if getattr(request, "n", 1) not in (None, 1):
            raise wire.bad_param("n", "a vDAG gives one choice")
        if chat:
            users = [m for m in request.messages if m.role == "user"]
            value: Any = users[-1].text() if users else request.messages[-1].text()
        else:
            value = request.prompt
        try:
            result = await self.service.infer(
                plan,
                spec.controller,
                value,
                deadline_s=DEFAULT_DEADLINE_S,
                api_key=api_key,
            )
        except GridmeshError as exc:
            raise _openai_error(exc) from None
        output = result["output"]
        text = output.get("text") if isinstance(output, dict) else output
        if not isinstance(text, str):
            raise wire.OpenAIError(
                502, f"vDAG {spec.uri} gave {type(output).__name__}, not text", code="not_text"
            )
        now = int(time.time())
        usage = wire.Usage(0, 0, 0)
        if chat:
            choice = wire.ChatChoice(0, wire.ChatMessage("assistant", text), None, "stop")
            doc: Any = wire.ChatCompletion(_id("chatcmpl"), now, model, [choice], usage)
        else:
            completion = wire.CompletionChoice(0, text, None, "stop")
            doc = wire.Completion(_id("cmpl"), now, model, [completion], usage)
        return Response(200, msgspec.json.encode(doc), JSON)


def _openai_error(exc: GridmeshError) -> wire.OpenAIError:
    status = status_of(exc).http
    return wire.OpenAIError(status, exc.message, code=exc.code)


def _id(prefix: str) -> str:
    return f"{prefix}-vdag-{secrets.token_hex(12)}"
