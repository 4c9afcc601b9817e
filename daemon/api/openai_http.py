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
stops; every other connection is served on.
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
    response_head,
    send,
    send_all,
    started,
)
from daemon.serving import openai_wire as wire
from daemon.serving.access import Access, AccessError
from daemon.serving.engine import (
    Engine,
    Piece,
    Plan,
    Usage,
    created_now,
    owner_of,
    single_error,
)
from daemon.serving.openai_wire import OpenAIError

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 30.0  # idle + head + body of one request
JSON = b"application/json"
SSE = b"text/event-stream"
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
    ) -> None:
        self.engine = engine
        self.access = access
        self.metrics = metrics
        self.max_body = max_body
        self.request_timeout_s = request_timeout_s
        self._table = ConnectionTable(max_connections)

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
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
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
        reserved = plan.reserve
        try:
            principal.reserve(reserved)
        except AccessError as exc:
            self._reject("over_quota")
            return self._fail(route, _access_error(exc), _access_headers(exc), model=plan.model)
        usage = Usage(len(plan.prompt_ids))
        try:
            with trio.CancelScope() as gone, single_error():
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(_watch, conn, stream, gone)
                    try:
                        if request.stream:
                            result = await self._stream(
                                conn, stream, chat, request, plan, owner, usage
                            )
                        else:
                            result = await self._collect(chat, plan, owner, usage)
                    finally:
                        nursery.cancel_scope.cancel()
            if gone.cancelled_caught:
                raise ClientGone
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            # seen by the watcher, or by a write to the closed socket first: one count
            self._reject("client_gone")
            self.metrics.serving_request(plan.model, route, 499)
            raise ClientGone from None
        except OpenAIError as exc:
            return self._fail(route, exc, model=plan.model)
        finally:
            principal.settle(reserved, usage.prompt_tokens + usage.completion_tokens)
        self.metrics.serving_request(plan.model, route, 200)
        return result

    async def _collect(self, chat: bool, plan: Plan, owner: str, usage: Usage) -> Response:
        texts = [""] * plan.n
        tokens: list[list[Any]] = [[] for _ in range(plan.n)]
        reasons: list[str | None] = [None] * plan.n
        async with self.engine.run(plan, owner, usage) as pieces:
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
                    _chat_logprobs(tokens[i]) if plan.logprobs else None,
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
                    _completion_logprobs(tokens[i], 0) if plan.logprobs else None,
                    reasons[i],
                )
                for i in range(plan.n)
            ]
            doc = wire.Completion(ident, now, plan.model, choices_c, used)
        return Response(200, msgspec.json.encode(doc), JSON)

    async def _stream(
        self,
        conn: h11.Connection,
        stream: trio.abc.HalfCloseableStream,
        chat: bool,
        request: Any,
        plan: Plan,
        owner: str,
        usage: Usage,
    ) -> None:
        include_usage = request.include_usage()
        ident, now = _id(chat), created_now()
        chunk = _Chunks(ident, now, plan.model, chat)
        async with self.engine.run(plan, owner, usage) as pieces:
            # the head only once admitted: a full queue is still a plain 429
            extra = [(b"x-accel-buffering", b"no")]
            await send_all(
                stream, response_head(conn, Response(200, content_type=SSE, extra=extra), None)
            )

            out: list[bytes] = []  # events not yet written: one write for all that are ready

            def event(doc: Any) -> None:
                out.append(b"data: " + msgspec.json.encode(doc) + b"\n\n")

            async def flush() -> None:
                if out:
                    data = b"".join(out)
                    out.clear()
                    await send_all(stream, conn.send(h11.Data(data=data)))

            if chat:
                for i in range(plan.n):
                    event(chunk.role(i))
            offsets = [0] * plan.n
            finished = [False] * plan.n
            failed = False
            while not failed:
                try:
                    piece = pieces.receive_nowait()
                except trio.WouldBlock:
                    await flush()  # nothing more ready: write what is
                    try:
                        piece = await pieces.receive()
                    except trio.EndOfChannel:
                        break
                except trio.EndOfChannel:
                    break
                if piece.error is not None:
                    event({"error": _error_doc(piece.error)})
                    failed = True
                    continue
                if piece.text or piece.tokens:
                    event(chunk.content(piece, offsets[piece.index], plan.logprobs))
                    offsets[piece.index] += len(piece.text)
                if piece.finish_reason is not None:
                    finished[piece.index] = True
                    event(chunk.finish(piece.index, piece.finish_reason))
            if not failed and not all(finished):  # a choice was cancelled: read too slowly
                slow = OpenAIError(
                    503,
                    "the stream was cancelled: the client did not read it fast enough",
                    code="slow_reader",
                )
                self._reject("slow_reader")
                event({"error": _error_doc(slow)})
            elif not failed and include_usage:
                total = usage.prompt_tokens + usage.completion_tokens
                event(chunk.usage(wire.Usage(usage.prompt_tokens, usage.completion_tokens, total)))
        out.append(b"data: [DONE]\n\n")
        await flush()
        await send_all(stream, conn.send(h11.EndOfMessage()))
        return None


