"""The OpenAI-compatible HTTP endpoint: POST /v1/chat/completions, POST /v1/completions,
GET /v1/models, streamed as server-sent events the way OpenAI's clients read them.

An h11 server like the JSON-RPC one (daemon.api.http), sharing its helpers (daemon.api.
httpio): one deadline per request from idle to its last body byte, a body cap (413), a
connection cap that sheds the slowest waiting connection, a write timeout. The API key is
checked (`Access.admit`, 401/429) before any body byte is read.

While a request runs, the connection is watched: a client that closes it (mid-stream or
while waiting for a non-streamed answer) cancels its generations at once, which ends their
sessions on every shard server. A client that stops reading: its pieces are buffered up to
`engine.PIECES_BUFFERED` per choice, then its generations are cancelled; a write that does
not complete within `WRITE_TIMEOUT_S` closes the connection. Either way only that request
stops; every other connection is served on. A client that leaves before its whole answer is
written is counted once (rejected "client_gone", status 499), however it was seen.

A request that waits for a generation slot is told its place in the queue: a streamed one
in SSE comments while it waits (daemon.api.openai_sse), a non-streamed one in the
`x-queue-position` header of its reply (the position it joined the queue at).
"""

from __future__ import annotations

import logging
import math
import secrets
from typing import Any

import h11
import msgspec
import trio

from daemon.api.httpio import (
    MAX_HEADER_BYTES,
    RECV_SIZE,
    BodyTooLarge,
    ClientGone,
    Conn,
    ConnectionTable,
    Response,
    TimedOut,
    header,
    linger_close,
    next_event,
    read_body,
    send,
    started,
)
from daemon.api.openai_sse import (
    QUEUE_NOTICE_S,
    Chunks,
    EventStream,
    chat_logprobs,
    completion_logprobs,
)
from daemon.serving import openai_wire as wire
from daemon.serving.access import Access, AccessError
from daemon.serving.engine import Engine, Plan, Usage, created_now, owner_of, single_error
from daemon.serving.openai_wire import OpenAIError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 30.0  # idle + head + body of one request
JSON = b"application/json"
GONE = (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError)
ROUTES = {
    b"/v1/chat/completions": b"POST",
    b"/v1/completions": b"POST",
    b"/v1/models": b"GET",
}


def _error(exc: OpenAIError, extra: list[tuple[bytes, bytes]] | None = None) -> Response:
    if exc.status in (429, 503) and not extra:  # busy: the openai client waits this long
        extra = [(b"retry-after", b"1")]
    return Response(exc.status, exc.body(), JSON, extra)


