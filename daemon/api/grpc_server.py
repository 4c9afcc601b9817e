"""The gRPC inference API: `gridmesh.inference.v1.Inference`, health checks and reflection.

grpc.aio is asyncio-only, so the server runs on the daemon's one asyncio loop
(`p2p.aio.AsyncioBridge`, DESIGN.md principle 2) while generation runs under trio. The
servicer never blocks that loop (aiosqlite shares it): every call into trio becomes a task in
`serve_grpc`'s nursery, scheduled through the thread-safe trio token, and its outcome comes
back as an asyncio future (`_TrioPortal`). A client that hangs up cancels its trio task; a
server that stops fails the calls still pending with UNAVAILABLE.

The server binds 127.0.0.1 only, and like JSON-RPC it wants the cookie: Inference calls carry
`authorization: Bearer <HOME/rpc.cookie>` metadata or end UNAUTHENTICATED (other local
users must not spend this node's compute). Health checks and reflection stay open: they say
nothing that is not in the repository. One connection (a requester) may have at most
`MAX_RPCS_PER_PEER` Inference calls in flight; more end RESOURCE_EXHAUSTED ("busy").
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import hmac
import logging
import math
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeVar, get_args

import grpc
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from daemon.api.proto import gridmesh_inference_pb2 as pb2
from daemon.api.proto import gridmesh_inference_pb2_grpc as pb2_grpc
from p2p.aio import AsyncioBridge

if TYPE_CHECKING:
    from daemon.shards.service import ShardService

log = logging.getLogger(__name__)

T = TypeVar("T")

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Inference"].full_name
HOST = "127.0.0.1"
GRACE_S = 0.5  # in-flight calls get this long when the server stops
DEFAULT_MAX_TOKENS = 32
MAX_NEW_TOKENS = 4096  # as JSON-RPC `generate`
MAX_PROMPT_TOKENS = 32768
MAX_FORWARD_TOKENS = 4096
MAX_PROMPT_CHARS = 1 << 20
MAX_MODEL_CHARS = 256
MAX_TEMPERATURE = 100.0
MAX_CONCURRENT_RPCS = 256
MAX_RPCS_PER_PEER = 8  # Inference calls in flight per connection
AUTH_METADATA = "authorization"
POLL_MIN_S = 0.005  # Generate polls its job this often while tokens come in...
POLL_MAX_S = 0.05  # ...backing off to this while none do

ErrorCode = Literal[
    "invalid_argument",
    "not_found",
    "failed_precondition",
    "resource_exhausted",
    "unavailable",
    "aborted",
    "cancelled",
    "deadline_exceeded",
]
_ERROR_CODES = frozenset(get_args(ErrorCode))


class BackendError(Exception):
    """A failure the backend can name; `code` picks the gRPC status the client sees."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def status(self) -> grpc.StatusCode:
        return grpc.StatusCode[self.code.upper()]


class InferenceBackend(Protocol):
    """The trio-side operations the servicer needs. Every method runs on the trio thread.

    Methods raise `BackendError` for failures a client should see with a specific status;
    any other exception is logged and answered with INTERNAL.
    """

    async def start_generation(
        self,
        model: str,
        prompt: str | None,
        token_ids: list[int] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        owner: str = "",
    ) -> str:
        """Start generating (exactly one of `prompt` and `token_ids` is given); the job id.
        `owner` names the requester, for per-requester caps."""
        ...

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        """The job's state, shaped like JSON-RPC `generate_poll`: `tokens` (from index
        `since` on), `text` (all decoded so far), `done`, `error` (str or None), `route`
        ([{peer_id, start, end}]), `recoveries` (a list or a count), `n_tokens`, `seconds`;
        optionally `error_code` (an `ErrorCode`; ABORTED when absent). A finished job may
        be forgotten once its final state was returned."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop a generation nobody reads any more (its client hung up), and forget it."""
        ...

    async def forward(self, model: str, token_ids: list[int]) -> tuple[Sequence[float], int]:
        """One step through the whole chain in a fresh session: the last position's logits
        and the greedy next token."""
        ...


# -- asyncio -> trio ---------------------------------------------------------------------


def _shutting_down() -> BackendError:
    return BackendError("unavailable", "the daemon is shutting down")


