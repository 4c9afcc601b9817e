"""The OpenAI wire format: request Structs with bounds, response Structs, and OpenAI's error
shape (`{"error": {"message", "type", "param", "code"}}`) with its HTTP status.

Unknown fields. A field OpenAI does not document is refused (400 naming it). A documented
field we do not implement is ignored only when ignoring it cannot change the answer a client
relies on: `user`, `metadata`, `store`, `service_tier`, `parallel_tool_calls` (there are no
tools), `reasoning_effort`, `stream_options.include_obfuscation`, `modalities: ["text"]`,
`response_format: {"type": "text"}`, `tool_choice: "none"/"auto"` without tools. One that
would (tools, functions, audio, prediction, JSON response formats, `echo`, `suffix`,
`best_of` other than `n`, image parts, several prompts in one completion) is refused with a 400
naming it. vLLM's extensions `top_k`, `min_p` and `repetition_penalty` are accepted.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

MAX_BODY = 4 << 20  # bytes of one request body (413 past it)
MAX_N = 8  # choices per request: each is one generation (MAX_JOBS_PER_REQUESTER of the shards)
MAX_MESSAGES = 1024
MAX_STOPS = 4
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # as OpenAI (and daemon.serving.sampling)
MAX_TOP_LOGPROBS = 20
MAX_COMPLETION_LOGPROBS = 5
MAX_PROMPT_IDS = 1 << 17
MAX_TOKENS = 1 << 20  # the hard bound; the model's context bounds it further

Name = Annotated[str, Meta(min_length=1, max_length=256)]
Temperature = Annotated[float, Meta(ge=0.0, le=2.0)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
Probability = Annotated[float, Meta(ge=0.0, le=1.0)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]  # OpenAI: negative ones encourage repeats
RepetitionPenalty = Annotated[float, Meta(gt=0.0, le=10.0)]  # vLLM's: > 0
TopK = Annotated[int, Meta(ge=-1, le=1 << 20)]  # -1 or 0: off (vLLM uses -1)
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]
Tokens = Annotated[int, Meta(ge=1, le=MAX_TOKENS)]
N = Annotated[int, Meta(ge=1, le=MAX_N)]
Stop = (
    str
    | Annotated[list[Annotated[str, Meta(max_length=MAX_STOP_CHARS)]], Meta(max_length=MAX_STOPS)]
)
LogitBias = Annotated[
    dict[str, Annotated[float, Meta(ge=-100.0, le=100.0)]], Meta(max_length=MAX_LOGIT_BIAS)
]


class OpenAIError(Exception):
    """An error as OpenAI sends it, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str | None = None,  # noqa: A002 - OpenAI's name
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type or _TYPES.get(
            status, "server_error" if status >= 500 else "invalid_request_error"
        )
        self.param = param
        self.code = code

    def body(self) -> bytes:
        doc = {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }
        return msgspec.json.encode(doc)


_TYPES = {
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "rate_limit_error",
}


def bad_param(param: str, message: str, code: str | None = None) -> OpenAIError:
    return OpenAIError(400, message, param=param, code=code)


# -- requests ------------------------------------------------------------------------------


class StreamOptions(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # ignored: we add no padding


class TextPart(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    text: str


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Meta(max_length=256)] | None = None
    name: Annotated[str, Meta(max_length=256)] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)  # as vLLM and ModelText join them


