"""What the daemon's h11 HTTP servers share (the JSON-RPC server, daemon.api.http, and the
OpenAI-compatible endpoint, daemon.api.openai_http): reading a request's events and its body
under one deadline and a size cap, sending a response, closing without destroying the last
answer, and a connection table that sheds the slowest waiting connection at its cap.
"""

from __future__ import annotations

from http import HTTPStatus

import h11
import trio

MAX_HEADER_BYTES = 16 * 1024
WRITE_TIMEOUT_S = 30.0
LINGER_S = 1.0  # drain unread input this long before closing, so the client sees our error
RECV_SIZE = 64 * 1024

Headers = list[tuple[bytes, bytes]]


class BodyTooLarge(Exception):
    pass


class ClientGone(Exception):
    pass


class TimedOut(Exception):
    """The request's deadline passed before its body was complete."""


class Conn:
    """One connection's place in a `ConnectionTable`."""

    def __init__(self) -> None:
        self.scope = trio.CancelScope()
        self.waiting_since: float | None = trio.current_time()  # None: a handler runs


class ConnectionTable:
    """The connections of one server, capped. At the cap, a new connection sheds the one
    that has spent longest waiting for (or sending) its request; connections whose request
    is being executed are never shed. An honest client sends its request at once, so it is
    never the oldest waiting one."""

    def __init__(self, max_connections: int) -> None:
        if max_connections < 1:
            raise ValueError("max_connections must be positive")
        self.max_connections = max_connections
        self.conns: set[Conn] = set()

    def __len__(self) -> int:
        return len(self.conns)

    def make_room(self) -> bool | str:
        """True if there is room, "shed" if a waiting connection was shed to make it, False
        if every connection is executing a request."""
        if len(self.conns) < self.max_connections:
            return True
        waiting = [c for c in self.conns if c.waiting_since is not None]
        if not waiting:
            return False
        oldest = min(waiting, key=lambda c: c.waiting_since or 0.0)
        oldest.scope.cancel()
        self.conns.discard(oldest)
        return "shed"


class Response:
    """What to send back for one request."""

    def __init__(
        self,
        status: int,
        body: bytes = b"",
        content_type: bytes | None = None,
        extra: Headers | None = None,
        *,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        self.content_type = content_type
        self.extra = extra or []
        self.close = close  # the request body was not consumed: the connection must end


def text_response(status: int, text: str, extra: Headers | None = None) -> Response:
    return Response(status, text.encode() + b"\n", b"text/plain; charset=utf-8", extra, close=True)


async def next_event(conn: h11.Connection, stream: trio.abc.Stream) -> h11.Event:
    while True:
        event = conn.next_event()
        if event is h11.PAUSED:  # cannot happen: we never read past the end of a request
            raise RuntimeError("h11 paused unexpectedly")
        if event is not h11.NEED_DATA:
            return event
        conn.receive_data(await stream.receive_some(RECV_SIZE))


async def read_body(
    conn: h11.Connection,
    stream: trio.abc.Stream,
    req: h11.Request,
    deadline: float,
    max_body: int,
) -> bytes:
    """The request's body, at most `max_body` bytes (BodyTooLarge: checked against its
    Content-Length first, then counted), complete by `deadline` (TimedOut)."""
    length = header(req.headers, b"content-length")
    # h11 has already rejected a malformed Content-Length, so int() is safe.
    if length is not None and int(length) > max_body:
        raise BodyTooLarge
    if conn.they_are_waiting_for_100_continue:
        await send_all(stream, conn.send(h11.InformationalResponse(status_code=100)))
    chunks: list[bytes] = []
    total = 0
    while True:
        event: h11.Event | None = None
        with trio.move_on_at(deadline):  # the request's one deadline, not one per chunk
            event = await next_event(conn, stream)
        if event is None:
            raise TimedOut
        if isinstance(event, h11.Data):
            total += len(event.data)
            if total > max_body:
                raise BodyTooLarge
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return b"".join(chunks)
        else:  # ConnectionClosed in the middle of the body
            raise ClientGone


def response_head(conn: h11.Connection, resp: Response, length: int | None) -> bytes:
    """The bytes of a response's head (no Content-Length when `length` is None: h11 then
    sends the body chunked, or until close for an HTTP/1.0 client)."""
    headers: Headers = [(b"cache-control", b"no-store")]
    if resp.content_type is not None:
        headers.append((b"content-type", resp.content_type))
    if length is not None and resp.status != 204:
        headers.append((b"content-length", str(length).encode("ascii")))
    if resp.close:
        headers.append((b"connection", b"close"))
    headers.extend(resp.extra)
    reason = HTTPStatus(resp.status).phrase.encode("ascii")
    return conn.send(h11.Response(status_code=resp.status, headers=headers, reason=reason)) or b""


async def send(
    conn: h11.Connection, stream: trio.abc.Stream, resp: Response, *, head: bool
) -> None:
    out = response_head(conn, resp, len(resp.body))
    if resp.body and not head:
        out += conn.send(h11.Data(data=resp.body)) or b""
    out += conn.send(h11.EndOfMessage()) or b""
    await send_all(stream, out)


async def send_all(stream: trio.abc.Stream, data: bytes | None) -> None:
    if data:
        with trio.fail_after(WRITE_TIMEOUT_S):
            await stream.send_all(data)


async def linger_close(stream: trio.abc.HalfCloseableStream) -> None:
    """Half-close, then discard input for a moment before closing.

    Closing a socket with unread input makes the kernel send a reset, which can destroy our
    error response before the client reads it (e.g. a 413 sent before the body arrived).
    """
    try:
        await stream.send_eof()
        with trio.move_on_after(LINGER_S):
            while await stream.receive_some(RECV_SIZE):
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    await trio.aclose_forcefully(stream)


def has_body(req: h11.Request) -> bool:
    length = header(req.headers, b"content-length")
    return (length is not None and int(length) > 0) or (
        header(req.headers, b"transfer-encoding") is not None
    )


def started(conn: h11.Connection) -> bool:
    """Whether part of a request has arrived (so a 408 is worth sending)."""
    return bool(conn.trailing_data[0])


def header(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:  # h11 lower-cases header names
            return value
    return None