class OpenAIServer:
    """The endpoint of one daemon; `handle_connection` serves one client stream (a socket,
    or in tests an in-memory stream)."""

    def __init__(
        self,
        engine: Engine,
        access: Access,
        metrics: Any,  # daemon.metrics.Metrics
        *,
        max_body: int = wire.MAX_BODY,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        queue_notice_s: float = QUEUE_NOTICE_S,
    ) -> None:
        self.engine = engine
        self.queue_notice_s = queue_notice_s
        self.access = access
        self.metrics = metrics
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self._table = ConnectionTable(max_connections)
        self.vdags: Any = None  # daemon.vdags.openai.VdagCompletions, set by the daemon

    @property
    def connections(self) -> int:
        return len(self._table)

    def _reject(self, reason: str) -> None:
        self.metrics.reject("openai", reason)

    async def handle_connection(self, stream: trio.abc.HalfCloseableStream, peer: str = "") -> None:
        """Serve one connection; swallows every error so the listener keeps going. `peer`:
        "host:port" of the client (read from the socket when not given)."""
        room = self._table.make_room()
        if room == "shed":
            self._reject("shed_slow_connection")
        elif not room:
            self._reject("too_many_connections")
            await trio.aclose_forcefully(stream)
            return
        me = Conn()
        self._table.conns.add(me)
        try:
            if not peer and isinstance(stream, trio.SocketStream):
                host, port = stream.socket.getpeername()[:2]
                peer = f"{host}:{port}"
            with me.scope:
                await self._serve(stream, me, peer or "unknown:0")
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            self._reject("write_timeout")
        except Exception:
            log.exception("openai connection failed")
        finally:
            self._table.conns.discard(me)
            await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.abc.HalfCloseableStream, me: Conn, peer: str) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            me.waiting_since = trio.current_time()
            deadline = me.waiting_since + self.request_timeout_s
            try:
                with trio.move_on_at(deadline) as scope:
                    event = await next_event(conn, stream)
                if scope.cancelled_caught:
                    if started(conn):
                        self._reject("request_timeout")
                    return
                if not isinstance(event, h11.Request):  # ConnectionClosed
                    return
                response = await self._guarded(conn, stream, event, me, deadline, peer)
            except h11.RemoteProtocolError as e:
                self._reject("bad_http")
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    error = OpenAIError(e.error_status_hint, f"bad HTTP request: {e}")
                    await send(conn, stream, _error(error, [(b"connection", b"close")]), head=False)
                await linger_close(stream)
                return
            if response is not None:  # None: streamed already
                await send(conn, stream, response, head=False)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                await linger_close(stream)
                return
            conn.start_next_cycle()

    async def _guarded(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        req: h11.Request,
        me: Conn,
        deadline: float,
        peer: str,
    ) -> Response | None:
        """`_route`, with a bug in it answered as a 500 in OpenAI's shape (when no answer
        has started) instead of a dropped connection."""
        try:
            return await self._route(conn, stream, req, me, deadline, peer)
        except GONE:
            raise  # the client's doing: handled by the connection
        except (trio.TooSlowError, h11.RemoteProtocolError):
            raise
        except Exception:
            log.exception("openai request failed")
            self._reject("internal_error")
            if conn.our_state is not h11.SEND_RESPONSE:
                raise
            error = OpenAIError(500, "internal error while serving the request")
            return _error(error, [(b"connection", b"close")])

    async def _route(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        req: h11.Request,
        me: Conn,
        deadline: float,
        peer: str,
    ) -> Response | None:
        path = req.target.split(b"?", 1)[0]
        method = ROUTES.get(path)
        route = path.decode("ascii", "replace")
        if method is None:
            return self._fail(
                route, OpenAIError(404, f"no route {route[:100]!r}", code="not_found")
            )
        if req.method != method:
            error = OpenAIError(405, f"{route} takes {method.decode()}", code="method_not_allowed")
            return self._fail(route, error, [(b"allow", method)])
        host = peer.rsplit(":", 1)[0].strip("[]")
        authorization = header(req.headers, b"authorization")
        try:
            principal = self.access.admit(
                None if authorization is None else authorization.decode("latin-1"),
                loopback=_loopback(host),
            )
        except AccessError as exc:
            self._reject("unauthorized" if exc.status == 401 else "rate_limited")
            return self._fail(route, _access_error(exc), _access_headers(exc))
        with principal:  # in flight until the answer is sent
            try:
                body = await read_body(conn, stream, req, deadline, self.max_body)
            except BodyTooLarge:
                self._reject("too_large")
                error = OpenAIError(
                    413, f"request body larger than {self.max_body} bytes", code="too_large"
                )
                return self._fail(route, error, [(b"connection", b"close")])
            except TimedOut:
                self._reject("request_timeout")
                error = OpenAIError(408, "request timeout: send the whole request at once")
                return self._fail(route, error, [(b"connection", b"close")])
            me.waiting_since = None  # executing: never shed
            if path == b"/v1/models":
                return self._models()
            owner = owner_of(None if principal.anonymous else principal.name, peer)
            chat = path == b"/v1/chat/completions"
            kind = wire.ChatRequest if chat else wire.CompletionRequest
            model = None
            try:
                request = wire.decode(body, kind)
                model = request.model
                engine = self.engine
                if self.vdags is not None:  # `model` naming a vDAG (daemon.vdags.openai)
                    key = None if principal.anonymous else principal.name
                    answer = await self.vdags.answer(request, chat, engine.models(), key)
                    if answer is not None:
                        self.metrics.serving_request(model, route, 200)
                        return answer
                plan = await (
                    engine.plan_chat(request) if chat else engine.plan_completion(request)
                )
            except OpenAIError as exc:
                self._reject("bad_request")
                known = model if exc.status != 404 else None
                return self._fail(route, exc, model=known)
            return await self._generate(conn, stream, route, chat, request, plan, principal, owner)

    def _fail(
        self,
        route: str,
        error: OpenAIError,
        extra: list[tuple[bytes, bytes]] | None = None,
        model: str | None = None,
    ) -> Response:
        self.metrics.serving_request(model, route, error.status)
        return _error(error, extra)

    def _models(self) -> Response:
        now = created_now()
        cards = [wire.ModelCard(id=m, created=now) for m in self.engine.models()]
        self.metrics.serving_request(None, "/v1/models", 200)
        return Response(200, msgspec.json.encode(wire.ModelList(data=cards)), JSON)

    async def _generate(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        route: str,
        chat: bool,
        request: Any,
        plan: Plan,
        principal: Any,
        owner: str,
    ) -> Response | None:
        """Run the request and write its whole answer (None), or the error to answer with.

        Every way the client can leave while it runs (the watcher sees the connection close,
        a write or read finds it closed, both at once, while queued or mid-answer) ends here
        as one count of client_gone and a 499, unless the whole answer was already written."""
        reserved = plan.reserve
        try:
            principal.reserve(reserved)
        except AccessError as exc:
            self._reject("over_quota")
            return self._fail(route, _access_error(exc), _access_headers(exc), model=plan.model)
        usage = Usage(len(plan.prompt_ids))
        outcome = _Outcome()
        sse = EventStream(conn, stream, notice_s=self.queue_notice_s)
        try:
            with trio.CancelScope() as gone, single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch, conn, stream, gone)
                    try:
                        if request.stream:
                            await self._stream(sse, chat, request, plan, owner, usage, outcome)
                        else:
                            await self._collect(conn, stream, chat, plan, owner, usage, outcome)
                    finally:
                        nursery.cancel_scope.cancel()
        except BaseException as exc:
            if not (gone.cancel_called or _client_left(exc)):
                if isinstance(exc, OpenAIError) and not sse.started:
                    return self._fail(route, exc, model=plan.model)
                raise
            self._count(route, plan.model, outcome)
            raise ClientGone from None
        finally:
            principal.settle(reserved, usage.prompt_tokens + usage.completion_tokens)
        self._count(route, plan.model, outcome)
        return None

    def _count(self, route: str, model: str, outcome: _Outcome) -> None:
        if outcome.status is None:  # the client left before its whole answer was written
            self._reject("client_gone")
        self.metrics.serving_request(model, route, outcome.status or 499)

    async def _collect(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        chat: bool,
        plan: Plan,
        owner: str,
        usage: Usage,
        outcome: _Outcome,
    ) -> None:
        texts = [""] * plan.n
        tokens: list[list[Any]] = [[] for _ in range(plan.n)]
        reasons: list[str | None] = [None] * plan.n
        waited = _Waited()
        async with self.engine.run(plan, owner, usage, waited) as pieces:
            async for piece in pieces:
                if piece.error is not None:
                    raise piece.error
                texts[piece.index] += piece.text
                tokens[piece.index].extend(piece.tokens)
                reasons[piece.index] = piece.finish_reason or reasons[piece.index]
        if None in reasons:  # cannot happen unless a reader stalled (not here): say so
            raise OpenAIError(500, "a generation ended without a result")
        used = wire.Usage(
            usage.prompt_tokens,
            usage.completion_tokens,
            usage.prompt_tokens + usage.completion_tokens,
        )
        ident, now = _id(chat), created_now()
        if chat:
            choices = [
                wire.ChatChoice(
                    i,
                    wire.ChatMessage("assistant", texts[i]),
                    chat_logprobs(tokens[i]) if plan.logprobs else None,
                    reasons[i],
                )
                for i in range(plan.n)
            ]
            doc: Any = wire.ChatCompletion(ident, now, plan.model, choices, used)
        else:
            choices_c = [
                wire.CompletionChoice(
                    i,
                    texts[i],
                    completion_logprobs(tokens[i], 0) if plan.logprobs else None,
                    reasons[i],
                )
                for i in range(plan.n)
            ]
            doc = wire.Completion(ident, now, plan.model, choices_c, used)
        extra = waited.headers()
        await send(conn, stream, Response(200, msgspec.json.encode(doc), JSON, extra), head=False)
        outcome.status = 200

    async def _stream(
        self,
        sse: EventStream,
        chat: bool,
        request: Any,
        plan: Plan,
        owner: str,
        usage: Usage,
        outcome: _Outcome,
    ) -> None:
        include_usage = request.include_usage()
        chunk = Chunks(_id(chat), created_now(), plan.model, chat)
        status = 200
        try:
            # the head goes out once admitted, or with the first queue notice: a full queue
            # is still a plain 429, a wait past the queue's time after a notice an error event
            async with self.engine.run(plan, owner, usage, sse.queued) as pieces:
                if chat:
                    for i in range(plan.n):
                        sse.event(chunk.role(i))
                offsets = [0] * plan.n
                finished = [False] * plan.n
                failed = False
                while not failed:
                    try:
                        piece = pieces.receive_nowait()
                    except trio.WouldBlock:
                        await sse.flush()  # nothing more ready: write what is
                        try:
                            piece = await pieces.receive()
                        except trio.EndOfChannel:
                            break
                    except trio.EndOfChannel:
                        break
                    if piece.error is not None:
                        sse.error(piece.error)
                        failed = True
                        continue
                    if piece.text or piece.tokens:
                        sse.event(chunk.content(piece, offsets[piece.index], plan.logprobs))
                        offsets[piece.index] += len(piece.text)
                    if piece.finish_reason is not None:
                        finished[piece.index] = True
                        sse.event(chunk.finish(piece.index, piece.finish_reason))
                if not failed and not all(finished):  # a choice was cancelled: read too slowly
                    slow = OpenAIError(
                        503,
                        "the stream was cancelled: the client did not read it fast enough",
                        code="slow_reader",
                    )
                    self._reject("slow_reader")
                    sse.error(slow)
                elif not failed and include_usage:
                    total = usage.prompt_tokens + usage.completion_tokens
                    used = wire.Usage(usage.prompt_tokens, usage.completion_tokens, total)
                    sse.event(chunk.usage(used))
        except OpenAIError as exc:
            if not sse.started:
                raise
            sse.error(exc)  # the queue's 503 after a notice: the head is out
            status = exc.status
        await sse.flush(end=True)
        outcome.status = status


