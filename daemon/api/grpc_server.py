"""The gRPC inference API: `gridmesh.inference.v1.Inference`, health checks and reflection.

grpc.aio is asyncio-only, so the server runs on the daemon's one asyncio loop
(`p2p.aio.AsyncioBridge`, DESIGN.md principle 2) while generation runs under trio. The
servicer never blocks that loop (aiosqlite shares it): every call into trio becomes a task in
`serve_grpc`'s nursery, scheduled through the thread-safe trio token, and its outcome comes
back as an asyncio future (`grpc_portal.TrioPortal`). A client that hangs up cancels its trio
task; a server that stops fails the calls still pending with UNAVAILABLE.

Requests are validated into the same typed inputs as JSON-RPC `generate`
(`daemon.api.generation`, through `grpc_messages`), and every failure is a
`daemon.errors` kind whose status the one table decides.

The server binds 127.0.0.1 only, and like JSON-RPC it wants the cookie: Inference calls carry
`authorization: Bearer <HOME/rpc.cookie>` metadata or end UNAUTHENTICATED (other local
users must not spend this node's compute). Health checks and reflection stay open: they say
nothing that is not in the repository. One connection (a requester) may have at most
`MAX_RPCS_PER_PEER` Inference calls in flight; more end RESOURCE_EXHAUSTED ("busy").
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc
import trio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import SERVICE_NAME as HEALTH_SERVICE_NAME
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection

from daemon import errors
from daemon.api.generation import ForwardInput, GenerateInput
from daemon.api.grpc_backend import (  # noqa: F401 - ShardBackend, _job_error_code: re-exported
    InferenceBackend,
    ShardBackend,
    _job_error_code,
)
from daemon.api.grpc_messages import (
    final_reply,
    forward_input,
    generate_input,
    pack_floats,
    text_delta,
)
from daemon.api.grpc_portal import TrioPortal
from daemon.api.grpc_vdag import SERVICE_NAME as VDAG_SERVICE_NAME
from daemon.api.grpc_vdag import add_vdag_service
from daemon.api.proto import gridmesh_inference_pb2 as pb2
from daemon.api.proto import gridmesh_inference_pb2_grpc as pb2_grpc
from daemon.errors import GridmeshError, status_of
from p2p.aio import AsyncioBridge

log = logging.getLogger(__name__)

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["Inference"].full_name
HOST = "127.0.0.1"
GRACE_S = 0.5  # in-flight calls get this long when the server stops
MAX_CONCURRENT_RPCS = 256
MAX_RPCS_PER_PEER = 8  # Inference calls in flight per connection
AUTH_METADATA = "authorization"
POLL_MIN_S = 0.005  # Generate polls its job this often while tokens come in...
POLL_MAX_S = 0.05  # ...backing off to this while none do

# -- the servicer --------------------------------------------------------------------------


def grpc_status(error: GridmeshError | type[GridmeshError]) -> grpc.StatusCode:
    """The status `error`'s kind ends a call with (the table in `daemon.errors`)."""
    return grpc.StatusCode[status_of(error).grpc]


async def _abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    """End the call with `exc`'s status: its kind's, or INTERNAL for anything else."""
    if isinstance(exc, GridmeshError):
        await context.abort(grpc_status(exc), exc.message)
    log.error("the inference backend failed", exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}")


