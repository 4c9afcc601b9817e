"""The testing kit's extra faults: one-way cuts, slow links, skewed clocks."""

from __future__ import annotations

import pytest
import trio

from p2p.network import NetworkError
from p2p.testing.faults import FaultyNetwork, SkewedClock


async def test_a_one_way_cut_drops_one_direction_only(autojump_clock):
    hub = FaultyNetwork(seed=1, latency_s=0.01)
    a, b = hub.add_node("a"), hub.add_node("b")
    arrived: list[str] = []

    async def handler(sender: str, payload: bytes) -> bytes:
        arrived.append(sender)
        return b"ok"

    a.set_request_handler("/p", handler)
    b.set_request_handler("/p", handler)
    hub.block("a", "b")
    assert not hub.reachable("a", "b") and hub.reachable("b", "a")
    with pytest.raises(NetworkError):
        await a.request("b", "/p", b"x", timeout_s=1.0)
    assert arrived == []
    with pytest.raises(NetworkError):  # b's request reaches a; a's answer is cut
        await b.request("a", "/p", b"x", timeout_s=1.0)
    assert arrived == ["b"]
    hub.clear_faults()
    assert await a.request("b", "/p", b"x", timeout_s=1.0) == b"ok"


async def test_a_slow_direction_adds_its_delay(autojump_clock):
    hub = FaultyNetwork(seed=1, latency_s=0.01)
    a, b = hub.add_node("a"), hub.add_node("b")

    async def handler(sender: str, payload: bytes) -> bytes:
        return b"ok"

    b.set_request_handler("/p", handler)
    hub.slow("a", "b", 0.5)
    start = trio.current_time()
    await a.request("b", "/p", b"x")
    assert trio.current_time() - start == pytest.approx(0.52)
    with pytest.raises(ValueError):
        hub.slow("a", "b", -1)


async def test_a_skewed_clock_runs_at_its_rate_from_its_offset(autojump_clock):
    clock = SkewedClock(1.05, -5.0)
    start = clock.now()
    await trio.sleep(10.0)
    assert clock.now() - start == pytest.approx(10.5)
    deadline = clock.now() + 2.1
    await trio.sleep_until(clock.trio_time(deadline))
    assert clock.now() >= deadline
    assert clock.now() - deadline < 1e-6
    with pytest.raises(ValueError):
        SkewedClock(0.0)