class _TrioPortal:
    """Calls trio code from the asyncio loop without blocking it (see the module docstring)."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._token = token
        self._nursery = nursery
        self._loop = loop
        self.closed = False  # set from trio when the server stops: new calls fail at once

    def close(self) -> None:
        self.closed = True

    def _settler(self, future: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
        """A callback for the trio thread that completes `future` on the asyncio loop."""

        def apply(value: Any, exc: BaseException | None) -> None:
            if future.done():  # the asyncio side gave up already
                return
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

        def settle(value: Any, exc: BaseException | None) -> None:
            # RuntimeError: the loop is closed, and nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(apply, value, exc)

        return settle

    def _schedule(self, fn: Callable[[], None], future: asyncio.Future[Any] | None) -> None:
        """Queue `fn` on the trio thread, or fail `future` if trio is no longer taking calls."""
        if self.closed and future is not None:
            future.set_exception(_shutting_down())
            return
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            if future is not None and not future.done():
                future.set_exception(_shutting_down())

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await `fn(*args)` as a trio task."""
        future: asyncio.Future[T] = self._loop.create_future()
        settle = self._settler(future)
        scope = trio.CancelScope()

        async def task() -> None:
            try:
                with scope:
                    value = await fn(*args)
                    settle(value, None)
                    return
            except Exception as exc:
                settle(None, exc)
                return
            except BaseException:  # trio.Cancelled from the nursery: the server stops
                settle(None, _shutting_down())
                raise
            settle(None, _shutting_down())  # our own scope was cancelled

        def spawn() -> None:
            try:
                self._nursery.start_soon(task)
            except RuntimeError:  # the nursery has closed
                settle(None, _shutting_down())

        self._schedule(spawn, future)
        try:
            return await future
        except asyncio.CancelledError:
            self._schedule(scope.cancel, None)
            raise

    async def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the quick, synchronous `fn(*args)` on the trio thread."""
        future: asyncio.Future[T] = self._loop.create_future()
        settle = self._settler(future)

        def run() -> None:
            try:
                value = fn(*args)
            except Exception as exc:
                settle(None, exc)
            else:
                settle(value, None)

        self._schedule(run, future)
        return await future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the synchronous `fn(*args)` on the trio thread; do not wait, log failures."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", getattr(fn, "__name__", fn))

        self._schedule(run, None)


# -- the servicer --------------------------------------------------------------------------


def _failure(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, BackendError):
        return exc.status, str(exc)
    log.error("the inference backend failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}"


def _check_model(model: str) -> str | None:
    if not model:
        return "model is required"
    if len(model) > MAX_MODEL_CHARS:
        return f"model is longer than {MAX_MODEL_CHARS} characters"
    return None


def _check_generate(request: pb2.GenerateRequest) -> str | None:
    """Why the request is invalid, or None."""
    which = request.WhichOneof("prompt")
    if which is None:
        return "give a prompt: text or token_ids"
    if which == "text" and not request.text:
        return "the prompt text is empty"
    if which == "text" and len(request.text) > MAX_PROMPT_CHARS:
        return f"the prompt text is longer than {MAX_PROMPT_CHARS} characters"
    if which == "token_ids" and not request.token_ids.ids:
        return "token_ids is empty"
    if which == "token_ids" and len(request.token_ids.ids) > MAX_PROMPT_TOKENS:
        return f"more than {MAX_PROMPT_TOKENS} prompt tokens"
    if request.HasField("max_tokens") and not 1 <= request.max_tokens <= MAX_NEW_TOKENS:
        return f"max_tokens must be 1 to {MAX_NEW_TOKENS}, not {request.max_tokens}"
    if not (math.isfinite(request.temperature) and 0 <= request.temperature <= MAX_TEMPERATURE):
        return f"temperature must be 0 to {MAX_TEMPERATURE:g}, not {request.temperature}"
    return None


def _text_delta(emitted: str, text: str, *, final: bool) -> tuple[str, str]:
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


def _pack_floats(values: Sequence[float]) -> bytes:
    packed = array.array("f", values)
    if sys.byteorder == "big":
        packed.byteswap()
    return packed.tobytes()


class InferenceServicer(pb2_grpc.InferenceServicer):
    """`gridmesh.inference.v1.Inference` over an `InferenceBackend`; runs on the asyncio loop."""

    def __init__(
        self,
        backend: InferenceBackend,
        portal: _TrioPortal,
        on_reject: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self._backend = backend
        self._portal = portal
        self._on_reject = on_reject
        self._in_flight: dict[str, int] = {}  # peer -> Inference calls running

    @contextlib.contextmanager
    def _slot(self, peer: str) -> Iterator[str | None]:
        """Count a call against its peer; None (do not serve) when the peer is at its cap."""
        if self._in_flight.get(peer, 0) >= MAX_RPCS_PER_PEER:
            yield None
            return
        self._in_flight[peer] = self._in_flight.get(peer, 0) + 1
        try:
            yield peer
        finally:
            left = self._in_flight.pop(peer) - 1
            if left:
                self._in_flight[peer] = left

    async def _busy(self, context: grpc.aio.ServicerContext) -> None:
        try:
            self._on_reject("busy")
        except Exception:
            log.exception("on_reject hook failed")
        await context.abort(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"busy: this connection already has {MAX_RPCS_PER_PEER} calls running",
        )

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateReply]:
        problem = _check_model(request.model) or _check_generate(request)
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self._slot(context.peer()) as peer:
            if peer is None:
                await self._busy(context)
                return
            async for reply in self._generate(request, context, peer):
                yield reply

    async def _generate(
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext, peer: str
    ) -> AsyncIterator[pb2.GenerateReply]:
        which = request.WhichOneof("prompt")
        prompt = request.text if which == "text" else None
        token_ids = list(request.token_ids.ids) if which == "token_ids" else None
        max_tokens = request.max_tokens if request.HasField("max_tokens") else DEFAULT_MAX_TOKENS
        seed = request.seed if request.HasField("seed") else None
        try:
            job_id = await self._portal.call(
                self._backend.start_generation,
                request.model,
                prompt,
                token_ids,
                max_tokens,
                float(request.temperature),
                seed,
                f"grpc:{peer}",
            )
        except Exception as exc:
            await context.abort(*_failure(exc))
        finished = False
        try:
            since, emitted, delay = 0, "", POLL_MIN_S
            while True:
                try:
                    state = await self._portal.call_sync(self._backend.poll, job_id, since)
                    tokens = [int(t) for t in state.get("tokens") or ()]
                    text, done = str(state.get("text") or ""), bool(state.get("done"))
                except Exception as exc:
                    await context.abort(*_failure(exc))
                for i, token in enumerate(tokens):
                    delta = ""
                    if i == len(tokens) - 1:
                        delta, emitted = _text_delta(emitted, text, final=done)
                    yield pb2.GenerateReply(token_id=token, index=since + i, text_delta=delta)
                since += len(tokens)
                if done:
                    break
                delay = POLL_MIN_S if tokens else min(2 * delay, POLL_MAX_S)
                await asyncio.sleep(delay)
            finished = True
            if state.get("error"):
                code = state.get("error_code")
                status = grpc.StatusCode[code.upper()] if code in _ERROR_CODES else None
                await context.abort(status or grpc.StatusCode.ABORTED, str(state["error"]))
            yield _final_reply(state, since, emitted, text)
        finally:
            if not finished:  # the client hung up, or the server stops
                self._portal.post(self._backend.cancel, job_id)

    async def Forward(  # noqa: N802 - the gRPC method name
        self, request: pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ForwardReply:
        problem = _check_model(request.model)
        if problem is None and not request.token_ids:
            problem = "token_ids is empty"
        if problem is None and len(request.token_ids) > MAX_FORWARD_TOKENS:
            problem = f"more than {MAX_FORWARD_TOKENS} tokens"
        if problem is not None:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, problem)
        with self._slot(context.peer()) as peer:
            if peer is None:
                await self._busy(context)
            return await self._forward(request, context)

    async def _forward(
        self, request: pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ForwardReply:
        try:
            logits, next_token = await self._portal.call(
                self._backend.forward, request.model, list(request.token_ids)
            )
            payload = _pack_floats(logits)
        except Exception as exc:
            await context.abort(*_failure(exc))
        return pb2.ForwardReply(logits=payload, vocab_size=len(logits), next_token=next_token)


def _final_reply(state: dict[str, Any], n_tokens: int, emitted: str, text: str) -> Any:
    delta, _ = _text_delta(emitted, text, final=True)
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


# -- the server ----------------------------------------------------------------------------


class _CookieAuth(grpc.aio.ServerInterceptor):
    """Inference calls need `authorization: Bearer <cookie>` metadata; others pass."""

    def __init__(self, token: str, on_reject: Callable[[str], None]) -> None:
        if not token:
            raise ValueError("a gRPC token is required")
        self._token = token.encode("utf-8")
        self.on_reject = on_reject
        self._prefix = f"/{SERVICE_NAME}/"

    def _authorized(self, metadata: Sequence[tuple[str, str | bytes]] | None) -> bool:
        values = [v for k, v in metadata or () if k == AUTH_METADATA]
        if len(values) != 1:
            return False
        value = values[0] if isinstance(values[0], bytes) else values[0].encode("utf-8")
        scheme, _, credentials = value.partition(b" ")
        ok = hmac.compare_digest(credentials.strip(), self._token)  # constant time
        return ok and scheme.lower() == b"bearer"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method or ""
        if handler is None or not method.startswith(self._prefix):
            return handler
        if self._authorized(details.invocation_metadata):
            return handler
        try:
            self.on_reject("unauthenticated")
        except Exception:
            log.exception("on_reject hook failed")
        return _deny(handler)


_DENIED = (
    "unauthenticated: send 'authorization: Bearer <token>' metadata with the token read "
    "from HOME/rpc.cookie"
)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, _DENIED)
        yield  # pragma: no cover - an async generator, as streaming handlers are

    decode, encode = handler.request_deserializer, handler.response_serializer
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(deny_stream, decode, encode)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(deny, decode, encode)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(deny, decode, encode)
    return grpc.stream_stream_rpc_method_handler(deny_stream, decode, encode)


@dataclass
class _Running:
    server: grpc.aio.Server
    health: Any
    portal: _TrioPortal
    port: int

    async def stop(self) -> None:
        await self.health.enter_graceful_shutdown()
        await self.server.stop(GRACE_S)


async def _start(
    backend: InferenceBackend,
    token: trio.lowlevel.TrioToken,
    nursery: trio.Nursery,
    port: int,
    auth: _CookieAuth,
) -> _Running:
    """Build and start the server; runs on the asyncio loop, which grpc.aio binds to."""
    portal = _TrioPortal(token, nursery, asyncio.get_running_loop())
    server = grpc.aio.server(
        interceptors=[auth],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        # grpc sets SO_REUSEPORT by default: a second daemon would share the port silently
        options=[("grpc.so_reuseport", 0)],
    )
    servicer = InferenceServicer(backend, portal, auth.on_reject)
    pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    try:
        actual = server.add_insecure_port(f"{HOST}:{port}")
    except RuntimeError as exc:  # grpc raises this when the port is taken
        raise OSError(f"gRPC cannot listen on {HOST}:{port}: {exc}") from None
    if actual == 0:
        raise OSError(f"gRPC cannot listen on {HOST}:{port}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    return _Running(server, health, portal, actual)


async def serve_grpc(
    bridge: AsyncioBridge,
    backend: InferenceBackend,
    *,
    port: int,
    token: str,
    on_reject: Callable[[str], None] = lambda reason: None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the inference API on 127.0.0.1:`port` (0: a free port) until cancelled.

    Inference calls must carry `authorization: Bearer <token>` (the RPC cookie);
    `on_reject(reason)` counts refusals ("unauthenticated", "busy").
    `task_status.started(port)` reports the bound port. On cancellation health turns
    NOT_SERVING, calls in flight get `GRACE_S`, and the server is gone within about a second.
    """
    auth = _CookieAuth(token, on_reject)
    trio_token = trio.lowlevel.current_trio_token()
    bind_error: OSError | None = None
    async with trio.open_nursery() as nursery:  # the portal's trio tasks
        try:
            running = await bridge.run(_start, backend, trio_token, nursery, port, auth)
        except OSError as exc:  # raised below, not wrapped in the nursery's ExceptionGroup
            bind_error = exc
        else:
            log.info("gRPC inference API on %s:%d", HOST, running.port)
            try:
                task_status.started(running.port)
                await trio.sleep_forever()
            finally:
                running.portal.close()  # calls in flight end with UNAVAILABLE...
                nursery.cancel_scope.cancel()  # ...and so do the pending ones
                with trio.CancelScope(shield=True), trio.move_on_after(GRACE_S + 0.4):
                    await bridge.run(running.stop)
    if bind_error is not None:
        raise bind_error