class InferenceServicer(pb2_grpc.InferenceServicer):
    """`gridmesh.inference.v1.Inference` over an `InferenceBackend`; runs on the asyncio loop."""

    def __init__(
        self,
        backend: InferenceBackend,
        portal: TrioPortal,
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
        await _abort(
            context,
            errors.Busy(f"busy: this connection already has {MAX_RPCS_PER_PEER} calls running"),
        )

    async def Generate(  # noqa: N802 - the gRPC method name
        self, request: pb2.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb2.GenerateReply]:
        try:
            checked = generate_input(request)
        except GridmeshError as exc:
            await _abort(context, exc)
        with self._slot(context.peer()) as peer:
            if peer is None:
                await self._busy(context)
                return
            async for reply in self._generate(checked, context, peer):
                yield reply

    async def _generate(
        self, request: GenerateInput, context: grpc.aio.ServicerContext, peer: str
    ) -> AsyncIterator[pb2.GenerateReply]:
        try:
            job_id = await self._portal.call(
                self._backend.start_generation,
                request.model,
                request.prompt,
                request.token_ids,
                request.max_tokens,
                request.temperature,
                request.seed,
                f"grpc:{peer}",
                request.job_id,
            )
        except Exception as exc:
            await _abort(context, exc)
        finished = False
        try:
            since, emitted, delay = 0, "", POLL_MIN_S
            while True:
                try:
                    state = await self._portal.call_sync(self._backend.poll, job_id, since)
                    tokens = [int(t) for t in state.get("tokens") or ()]
                    text, done = str(state.get("text") or ""), bool(state.get("done"))
                except Exception as exc:
                    await _abort(context, exc)
                for i, token in enumerate(tokens):
                    delta = ""
                    if i == len(tokens) - 1:
                        delta, emitted = text_delta(emitted, text, final=done)
                    yield pb2.GenerateReply(token_id=token, index=since + i, text_delta=delta)
                since += len(tokens)
                if done:
                    break
                delay = POLL_MIN_S if tokens else min(2 * delay, POLL_MAX_S)
                await asyncio.sleep(delay)
            finished = True
            if state.get("error"):
                kind = errors.BY_CODE.get(str(state.get("error_code")), errors.ShardFailure)
                await _abort(context, kind(str(state["error"])))
            yield final_reply(state, since, emitted, text)
        finally:
            if not finished:  # the client hung up, or the server stops
                self._portal.post(self._backend.cancel, job_id)

    async def Forward(  # noqa: N802 - the gRPC method name
        self, request: pb2.ForwardRequest, context: grpc.aio.ServicerContext
    ) -> pb2.ForwardReply:
        try:
            checked = forward_input(request)
        except GridmeshError as exc:
            await _abort(context, exc)
        with self._slot(context.peer()) as peer:
            if peer is None:
                await self._busy(context)
            return await self._forward(checked, context)

    async def _forward(
        self, request: ForwardInput, context: grpc.aio.ServicerContext
    ) -> pb2.ForwardReply:
        try:
            logits, next_token = await self._portal.call(
                self._backend.forward, request.model, request.token_ids
            )
            payload = pack_floats(logits)
        except Exception as exc:
            await _abort(context, exc)
        return pb2.ForwardReply(logits=payload, vocab_size=len(logits), next_token=next_token)


# -- the server ----------------------------------------------------------------------------


class _CookieAuth(grpc.aio.ServerInterceptor):
    """Inference calls need `authorization: Bearer <cookie>` metadata; others pass."""

    def __init__(self, token: str, on_reject: Callable[[str], None]) -> None:
        if not token:
            raise ValueError("a gRPC token is required")
        self._token = token.encode("utf-8")
        self.on_reject = on_reject
        self._prefix: tuple[str, ...] = (f"/{SERVICE_NAME}/", f"/{VDAG_SERVICE_NAME}/")

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


_DENIED = errors.Unauthorized(
    "unauthenticated: send 'authorization: Bearer <token>' metadata with the token read "
    "from HOME/rpc.cookie"
)


def _deny(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """A handler of the same shape as `handler` that ends the call UNAUTHENTICATED."""

    async def deny(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _abort(context, _DENIED)

    async def deny_stream(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await _abort(context, _DENIED)
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
    portal: TrioPortal
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
    vdag_infer: Any = None,
) -> _Running:
    """Build and start the server; runs on the asyncio loop, which grpc.aio binds to."""
    portal = TrioPortal(token, nursery, asyncio.get_running_loop())
    server = grpc.aio.server(
        interceptors=[auth],
        maximum_concurrent_rpcs=MAX_CONCURRENT_RPCS,
        # grpc sets SO_REUSEPORT by default: a second daemon would share the port silently
        options=[("grpc.so_reuseport", 0)],
    )
    servicer = InferenceServicer(backend, portal, auth.on_reject)
    pb2_grpc.add_InferenceServicer_to_server(servicer, server)
    served = [SERVICE_NAME]
    if vdag_infer is not None:  # AIOS's vDAGInferenceService (daemon.api.grpc_vdag)
        served.append(add_vdag_service(server, portal, vdag_infer))
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*served, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
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
    vdag_infer: Any = None,
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
            running = await bridge.run(_start, backend, trio_token, nursery, port, auth, vdag_infer)
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