class _Chunks:
    """The stream's chunk documents."""

    def __init__(self, ident: str, created: int, model: str, chat: bool) -> None:
        self.ident, self.created, self.model, self.chat = ident, created, model, chat

    def role(self, index: int) -> Any:
        choice = wire.ChunkChoice(index, wire.Delta(role="assistant", content=""), None, None)
        return wire.ChatChunk(self.ident, self.created, self.model, [choice])

    def content(self, piece: Piece, offset: int, logprobs: bool) -> Any:
        if self.chat:
            lp = _chat_logprobs(piece.tokens) if logprobs else None
            choice = wire.ChunkChoice(piece.index, wire.Delta(content=piece.text), lp, None)
            return wire.ChatChunk(self.ident, self.created, self.model, [choice])
        clp = _completion_logprobs(piece.tokens, offset) if logprobs else None
        one = wire.CompletionChoice(piece.index, piece.text, clp, None)
        return wire.Completion(self.ident, self.created, self.model, [one], None)

    def finish(self, index: int, reason: str) -> Any:
        if self.chat:
            choice = wire.ChunkChoice(index, wire.Delta(), None, reason)
            return wire.ChatChunk(self.ident, self.created, self.model, [choice])
        one = wire.CompletionChoice(index, "", None, reason)
        return wire.Completion(self.ident, self.created, self.model, [one], None)

    def usage(self, used: wire.Usage) -> Any:
        if self.chat:
            return wire.ChatChunk(self.ident, self.created, self.model, [], usage=used)
        return wire.Completion(self.ident, self.created, self.model, [], used)


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


def _access_error(exc: AccessError) -> OpenAIError:
    return OpenAIError(exc.status, exc.message, type=exc.type, code=exc.code)


def _access_headers(exc: AccessError) -> list[tuple[bytes, bytes]]:
    if exc.status == 401:
        return [(b"www-authenticate", b"Bearer")]
    if exc.retry_after is not None:
        return [(b"retry-after", str(max(1, math.ceil(exc.retry_after))).encode())]
    return []


def _error_doc(error: OpenAIError) -> dict[str, Any]:
    return {"message": error.message, "type": error.type, "param": error.param, "code": error.code}


def _id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)


def _loopback(host: str) -> bool:
    """Whether the client is on this machine (a peer we cannot name is not)."""
    from daemon.serving.settings import is_loopback

    return is_loopback(host)


def _chat_logprobs(tokens: list[Any]) -> wire.ChatLogprobs:
    return wire.ChatLogprobs(
        [
            wire.TokenLogprob(
                t.token,
                t.logprob,
                list(t.data),
                [wire.TopLogprob(s, lp, list(b)) for s, b, lp in t.top],
            )
            for t in tokens
        ]
    )


def _completion_logprobs(tokens: list[Any], offset: int) -> wire.CompletionLogprobs:
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return wire.CompletionLogprobs(
        tokens=[t.token for t in tokens],
        token_logprobs=[t.logprob for t in tokens],
        top_logprobs=[{s: lp for s, _, lp in t.top} for t in tokens],
        text_offset=offsets,
    )


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
