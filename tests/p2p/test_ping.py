"""Pings between two real libp2p hosts (p2p.ping): overlapping pings to one peer are all
answered (py-libp2p's own client failed every ping that overlapped another, and liveness took
busy honest peers for gone), a cancelled ping spoils nothing, and a peer that answers wrong,
late or never fails only its own ping."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio
from libp2p.host.ping import ID as PING_PROTOCOL

from p2p.ping import PingMismatch
from tests.p2p.test_host import Node


@pytest.fixture
async def pair():
    async with AsyncExitStack() as stack:
        a, b = Node(), Node()
        for node in (a, b):
            await stack.enter_async_context(node.net.run())
        await b.net.connect(a.net.listen_addrs()[0])
        yield a, b


def _inbound_ping_streams(node: Node) -> int:
    """The ping streams `node`'s responder (py-libp2p's, behind our stream guard) serves."""
    return node.net._guard.open_by_protocol.get(str(PING_PROTOCOL), 0)


async def _responder_lets_go(node: Node) -> None:
    with trio.fail_after(5):
        while _inbound_ping_streams(node):  # (no event to wait on: polled)  # noqa: ASYNC110
            await trio.sleep(0.01)


async def test_overlapping_pings_to_one_peer_are_all_answered(pair):
    a, b = pair
    answered: list[float] = []

    async def ping() -> None:
        answered.append(await b.net.ping(a.ident.peer_id))

    for _ in range(10):  # liveness, peer tracking and a dead-connection check at once
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(ping)
    assert len(answered) == 40 and all(rtt >= 0 for rtt in answered)
    await _responder_lets_go(a)  # every stream was closed, none left to the idle timeout
    assert not b.net._pinger._turns  # nothing kept per peer once no ping is under way


async def test_a_cancelled_ping_spoils_nothing(pair):
    a, b = pair
    for deadline in (0, 0.0001, 0.0005, 0.001, 0.002, 0.005):
        with trio.move_on_after(deadline):
            await b.net.ping(a.ident.peer_id)
    await _responder_lets_go(a)  # the cancelled pings' streams were reset
    for _ in range(5):
        assert await b.net.ping(a.ident.peer_id) >= 0


async def test_a_peer_that_answers_wrong_late_or_never_fails_only_its_ping(pair):
    a, b = pair
    mode = {"now": "wrong"}

    async def hostile(stream) -> None:
        got = await stream.read(32)
        if mode["now"] == "wrong":
            await stream.write(bytes(b ^ 0xFF for b in got))
        elif mode["now"] == "short":
            await stream.write(got[:7])
            await stream.close()
        else:  # never: read, and hold the stream
            await trio.sleep_forever()

    honest = a.net.host.get_mux().handlers[PING_PROTOCOL]
    a.net.host.set_stream_handler(PING_PROTOCOL, hostile)
    with pytest.raises(PingMismatch):
        await b.net.ping(a.ident.peer_id)
    mode["now"] = "short"
    with pytest.raises(Exception):  # noqa: B017  (an incomplete read, however py-libp2p says it)
        await b.net.ping(a.ident.peer_id)
    mode["now"] = "never"
    with pytest.raises(trio.TooSlowError):
        await b.net.ping(a.ident.peer_id)  # bounded by the host's ping timeout

    # b is unharmed: its other requests to a still work, and a well-behaved a answers again
    async def echo(sender: str, payload: bytes) -> bytes:
        return payload

    a.net.set_request_handler("/gridmesh/test/echo/1", echo)
    assert await b.net.request(a.ident.peer_id, "/gridmesh/test/echo/1", b"ok") == b"ok"
    a.net.host.set_stream_handler(PING_PROTOCOL, honest)
    assert await b.net.ping(a.ident.peer_id) >= 0