class _Common(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """Fields both endpoints share."""

    model: Name
    n: N = 1
    temperature: Temperature | None = None
    top_p: TopP | None = None
    top_k: TopK | None = None
    min_p: Probability | None = None
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: RepetitionPenalty | None = None
    logit_bias: LogitBias | None = None
    stop: Stop | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: Annotated[str, Meta(max_length=512)] | None = None  # ignored
    metadata: Annotated[dict[str, str], Meta(max_length=16)] | None = None  # ignored
    store: bool | None = None  # ignored: nothing is stored
    service_tier: Annotated[str, Meta(max_length=32)] | None = None  # ignored

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        if any(not s for s in stops):
            raise bad_param("stop", "stop strings must not be empty")
        if len(stops) > MAX_STOPS or any(len(s) > MAX_STOP_CHARS for s in stops):
            raise bad_param("stop", f"at most {MAX_STOPS} stop strings of {MAX_STOP_CHARS} chars")
        return stops

    def bias(self, vocab_size: int) -> dict[int, float]:
        """`logit_bias` with its keys read as token ids of the model."""
        out: dict[int, float] = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit() or int(key) >= vocab_size:
                raise bad_param(
                    "logit_bias", f"logit_bias key {key[:20]!r} is not a token id of the model"
                )
            out[int(key)] = value
        return out

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise bad_param("stream_options", "stream_options is only allowed when stream is true")
        self.stops()

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    messages: Annotated[list[Message], Meta(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Tokens | None = None
    max_completion_tokens: Tokens | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] | None = None
    # documented, not implemented: refused unless in their harmless form (check())
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    reasoning_effort: Annotated[str, Meta(max_length=32)] | None = None  # ignored
    web_search_options: dict[str, Any] | None = None

    def check(self) -> None:
        """Refuse the documented fields we cannot honour (400 naming the field)."""
        self.check_common()
        if self.tools:
            raise bad_param("tools", "tools are not supported by this server")
        if self.tool_choice not in (None, "none", "auto"):
            raise bad_param("tool_choice", "tools are not supported by this server")
        for name in ("functions", "function_call", "audio", "prediction", "web_search_options"):
            if getattr(self, name):
                raise bad_param(name, f"{name} is not supported by this server")
        if self.response_format is not None and self.response_format.get("type") != "text":
            raise bad_param("response_format", 'only response_format {"type": "text"} is supported')
        if self.modalities is not None and self.modalities != ["text"]:
            raise bad_param("modalities", "only the text modality is supported")
        if self.top_logprobs and not self.logprobs:
            raise bad_param("top_logprobs", "top_logprobs requires logprobs: true")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise bad_param("max_tokens", "give max_tokens or max_completion_tokens, not both")

    def limit(self) -> int | None:
        return self.max_completion_tokens if self.max_tokens is None else self.max_tokens


class CompletionRequest(_Common, kw_only=True, forbid_unknown_fields=True):
    # a string, a list of token ids, or a list of one of them (batches are refused)
    prompt: str | Annotated[list[Any], Meta(min_length=1, max_length=MAX_PROMPT_IDS)]
    max_tokens: Tokens = 16
    logprobs: Annotated[int, Meta(ge=0, le=MAX_COMPLETION_LOGPROBS)] | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: Annotated[int, Meta(ge=1, le=MAX_N)] | None = None

    def check(self) -> None:
        self.check_common()
        if self.echo:
            raise bad_param("echo", "echo is not supported by this server")
        if self.suffix:
            raise bad_param("suffix", "suffix is not supported by this server")
        if self.best_of is not None and self.best_of != self.n:
            raise bad_param("best_of", "best_of must equal n (no server-side best-of)")

    def prompt_form(self) -> str | list[int]:
        """The one prompt: text, or token ids (range-checked against the vocabulary later)."""
        prompt: Any = self.prompt
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # ["text"] or [[ids]]: one prompt
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
            if len(prompt) > MAX_PROMPT_IDS:
                raise bad_param("prompt", f"at most {MAX_PROMPT_IDS} prompt tokens")
            return list(prompt)
        raise bad_param(
            "prompt",
            "prompt must be a string, a list of token ids, or a list of one of them "
            "(one prompt per request)",
        )


_AT = re.compile(r" - at `\$\.?([^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]*)`")


def decode(body: bytes, kind: type[Any]) -> Any:
    """A request body as `kind`, or an OpenAIError 400 naming the offending parameter."""
    try:
        request = msgspec.json.decode(body, type=kind)
    except msgspec.ValidationError as exc:
        text = str(exc)
        at = _AT.search(text)
        unknown = _UNKNOWN.search(text)
        path = at.group(1) if at else ""
        if unknown:
            path = f"{path}.{unknown.group(1)}" if path else unknown.group(1)
        param = re.sub(r"\[\d+\]", "", path).split(".")[0] if path else None
        raise OpenAIError(400, f"invalid request: {text}", param=param or None) from None
    except msgspec.DecodeError as exc:
        raise OpenAIError(400, f"malformed JSON body: {exc}") from None
    request.check()
    return request


# -- responses -----------------------------------------------------------------------------


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob] | None


class ChatMessage(msgspec.Struct):
    role: str
    content: str


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    object: str = "chat.completion"
    system_fingerprint: str | None = None


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChunkChoice]
    object: str = "chat.completion.chunk"
    system_fingerprint: str | None = None
    usage: Usage | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None
    object: str = "text_completion"
    system_fingerprint: str | None = None


class ModelCard(msgspec.Struct):
    id: str
    created: int
    owned_by: str = "gridmesh"
    object: str = "model"


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"