# -- the daemon's backend: block shards ----------------------------------------------------


def _job_error_code(message: str) -> ErrorCode:
    if message.startswith("no server announces"):
        return "not_found"
    if " refused: " in message:  # a server rejected the request itself
        return "invalid_argument"
    if message == "cancelled":
        return "cancelled"
    if "busy" in message:
        return "resource_exhausted"
    return "aborted"


class ShardBackend:
    """`InferenceBackend` over the daemon's `ShardService`: generation through the chain of
    block shards the network announces."""

    def __init__(self, service: ShardService) -> None:
        self.service = service

    def _require_announced(self, model: str) -> list[dict[str, Any]]:
        announced = self.service.announced(model)
        if not announced:
            raise BackendError("not_found", f"no server announces model {model!r}")
        return announced

    async def _encode(self, model: str, prompt: str) -> list[int]:
        from daemon.shards.service import ShardServiceError

        await self.service.ensure_torch()
        try:
            return await self.service.encode_prompt(model, prompt)
        except ShardServiceError as exc:
            empty = exc.code == "empty_prompt"
            code: ErrorCode = "invalid_argument" if empty else "failed_precondition"
            raise BackendError(code, str(exc)) from None

    async def start_generation(
        self,
        model: str,
        prompt: str | None,
        token_ids: list[int] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        owner: str = "",
    ) -> str:
        from daemon.shards.service import ShardServiceError

        self._require_announced(model)
        ids = token_ids if token_ids is not None else await self._encode(model, prompt or "")
        try:
            job = self.service.new_job(owner)
        except ShardServiceError as exc:
            raise BackendError("resource_exhausted", f"busy: {exc}") from None

        async def run() -> None:
            try:
                with job.scope:
                    await self.service.generate(
                        job, model, ids, max_tokens, temperature=temperature, seed=seed
                    )
                if job.scope.cancelled_caught and job.error is None:
                    job.error = "cancelled"
            except Exception as exc:  # one generation must never take the daemon down
                log.exception("generation %s failed", job.id)
                job.error = f"internal error: {type(exc).__name__}: {exc}"
            finally:
                if not job.done:  # cancelled before generate() took charge of the job
                    job.error = job.error or "cancelled"
                    job.done, job.finished = True, time.time()

        self.service.spawn(run)
        return job.id

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        state = self.service.read_job(job_id, since)  # a finished job is dropped once read
        if state is None:
            raise BackendError("not_found", f"unknown job {job_id[:40]!r}")
        error = state.get("error")
        return {**state, "error_code": _job_error_code(error) if error else None}

    def cancel(self, job_id: str) -> None:
        self.service.cancel_job(job_id)

    async def forward(self, model: str, token_ids: list[int]) -> tuple[Sequence[float], int]:
        announced = self._require_announced(model)
        await self.service.ensure_torch()
        from daemon.shards.client import GenerationError, RemoteModel

        remote = RemoteModel(
            self.service,
            lambda: self.service.servers(model),
            model_id=model,
            num_layers=max(item["end"] for item in announced),
            max_length=len(token_ids),
        )
        try:
            await remote.open()
            logits = await remote.step(token_ids)
        except GenerationError as exc:
            raise BackendError(forward_error_code(exc), str(exc)) from None
        finally:
            with trio.CancelScope(shield=True):
                await remote.close()
        return logits.tolist(), int(logits.argmax())


def forward_error_code(exc: Exception) -> ErrorCode:
    """The gRPC status of a failed `Forward` step: busy servers are RESOURCE_EXHAUSTED (come
    back later), a refused request INVALID_ARGUMENT, anything else UNAVAILABLE."""
    if getattr(exc, "code", "") == "busy":
        return "resource_exhausted"
    return "invalid_argument" if " refused: " in str(exc) else "unavailable"
