"""The serving engine: an OpenAI request -> the model's text side (`ModelText`) -> prompt ids
-> `n` generations through the network's shard servers (`run_generation` with a `Sampler`)
-> incremental detokenization -> stop strings -> `Piece`s for the endpoint to send.

Each generation is one job of the shard service (its caps per requester: `new_job`) and
runs in a cancel scope: cancelling it (a client gone, a stop string, an eos id, a reader
too slow) ends its sessions on every shard server at once (run_generation closes its model,
shielded, on the way out). Requests wait for their jobs in a fair queue (`Admission`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from daemon import errors
from daemon.serving.admission import Admission, Waiting
from daemon.serving.openai_wire import ChatRequest, CompletionRequest, OpenAIError, bad_param

log = logging.getLogger(__name__)

PIECES_BUFFERED = 64  # per choice, waiting for the client to read; past it: paused
SLOW_READER_S = 10.0  # paused this long (the client reads nothing): cancelled
# a chat request without max_tokens: generation_config.json's max_new_tokens, else this (not
# the whole context: a route needs servers with KV cache for prompt + max_tokens, and a
# quota reserves max_tokens x n up front)
DEFAULT_MAX_TOKENS = 2048
TOP_LOGPROB_TOKENS = 20


@dataclass
class TokenInfo:
    """One generated token for logprobs: its text, bytes, logprob and the top alternatives."""

    token: str
    data: bytes
    logprob: float
    top: list[tuple[str, bytes, float]]


@dataclass
class Piece:
    """What one choice produced since its last piece: text, tokens (for logprobs), and its
    end (finish_reason "stop"/"length", or an error)."""

    index: int
    text: str = ""
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: str | None = None
    error: OpenAIError | None = None


@dataclass
class Plan:
    """A validated request, ready to run."""

    model: str
    text: Any  # daemon.serving.text.ModelText
    prompt_ids: list[int]
    max_tokens: int
    n: int
    params: Any  # daemon.serving.sampling.SamplingParams
    vocab: int
    stops: list[str]
    logprobs: bool
    top_logprobs: int

    @property
    def reserve(self) -> int:
        """Tokens a quota reserves up front: the prompt and every choice's maximum."""
        return len(self.prompt_ids) + self.max_tokens * self.n


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0


