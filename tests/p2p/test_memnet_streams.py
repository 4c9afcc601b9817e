"""The in-memory network beyond requests, gossip and the DHT: streams, request timeouts,
connections and peer tracking (the conformance suite covers the common contract; these
check what is particular to the simulation), on trio's virtual clock."""

from __future__ import annotations

import pytest
import trio

from p2p.network import NetworkError, PeerState, StreamClosed, StreamReset
from p2p.streams import stream_pair
from p2p.testing.memnet import MemoryNetwork

PROTOCOL = "/test/stream/1"


async def echo(stream) -> None:
    while True:
        try:
            frame = await stream.receive()
        except NetworkError:
            return
        await stream.send(frame)


async def test_opening_a_stream_costs_a_round_trip_and_counts(autojump_clock):
    hub = MemoryNetwork(latency_s=0.05)
    a, b = hub.add_node("a"), hub.add_node("b")
    b.set_stream_handler(PROTOCOL, echo)
    started = trio.current_time()
    stream = await a.open_stream("b", PROTOCOL)
    assert trio.current_time() - started == pytest.approx(0.1)
    assert hub.streams_opened == 1
    await stream.send(b"hi")
    assert await stream.receive() == b"hi"
    assert "b" in a.connected_peers() and "a" in b.connected_peers()


async def test_a_dead_machine_leaves_its_streams_silent_and_stops_its_handlers(autojump_clock):
    hub = MemoryNetwork()
    a, b = hub.add_node("a"), hub.add_node("b")
    stopped = trio.Event()

    async def handler(stream) -> None:
        try:
            await echo(stream)
        finally:
            stopped.set()

    b.set_stream_handler(PROTOCOL, handler)
    stream = await a.open_stream("b", PROTOCOL)
    hub.remove_node("b")  # no refuse: the machine is gone, nothing tells us
    await stopped.wait()
    with trio.move_on_after(60) as scope:
        await stream.receive()
    assert scope.cancelled_caught  # silence: only a deadline notices
    with trio.move_on_after(60) as scope:
        await a.open_stream("b", PROTOCOL)
    assert scope.cancelled_caught


async def test_a_killed_process_resets_its_streams(autojump_clock):
    hub = MemoryNetwork()
    a, b = hub.add_node("a"), hub.add_node("b")
    b.set_stream_handler(PROTOCOL, echo)
    stream = await a.open_stream("b", PROTOCOL)
    hub.remove_node("b", refuse=True)
    with pytest.raises(StreamReset):
        await stream.receive()
    with pytest.raises(NetworkError, match="refused"):
        await a.open_stream("b", PROTOCOL)


async def test_streams_wait_for_a_slow_reader(autojump_clock):
    hub = MemoryNetwork()
    hub.stream_capacity = 2
    a, b = hub.add_node("a"), hub.add_node("b")
    release = trio.Event()

    async def slow(stream) -> None:
        await release.wait()
        await echo(stream)

    b.set_stream_handler(PROTOCOL, slow)
    stream = await a.open_stream("b", PROTOCOL)
    await stream.send(b"1")
    await stream.send(b"2")
    with trio.move_on_after(10) as scope:
        await stream.send(b"3")
    assert scope.cancelled_caught  # two frames buffered: the third waits
    release.set()
    await stream.send(b"3")
    assert [await stream.receive() for _ in range(3)] == [b"1", b"2", b"3"]


async def test_a_handler_that_raises_is_counted_and_resets_its_stream(autojump_clock):
    hub = MemoryNetwork()
    a, b = hub.add_node("a"), hub.add_node("b")

    async def broken(stream) -> None:
        raise ValueError("bug")

    b.set_stream_handler(PROTOCOL, broken)
    stream = await a.open_stream("b", PROTOCOL)
    with pytest.raises(StreamReset):
        await stream.receive()
    assert b.stream_handler_errors == 1


async def test_request_timeout_is_virtual_and_handler_timeout_fails_the_request(autojump_clock):
    hub = MemoryNetwork(latency_s=0.01)
    a, b = hub.add_node("a"), hub.add_node("b")

    async def slow(sender: str, payload: bytes) -> bytes:
        await trio.sleep(30)
        return b"late"

    b.set_request_handler("/slow", slow)
    started = trio.current_time()
    with pytest.raises(NetworkError, match="timed out"):
        await a.request("b", "/slow", b"x", timeout_s=3)
    assert trio.current_time() - started == pytest.approx(3)
    b.set_request_handler("/slow", slow, timeout_s=1)
    started = trio.current_time()
    with pytest.raises(NetworkError, match="failed"):
        await a.request("b", "/slow", b"x")
    assert trio.current_time() - started == pytest.approx(1.02)


async def test_connect_by_address_ping_and_peer_tracking(autojump_clock):
    hub = MemoryNetwork(latency_s=0.02)
    a, b = hub.add_node("a"), hub.add_node("b")
    assert b.listen_addrs() == ["/p2p/b"]
    assert await a.connect(b.listen_addrs()[0]) == "b"
    assert a.peer_addrs("b") == ["/p2p/b"] and a.peer_addrs("nobody") == []
    assert await a.ping("b") == pytest.approx(40.0)
    async with a.run(), trio.open_nursery() as nursery:
        nursery.start_soon(a.track_peers, 5.0)
        await trio.sleep(1)
        state = a.peers["b"]
        assert isinstance(state, PeerState) and state.rtt_ms == pytest.approx(40.0)
        hub.partition([{"a"}, {"b"}])
        await trio.sleep(20)
        assert a.peers["b"].rtt_ms is None and a.peers["b"].missed_pings >= 2
        assert "b" in a.connected_peers()  # silent, not gone
        hub.remove_node("b")
        assert "b" not in a.connected_peers()
        nursery.cancel_scope.cancel()
    with pytest.raises(NetworkError):
        await a.ping("nobody")


async def test_keep_connected_redials_with_backoff(autojump_clock):
    hub = MemoryNetwork()
    a = hub.add_node("a")
    connected: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.keep_connected, "/p2p/b", 1.0, 8.0, connected.append)
        await trio.sleep(30)
        assert connected == []  # nobody there yet
        hub.add_node("b")
        await trio.sleep(10)
        assert connected == ["b"]
        nursery.cancel_scope.cancel()


async def test_stream_pair_half_close_and_frame_bound():
    a_end, b_end = stream_pair("a", "b", max_frame_bytes=(None, 4))
    await a_end.send(b"1234")
    await a_end.close_write()
    assert await b_end.receive() == b"1234"
    with pytest.raises(StreamClosed):
        await b_end.receive()
    await b_end.send(b"back")  # the other direction is still open
    assert await a_end.receive() == b"back"
    a_end, b_end = stream_pair("a", "b", max_frame_bytes=(None, 4))
    await a_end.send(b"12345")
    with pytest.raises(NetworkError, match="exceeds"):
        await b_end.receive()
    with pytest.raises(StreamReset):
        await a_end.send(b"x")