class _Outcome:
    """The status a request's answer was written with; None until all of it was."""

    status: int | None = None


class _Waited:
    """A non-streamed request's first place in the queue, told on its reply as
    `x-queue-position` (such a client cannot be told more while it waits)."""

    def __init__(self) -> None:
        self.position: int | None = None

    async def __call__(self, position: int) -> None:
        if self.position is None:
            self.position = position

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [] if self.position is None else [(b"x-queue-position", b"%d" % self.position)]


async def _watch(
    conn: h11.Connection, stream: trio.abc.ReceiveStream, gone: trio.CancelScope
) -> None:
    """While a request runs: cancel it if the client closes the connection. What it sends
    meanwhile (a pipelined request) is kept for h11, up to the header limit."""
    kept = 0
    try:
        while kept <= MAX_HEADER_BYTES:
            data = await stream.receive_some(RECV_SIZE)
            if not data:
                break
            kept += len(data)
            conn.receive_data(data)
        else:
            await trio.sleep_forever()  # pipelining past the limit: read no more now
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    conn.receive_data(b"")
    gone.cancel()


def _client_left(exc: BaseException) -> bool:
    """Whether what ended a request is its client gone: each error in it, trio's Cancelled
    aside, a read or write that found the connection closed (the watcher's cancel and a
    failed write can end it together, as a group)."""
    if isinstance(exc, BaseExceptionGroup):
        leaves = [e for e in _leaves(exc) if not isinstance(e, trio.Cancelled)]
        return bool(leaves) and all(isinstance(e, GONE) for e in leaves)
    return isinstance(exc, GONE)


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


def _access_error(exc: AccessError) -> OpenAIError:
    return OpenAIError(exc.status, exc.message, type=exc.type, code=exc.code)


def _access_headers(exc: AccessError) -> list[tuple[bytes, bytes]]:
    if exc.status == 401:
        return [(b"www-authenticate", b"Bearer")]
    if exc.retry_after is not None:
        return [(b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode())]
    return []


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def _loopback(host: str) -> bool:
    """Whether the client is on this machine (a peer we cannot name is not)."""
    from daemon.serving.settings import is_loopback

    return is_loopback(host)


async def serve_openai(
    server: OpenAIServer,
    *,
    host: str,
    port: int,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the endpoint on host:port until cancelled; `task_status.started(actual_port)`."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    try:
        actual = listeners[0].socket.getsockname()[1]
        log.info("OpenAI-compatible endpoint on http://%s:%d/v1", host, actual)
        task_status.started(actual)
        await trio.serve_listeners(server.handle_connection, listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
