"""A tiny HTTP client over trio in-memory streams for the dashboard's routes, served by the
production RPC server's connection loop (`daemon.api.http._Server._serve`), so that the
whole path (the /dashboard hook included) runs on trio's virtual clock."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import h11
import trio
import trio.testing

from daemon.api.http import MAX_BODY, _Server
from daemon.api.httpio import Conn

TOKEN = "t" * 43
HOST = b"127.0.0.1:8545"


@dataclass
class Reply:
    status: int
    headers: dict[bytes, bytes]
    body: bytes = b""
    events: list[tuple[str, Any]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


def make_server(daemon: Any, rejects: list[str]) -> _Server:
    """The RPC server of a harness daemon (in-process daemons have none listening)."""
    return _Server(daemon.dispatcher, TOKEN, daemon.metrics.render, rejects.append, MAX_BODY)


async def request(
    nursery: trio.Nursery,
    server: _Server,
    target: str,
    *,
    cookie: str = "",
    method: bytes = b"GET",
    host: bytes = HOST,
    body: bytes = b"",
) -> Reply:
    """One request on a new connection; the whole reply."""
    client, conn = await _open(nursery, server, target, cookie, method, host, body)
    reply = Reply(0, {})
    with trio.fail_after(30):
        while True:
            event = await _next(conn, client)
            if isinstance(event, h11.Response):
                reply.status, reply.headers = event.status_code, dict(event.headers)
            elif isinstance(event, h11.Data):
                reply.body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                await client.aclose()
                return reply


async def feed(
    nursery: trio.Nursery, server: _Server, cookie: str, stream: Any = None
) -> tuple[Any, h11.Connection, Reply]:
    """Open /dashboard/events and read its head; read events with `events`."""
    client, conn = await _open(nursery, server, "/dashboard/events", cookie, b"GET", HOST, b"")
    reply = Reply(0, {})
    while not reply.status:
        event = await _next(conn, client)
        if isinstance(event, h11.Response):
            reply.status, reply.headers = event.status_code, dict(event.headers)
    return client, conn, reply


async def events(client: Any, conn: h11.Connection, reply: Reply, count: int) -> None:
    """Read until `reply.events` holds `count` more (event name, data) pairs."""
    want = len(reply.events) + count
    buffer = b""
    while len(reply.events) < want:
        event = await _next(conn, client)
        if isinstance(event, h11.Data):
            buffer += bytes(event.data)
            while b"\n\n" in buffer:
                block, buffer = buffer.split(b"\n\n", 1)
                name, data = "", None
                for line in block.decode().split("\n"):
                    if line.startswith("event: "):
                        name = line[7:]
                    elif line.startswith("data: "):
                        data = json.loads(line[6:])
                if name:
                    reply.events.append((name, data))
        elif not isinstance(event, h11.Response):
            raise AssertionError(f"feed ended: {event}")


async def _open(
    nursery: trio.Nursery,
    server: _Server,
    target: str,
    cookie: str,
    method: bytes,
    host: bytes,
    body: bytes,
) -> tuple[Any, h11.Connection]:
    client, remote = trio.testing.lockstep_stream_pair()

    async def serve() -> None:
        try:
            await server._serve(remote, Conn())
        except Exception:  # as handle_connection: any error ends only this connection
            pass
        finally:
            await trio.aclose_forcefully(remote)

    nursery.start_soon(serve)
    conn = h11.Connection(h11.CLIENT)
    headers = [(b"host", host)]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    if body:
        headers.append((b"content-length", str(len(body)).encode()))
    out = conn.send(h11.Request(method=method, target=target, headers=headers))
    out += conn.send(h11.Data(data=body)) if body else b""
    out += conn.send(h11.EndOfMessage())
    await client.send_all(out)
    return client, conn


async def _next(conn: h11.Connection, client: Any) -> Any:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        try:
            data = await client.receive_some(65536)
        except trio.ClosedResourceError:
            data = b""
        conn.receive_data(data)


async def login(daemon: Any, server: _Server, nursery: trio.Nursery) -> str:
    """The session cookie a one-time link gives ("name=value"); the link works once."""
    link = await daemon.call("dashboard_login")
    assert link["path"].startswith("/dashboard/login?code=")
    reply = await request(nursery, server, link["path"])
    assert reply.status == 303 and reply.headers[b"location"] == b"/dashboard/"
    set_cookie = reply.headers[b"set-cookie"].decode()
    assert "HttpOnly" in set_cookie and "SameSite=Strict" in set_cookie
    again = await request(nursery, server, link["path"])
    assert again.status == 403 and b"login-required" in again.body
    return set_cookie.split(";")[0]
