"""Dark connections (p2p.deadconn): a peer that answers neither a request nor a ping has its
connections dropped, one check at a time; a peer that only answers slowly keeps them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest
import trio

from p2p import deadconn
from p2p.deadconn import DeadConnections
from p2p.host import DARK_MIN_WAIT_S
from p2p.network import NetworkError
from tests.p2p.test_host import Node

SLOW = "/gridmesh/test/slow/1"


class Fake:
    def __init__(self, answers: bool, ping_s: float = 0.1, fail_first: int = 0) -> None:
        self.answers = answers
        self.fail_first = fail_first  # pings that go unanswered before it answers
        self.ping_s = ping_s
        self.pings: list[str] = []
        self.dropped: list[str] = []

    async def ping(self, peer: str) -> float:
        self.pings.append(peer)
        await trio.sleep(self.ping_s)
        if not self.answers or len(self.pings) <= self.fail_first:
            raise trio.TooSlowError
        return 1.0

    async def drop(self, peer: str) -> None:
        self.dropped.append(peer)


async def test_a_peer_that_answers_no_ping_is_dropped_once_per_check(autojump_clock):
    fake = Fake(answers=False)
    dark = DeadConnections(fake.ping, fake.drop)
    async with trio.open_nursery() as nursery:
        for _ in range(3):  # three requests timed out at once: one check
            dark.suspect("p", nursery)
        dark.suspect("q", nursery)
    assert sorted(fake.pings) == ["p", "p", "q", "q"] and sorted(fake.dropped) == ["p", "q"]
    assert dark.dropped == 2
    async with trio.open_nursery() as nursery:  # checked again once the first is over
        dark.suspect("p", nursery)
    assert fake.dropped.count("p") == 2


async def test_a_peer_that_misses_one_ping_but_answers_the_next_keeps_it(autojump_clock):
    fake = Fake(answers=True, fail_first=1)  # a saturated machine: one ping lost
    dark = DeadConnections(fake.ping, fake.drop)
    async with trio.open_nursery() as nursery:
        dark.suspect("p", nursery)
    assert fake.pings == ["p", "p"] and fake.dropped == [] and dark.dropped == 0


async def test_a_peer_heard_from_during_the_check_keeps_it_though_it_misses_every_ping(
    autojump_clock,
):
    """Saturated, not dark: its pings go unanswered but its frames still arrive."""
    fake = Fake(answers=False, ping_s=1.5)
    dark = DeadConnections(fake.ping, fake.drop)
    async with trio.open_nursery() as nursery:
        dark.suspect("p", nursery)
        dark.suspect("q", nursery)
        await trio.sleep(1.0)
        dark.heard("p")  # a frame of p arrives during its check; q stays silent
    assert sorted(fake.pings) == ["p", "p", "q", "q"]
    assert fake.dropped == ["q"] and dark.spared == 1 and dark.dropped == 1
    assert dark.heard_at("p") == 1.0 and dark.heard_at("q") is None  # (liveness reads it)
    async with trio.open_nursery() as nursery:  # the next check of p starts afresh: what
        dark.suspect("p", nursery)  # was heard before it does not spare it
    assert fake.dropped == ["q", "p"]


async def test_what_was_heard_is_bounded(autojump_clock):
    dark = DeadConnections(Fake(answers=True).ping, Fake(answers=True).drop)
    for i in range(deadconn.MAX_HEARD + 10):
        dark.heard(f"p{i}")
    assert dark.heard_at("p0") is None and dark.heard_at(f"p{deadconn.MAX_HEARD + 9}") == 0.0
    assert len(dark._heard) == deadconn.MAX_HEARD


async def test_a_peer_that_answers_the_ping_keeps_its_connection(autojump_clock):
    fake = Fake(answers=True)
    dark = DeadConnections(fake.ping, fake.drop)
    async with trio.open_nursery() as nursery:
        dark.suspect("p", nursery)
    assert fake.pings == ["p"] and fake.dropped == [] and dark.dropped == 0
    dark.suspect("p", None)  # no network running: nothing to do
    assert fake.pings == ["p"]


@asynccontextmanager
async def _slow_pair(handler_s: float) -> AsyncIterator[tuple[Node, Node]]:
    """Two real hosts, b connected to a, a answering SLOW requests after `handler_s`."""
    async with AsyncExitStack() as stack:
        a, b = Node(), Node()
        for node in (a, b):
            await stack.enter_async_context(node.net.run())
        await b.net.connect(a.net.listen_addrs()[0])

        async def slow(sender: str, payload: bytes) -> bytes:
            await trio.sleep(handler_s)
            return payload

        a.net.set_request_handler(SLOW, slow)
        yield a, b


async def test_a_slow_handler_times_a_request_out_but_the_connection_stays():
    """Real hosts: the request times out, the ping is answered, nothing is dropped."""
    async with _slow_pair(3) as (a, b):
        with pytest.raises(NetworkError, match="timed out"):
            await b.net.request(a.ident.peer_id, SLOW, b"x", timeout_s=DARK_MIN_WAIT_S)
        for _ in range(100):  # the check ran (up to 5 s): the ping was answered
            if not b.net.dark._checking:
                break
            await trio.sleep(0.05)
        assert b.net.dark.checks == 1 and b.net.dark.dropped == 0
        assert a.ident.peer_id in b.net.connected_peers()


async def test_a_request_that_gives_up_sooner_than_a_ping_starts_no_check():
    """Real hosts: SWIM's probes wait 80 ms; their timeouts, by the hundred on a loaded
    machine, say nothing of the connection and must not have it checked (and dropped)."""
    async with _slow_pair(2) as (a, b):
        for _ in range(3):
            with pytest.raises(NetworkError, match="timed out"):
                await b.net.request(a.ident.peer_id, SLOW, b"x", timeout_s=0.1)
            # a check is marked as the request gives up (`suspect`), before it pings
            assert not b.net.dark._checking
        assert b.net.dark.checks == 0


async def test_a_real_hosts_answers_and_requests_count_as_heard():
    async with AsyncExitStack() as stack:
        a, b = Node(), Node()
        for node in (a, b):
            await stack.enter_async_context(node.net.run())
        await b.net.connect(a.net.listen_addrs()[0])

        async def echo(sender: str, payload: bytes) -> bytes:
            return payload

        a.net.set_request_handler("/gridmesh/test/echo/1", echo)
        b.net.set_request_handler("/gridmesh/test/echo/1", echo)
        a.net.dark._checking.add(b.ident.peer_id)  # as if a check of each were running
        b.net.dark._checking.add(a.ident.peer_id)
        assert await b.net.request(a.ident.peer_id, "/gridmesh/test/echo/1", b"x") == b"x"
        assert a.ident.peer_id in b.net.dark._heard  # b heard a's answer
        assert b.ident.peer_id in a.net.dark._heard  # a heard b's request
