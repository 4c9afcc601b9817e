"""HTTP transport for the JSON-RPC control plane, bound to 127.0.0.1 only.

A small HTTP/1.1 server: h11 for parsing, `trio.serve_listeners` for accepting. hypercorn's
trio worker was tried first (port 0 works with it), but it sends responses inside a shielded
cancel scope: one local client that pipelines requests and never reads the answers blocks
cancellation of the whole server indefinitely, which breaks "shuts down promptly". Owning the
loop also makes the limits explicit: header size (h11's max_incomplete_event_size), body size
(Content-Length checked up front, then counted per chunk, so at most ~MAX_BODY is buffered),
timeouts and a cap on concurrent connections.

Slow clients (issue 12 item 9): a request gets one deadline, `REQUEST_TIMEOUT_S` from when
the server starts waiting for it (keep-alive idle time included) to its last body byte, so
trickling a byte at a time does not extend it. The head is parsed and the token and
Content-Length checked before any body byte is read; `GET /metrics` never reads a body. The
connection cap cannot be held by slow clients: when it is reached, a new connection sheds
the connection that has spent longest waiting for (or sending) its request; connections
whose request is being executed are never shed. An honest client sends its request at once,
so it is never the oldest waiting one.

Routes: POST / (JSON-RPC, bearer token), GET /metrics (Prometheus text, no token: the
listener is loopback only), /dashboard/... (daemon.dashboard: a session cookie from a
one-time login link).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Callable

import h11
import trio

from daemon.api.cookie import COOKIE_FILE
from daemon.api.httpio import (
    MAX_HEADER_BYTES,
    BodyTooLarge,
    ClientGone,
    Conn,
    ConnectionTable,
    Headers,
    Response,
    TimedOut,
    has_body,
    header,
    linger_close,
    next_event,
    read_body,
    send,
    started,
    text_response,
)
from daemon.api.jsonrpc import (
    INTERNAL_ERROR,
    INVALID_REQUEST,
    REQUESTER,
    Dispatcher,
    cap_recursion_limit,
)
from daemon.dashboard.routes import Dashboard
from daemon.errors import GridmeshError, Unauthorized, status_of

log = logging.getLogger(__name__)

HOST = "127.0.0.1"
MAX_BODY = 1 << 20
MAX_CONNECTIONS = 256
REQUEST_TIMEOUT_S = 10.0  # idle + head + body of one request, however slowly it trickles in
UNAUTHORIZED = status_of(Unauthorized).jsonrpc  # the table in daemon.errors decides
METRICS_CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"


def _rpc_error_body(code: int, message: str) -> bytes:
    doc = {"jsonrpc": "2.0", "error": {"code": code, "message": message}, "id": None}
    return json.dumps(doc, separators=(",", ":")).encode("ascii")


def _error_reply(error: GridmeshError, extra: Headers | None = None) -> Response:
    """`error` as a JSON-RPC error body, with the HTTP status of its kind."""
    status = status_of(error)
    body = _rpc_error_body(status.jsonrpc, error.message)
    return Response(status.http, body, b"application/json", extra, close=True)


class _Server:
    def __init__(
        self,
        dispatcher: Dispatcher,
        token: str,
        metrics: Callable[[], bytes],
        on_reject: Callable[[str], None],
        max_body: int,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
    ) -> None:
        if not token:
            raise ValueError("an RPC token is required")
        if max_connections < 1 or request_timeout_s <= 0:
            raise ValueError("max_connections and request_timeout_s must be positive")
        self._dispatcher = dispatcher
        self._token = token.encode("utf-8")
        self._metrics = metrics
        self._on_reject = on_reject
        self._max_body = max_body
        self._max_connections = max_connections
        self._request_timeout_s = request_timeout_s
        self._table = ConnectionTable(max_connections)
        self._dashboard = Dashboard(dispatcher, metrics, self._reject)

    @property
    def connections(self) -> int:
        return len(self._table)

    async def handle_connection(self, stream: trio.SocketStream) -> None:
        """Serve one connection; swallows every error so the listener keeps going."""
        room = self._table.make_room()
        if room == "shed":
            self._reject("shed_slow_connection")
        elif not room:
            self._reject("too_many_connections")
            return  # serve_listeners closes the stream
        me = Conn()
        self._table.conns.add(me)
        try:
            host, port = stream.socket.getpeername()[:2]
            REQUESTER.set(f"rpc:{host}:{port}")  # this connection's task only
            with me.scope:
                await self._serve(stream, me)
        except (ClientGone, trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        except trio.TooSlowError:
            log.debug("rpc connection timed out")
        except Exception:
            log.exception("rpc connection failed")
        finally:
            self._table.conns.discard(me)
            if me.scope.cancelled_caught:  # shed: close at once, no linger
                await trio.aclose_forcefully(stream)

    async def _serve(self, stream: trio.SocketStream, me: Conn) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        while True:
            me.waiting_since = trio.current_time()
            deadline = me.waiting_since + self._request_timeout_s  # the whole request
            try:
                with trio.move_on_at(deadline) as scope:
                    event = await next_event(conn, stream)
                if scope.cancelled_caught:  # idle too long, or the head came too slowly
                    if started(conn):
                        self._reject("request_timeout")
                    return
                if not isinstance(event, h11.Request):  # ConnectionClosed
                    return
                response = await self._route(conn, stream, event, me, deadline)
            except h11.RemoteProtocolError as e:
                self._reject("bad_http")
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    status = e.error_status_hint
                    resp = text_response(status, f"bad request: {e}")
                    await send(conn, stream, resp, head=False)
                await linger_close(stream)
                return
            head = event.method == b"HEAD"
            await send(conn, stream, response, head=head)
            if conn.our_state is h11.MUST_CLOSE or conn.their_state is not h11.DONE:
                await linger_close(stream)
                return
            conn.start_next_cycle()

    async def _route(
        self,
        conn: h11.Connection,
        stream: trio.SocketStream,
        req: h11.Request,
        me: Conn,
        deadline: float,
    ) -> Response:
        path = req.target.split(b"?", 1)[0]
        if path == b"/metrics":
            if req.method != b"GET":
                return text_response(405, "method not allowed", [(b"allow", b"GET")])
            response = self._serve_metrics()
            if has_body(req):  # never read: answer, then close instead of keeping alive
                response.close = True
            else:
                await self._read_body(conn, stream, req, deadline)  # EndOfMessage, no I/O
            return response
        if path == b"/dashboard" or path.startswith(b"/dashboard/"):
            me.waiting_since = None  # executing (a live feed runs for long): never shed
            return await self._dashboard.handle(conn, stream, req, deadline)
        if path != b"/":
            return text_response(404, "not found")
        if req.method != b"POST":
            return text_response(405, "method not allowed", [(b"allow", b"POST")])
        if not self._authorized(req.headers):
            self._reject("unauthorized")
            denied = Unauthorized(
                "unauthorized: send 'Authorization: Bearer <token>' "
                f"with the token read from HOME/{COOKIE_FILE}"
            )
            return _error_reply(denied, [(b"www-authenticate", b"Bearer")])
        try:
            body = await self._read_body(conn, stream, req, deadline)
        except BodyTooLarge:
            return self._too_large()
        except TimedOut:
            self._reject("request_timeout")
            return text_response(408, "request timeout: send the whole request at once")
        me.waiting_since = None  # executing: never shed
        try:
            result = await self._dispatcher.handle(body)
        except Exception:  # the dispatcher is not supposed to raise; keep serving anyway
            log.exception("rpc dispatcher failed")
            result = _rpc_error_body(INTERNAL_ERROR, "internal error")
        if result is None:
            return Response(204)
        return Response(200, result, b"application/json")

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, credentials = (header(headers, b"authorization") or b"").partition(b" ")
        # The scheme is case-insensitive (RFC 9110); the token is compared in constant time.
        ok = hmac.compare_digest(credentials.strip(), self._token)
        return ok and scheme.lower() == b"bearer"

    async def _read_body(
        self, conn: h11.Connection, stream: trio.SocketStream, req: h11.Request, deadline: float
    ) -> bytes:
        return await read_body(conn, stream, req, deadline, self._max_body)

    def _too_large(self) -> Response:
        self._reject("too_large")
        msg = f"invalid request: body larger than {self._max_body} bytes"
        err = _rpc_error_body(INVALID_REQUEST, msg)
        return Response(413, err, b"application/json", close=True)

    def _serve_metrics(self) -> Response:
        try:
            body = self._metrics()
        except Exception:
            log.exception("metrics collection failed")
            return Response(500, b"metrics collection failed\n", b"text/plain; charset=utf-8")
        return Response(200, body, METRICS_CONTENT_TYPE)

    def _reject(self, reason: str) -> None:
        try:
            self._on_reject(reason)
        except Exception:
            log.exception("on_reject hook failed")


async def serve_rpc(
    dispatcher: Dispatcher,
    *,
    token: str,
    port: int,
    metrics: Callable[[], bytes],
    on_reject: Callable[[str], None],
    max_body: int = MAX_BODY,
    max_connections: int = MAX_CONNECTIONS,
    request_timeout_s: float = REQUEST_TIMEOUT_S,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve JSON-RPC on 127.0.0.1:port until cancelled; `task_status.started(actual_port)`.

    `on_reject(reason)` counts refused requests: "unauthorized", "too_large", "bad_http",
    "request_timeout", "shed_slow_connection", "too_many_connections".
    """
    cap_recursion_limit()  # before the first request: see daemon.api.jsonrpc
    server = _Server(
        dispatcher, token, metrics, on_reject, max_body, max_connections, request_timeout_s
    )
    listeners = await trio.open_tcp_listeners(port, host=HOST)
    try:
        actual = listeners[0].socket.getsockname()[1]
        log.info("JSON-RPC listening on http://%s:%d/", HOST, actual)
        task_status.started(actual)
        await trio.serve_listeners(server.handle_connection, listeners)
    finally:
        for listener in listeners:
            await trio.aclose_forcefully(listener)