class Engine:
    """Plans and runs requests for one daemon's endpoint."""

    def __init__(
        self,
        service: Any,  # daemon.shards.service.ShardService
        metrics: Any,  # daemon.metrics.Metrics
        *,
        model_dirs: Mapping[str, str] | None = None,
        max_queue: int = 64,
        max_per_owner: int = 8,
        queue_timeout_s: float = 60.0,
    ) -> None:
        self.service = service
        self.metrics = metrics
        self.model_dirs = dict(model_dirs or {})
        self.admission = Admission(
            service,
            max_queue=max_queue,
            max_per_owner=max_per_owner,
            timeout_s=queue_timeout_s,
            on_queue=metrics.serving_queue,
        )
        self._texts: dict[Path, tuple[Any, int]] = {}  # checkpoint -> (ModelText, vocab size)

    # -- models ------------------------------------------------------------------------

    def models(self) -> list[str]:
        """The models this daemon can serve: announced over every layer, with a text side
        here (a local shard's checkpoint, or `[serving] model_dirs`)."""
        ranges = self._announced()
        return sorted(m for m, r in ranges.items() if _covered(r) and self._dir(m) is not None)

    def _announced(self) -> dict[str, list[tuple[int, int]]]:
        """Every announced model and the ranges its servers announce."""
        from registry.blocks import announcements

        ranges: dict[str, list[tuple[int, int]]] = {}
        for item in announcements(list(self.service.replica.entries.of_kind("blocks"))):
            ranges.setdefault(item.model, []).append((item.start, item.end))
        return ranges

    def _dir(self, model: str) -> Path | None:
        local = self.service.local_block(model)
        if local is not None:
            return Path(local.model_dir)
        given = self.model_dirs.get(model)
        return Path(given) if given else None

    async def text_of(self, model: str) -> tuple[Any, int]:
        """The model's `ModelText` and vocabulary size, loaded once per checkpoint; 404
        model_not_found when the model is not one this daemon serves."""
        if model not in self.models():
            why = "does not exist or is not served on this network"
            if self._dir(model) is None and model in self._announced():
                why = (
                    "is served on this network, but this daemon has no tokenizer for it "
                    "(it holds no shard of it: set [serving] model_dirs)"
                )
            raise OpenAIError(
                404,
                f"The model {model[:200]!r} {why} (GET /v1/models lists those served here)",
                param="model",
                code="model_not_found",
            )
        model_dir = self._dir(model)
        assert model_dir is not None
        if model_dir not in self._texts:
            try:
                self._texts[model_dir] = await trio.to_thread.run_sync(_load, model_dir)
            except Exception as exc:  # ModelError, OSError: the checkpoint's text side is bad
                log.warning("cannot load the text side of %s: %s", model, exc)
                raise OpenAIError(500, f"cannot load the model's tokenizer: {exc}") from None
        return self._texts[model_dir]

    # -- planning ----------------------------------------------------------------------

    async def plan_chat(self, req: ChatRequest) -> Plan:
        text, vocab = await self.text_of(req.model)
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        try:
            ids = await trio.to_thread.run_sync(lambda: list(text.chat_ids(messages)))
        except Exception as exc:  # no chat template, a template that raises
            raise bad_param("messages", f"cannot apply the model's chat template: {exc}") from None
        top = req.top_logprobs or 0
        return self._plan(req, text, vocab, ids, req.limit(), req.logprobs, top)

    async def plan_completion(self, req: CompletionRequest) -> Plan:
        text, vocab = await self.text_of(req.model)
        prompt = req.prompt_form()
        if isinstance(prompt, str):
            if not prompt:
                raise bad_param("prompt", "the prompt is empty")
            ids = await trio.to_thread.run_sync(text.encode, prompt)
        else:
            if any(not 0 <= t < vocab for t in prompt):
                raise bad_param("prompt", f"prompt token ids must be in [0, {vocab})")
            ids = prompt
        logprobs = req.logprobs is not None
        top = req.logprobs or 0
        return self._plan(req, text, vocab, list(ids), req.max_tokens, logprobs, top)

    def _plan(
        self,
        req: ChatRequest | CompletionRequest,
        text: Any,
        vocab: int,
        ids: list[int],
        max_tokens: int | None,
        logprobs: bool,
        top: int,
    ) -> Plan:
        from daemon.serving.sampling import Sampler, SamplingError, SamplingParams

        context = int(text.context_length)
        if not ids:
            raise bad_param(
                "messages" if isinstance(req, ChatRequest) else "prompt", "empty prompt"
            )
        room = context - len(ids)
        if max_tokens is None:  # OpenAI: up to the context; here bounded (see DEFAULT_...)
            default = text.defaults.max_new_tokens or DEFAULT_MAX_TOKENS
            max_tokens = max(1, min(room, default))
        if room < 1 or max_tokens > room:
            raise OpenAIError(
                400,
                f"This model's maximum context length is {context} tokens. However, you "
                f"requested {len(ids) + max_tokens} tokens ({len(ids)} in the prompt, "
                f"{max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                param="max_tokens" if room >= 1 else "messages",
                code="context_length_exceeded",
            )
        defaults = text.defaults  # generation_config.json's, None where it has none
        values: dict[str, Any] = {
            "presence_penalty": req.presence_penalty,
            "frequency_penalty": req.frequency_penalty,
            "logit_bias": req.bias(vocab),
            "logprobs": logprobs,
            "top_logprobs": top,
            "seed": req.seed,
        }
        for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
            given = getattr(req, name)
            if given is None:
                given = getattr(defaults, name)
            if name == "top_k" and given is not None and given < 0:
                given = 0  # vLLM's -1: off
            if given is not None:
                values[name] = given
        try:
            params = SamplingParams.parse(values)
        except Exception as exc:  # msgspec.ValidationError names the field
            raise bad_param(_field_of(str(exc)), f"invalid sampling parameters: {exc}") from None
        try:  # what only the model can tell (a logit_bias id past its vocabulary)
            Sampler(params, ids, vocab_size=vocab)
        except SamplingError as exc:
            raise bad_param("logit_bias", f"invalid sampling parameters: {exc}") from None
        return Plan(
            model=req.model,
            text=text,
            prompt_ids=ids,
            max_tokens=max_tokens,
            n=req.n,
            params=params,
            vocab=vocab,
            stops=req.stops(),
            logprobs=logprobs,
            top_logprobs=top,
        )

    # -- running -----------------------------------------------------------------------

    @asynccontextmanager
    async def run(
        self, plan: Plan, owner: str, usage: Usage, on_wait: Waiting | None = None
    ) -> AsyncIterator[trio.MemoryReceiveChannel[Piece]]:
        """Run `plan`'s n generations as `owner`; yields the channel of their pieces (each
        choice ends with a piece that has a finish_reason or an error). Leaving the block
        cancels what still runs. 429/503 (OpenAIError) when the queue is full or too slow;
        `on_wait` is told the request's position while it waits (`Admission.acquire`)."""
        jobs = await self.admission.acquire(owner, plan.n, plan.model, on_wait)
        send, receive = trio.open_memory_channel[Piece](PIECES_BUFFERED * plan.n)
        self.metrics.serving_tokens(plan.model, "in", len(plan.prompt_ids))
        try:
            with single_error():
                async with trio.open_nursery() as nursery:
                    async with send:  # the clones keep the channel open until each ends
                        for index, job in enumerate(jobs):
                            nursery.start_soon(self._one, plan, index, job, send.clone(), usage)
                    try:
                        yield receive
                    finally:
                        nursery.cancel_scope.cancel()
        finally:
            for job in jobs:
                self.service.drop_job(job.id)
            self.admission.released()

    async def _one(
        self,
        plan: Plan,
        index: int,
        job: Any,
        send: trio.MemorySendChannel[Piece],
        usage: Usage,
    ) -> None:
        from daemon.serving.sampling import Sampler
        from daemon.serving.text import StopStrings
        from daemon.shards.generation import run_generation

        text = plan.text
        sampler = Sampler(plan.params, plan.prompt_ids, choice=index, vocab_size=plan.vocab)
        decoder = text.decoder()
        stops = StopStrings(plan.stops)
        eos = frozenset(text.eos_ids)
        scope = trio.CancelScope()
        state: dict[str, Any] = {"count": 0, "reason": None, "last": None, "overflow": False}
        started = trio.current_time()

        async def emit(piece: Piece) -> None:
            """Queue a piece; a full queue pauses the generation (its consumer is behind),
            for at most SLOW_READER_S, then cancels it."""
            try:
                with trio.move_on_after(SLOW_READER_S) as waited:
                    await send.send(piece)
                if waited.cancelled_caught:
                    state["overflow"] = True
                    scope.cancel()
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                scope.cancel()

        async def on_token(sampled: Any) -> None:
            if state["reason"] is not None:
                return
            now = trio.current_time()
            if state["last"] is None:
                self.metrics.serving_latency(plan.model, "ttft", now - started)
            else:
                self.metrics.serving_latency(plan.model, "itl", now - state["last"])
            state["last"] = now
            state["count"] += 1
            usage.completion_tokens += 1
            self.metrics.serving_tokens(plan.model, "out", 1)
            token = int(sampled.token)
            infos = [_info(text, sampled)] if plan.logprobs else []  # each token, eos too
            if token in eos:  # run_generation ends here by itself (eos_ids)
                state["reason"] = "eos"
                if infos:
                    await emit(Piece(index, "", infos))
                return
            out, stopped = stops.push(decoder.push(token))
            if out or infos:
                await emit(Piece(index, out, infos))
            if stopped:
                state["reason"] = "stop"
                scope.cancel()
            elif state["count"] >= plan.max_tokens:
                state["reason"] = "length"

        with scope:
            await run_generation(
                self.service,
                job,
                plan.model,
                plan.prompt_ids,
                plan.max_tokens,
                sampler=sampler,
                on_token=on_token,
                eos_ids=eos,
            )
        async with send:
            if state["overflow"]:
                return  # the client stopped reading: nothing more is queued for it
            if job.error is not None and state["reason"] is None:
                status = errors.status_of(job.failure()).http
                await send.send(Piece(index, error=OpenAIError(status, job.error)))
                return
            tail = ""
            if state["reason"] != "stop":  # not cut by a stop string: what is held back
                tail, stopped = stops.push(decoder.flush())
                tail += "" if stopped else stops.flush()
                if stopped:
                    state["reason"] = "stop"
            reason = {"eos": "stop", None: "length"}.get(state["reason"], state["reason"])
            await send.send(Piece(index, tail, finish_reason=reason))


@contextmanager
def single_error() -> Iterator[None]:
    """A nursery's exception group of one exception (trio's strict groups wrap even the
    body's own) as that exception, so callers can catch it by its type."""
    try:
        yield
    except BaseExceptionGroup as group:
        leaves = list(_leaves(group))
        if len(leaves) == 1:
            raise leaves[0] from None
        raise


def _leaves(group: BaseExceptionGroup[BaseException]) -> Iterator[BaseException]:
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            yield from _leaves(exc)
        else:
            yield exc


def _covered(ranges: list[tuple[int, int]]) -> bool:
    """Whether the announced ranges chain from layer 0 to the last announced layer."""
    end = max(b for _, b in ranges)
    reach = 0
    for a, b in sorted(ranges):
        if a > reach:
            return False
        reach = max(reach, b)
    return reach == end


def _load(model_dir: Path) -> tuple[Any, int]:
    from daemon.serving.text import ModelText
    from daemon.shards.model import LlamaConfig

    return ModelText.load(model_dir), LlamaConfig.from_dir(model_dir).vocab_size


def _token(text: Any, token_id: int) -> tuple[str, bytes]:
    """A token's text and bytes as logprobs report them (a piece of a UTF-8 character
    reads as U+FFFD; its bytes are exact)."""
    tokenizer = text.tokenizer
    if tokenizer.decodes_bytes:
        data = bytes(tokenizer.token_bytes(token_id))
        return data.decode("utf-8", errors="replace"), data
    piece = text.decode([token_id])
    return piece, piece.encode("utf-8")


def _info(text: Any, sampled: Any) -> TokenInfo:
    token, data = _token(text, int(sampled.token))
    top = [(*_token(text, int(t)), float(lp)) for t, lp in sampled.top]
    return TokenInfo(token, data, float(sampled.logprob or 0.0), top)


def _field_of(message: str) -> str:
    at = message.rfind("$.")
    return message[at + 2 :].split("`")[0].split("[")[0] if at >= 0 else "messages"


def created_now() -> int:
    return int(time.time())


def owner_of(principal_name: str | None, connection: str) -> str:
    """Who the caps count against: the API key's name, else the connection."""
    return f"openai-key:{principal_name}" if principal_name else f"openai-conn:{connection}"


Clock = Callable[[], float]
