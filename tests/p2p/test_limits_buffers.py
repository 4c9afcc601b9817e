"""Inbound bytes held unread are bounded (p2p.buffers): per stream (yamux's largest window), per
connection and in total. A real peer that ignores yamux flow control and pushes raw DATA
frames into a stream nobody reads is refused past the bound and counted; what the host holds
stays under it, comes back when the stream goes, and an honest peer is still served."""

from __future__ import annotations

import struct
from collections import Counter

import trio
from libp2p.peer.id import ID
from libp2p.stream_muxer.yamux.yamux import HEADER_SIZE, TYPE_DATA, YAMUX_HEADER_FORMAT

from p2p.buffers import BoundedBuffer, BoundedBuffers, BufferBudget, BufferLimitError
from p2p.host import HostLimits
from tests.p2p.test_gossip_validator import _node, _running, _until

HOLD = "/gridmesh/hold/1.0.0"
ECHO = "/gridmesh/test/echo/1"
MiB = 1 << 20


async def _echo(sender: str, payload: bytes) -> bytes:
    return payload


def _budget(rejects: Counter[str], **bounds: int) -> tuple[BufferBudget, list[tuple[str, str]]]:
    penalties: list[tuple[str, str]] = []
    budget = BufferBudget(
        bounds.get("per_connection", 100),
        bounds.get("total", 150),
        lambda source, reason: rejects.update([f"{source}:{reason}"]),
        lambda peer, reason: penalties.append((peer, reason)),
        per_stream=bounds.get("per_stream", 60),
    )
    return budget, penalties


def _refused(buffer: BoundedBuffer, data: bytes) -> bool:
    try:
        buffer.extend(data)
    except BufferLimitError:
        return True
    return False


def test_buffers_count_what_they_hold_and_refuse_past_each_bound():
    rejects: Counter[str] = Counter()
    budget, penalties = _budget(rejects)

    class Conn:
        stream_buffers: dict = {0: bytearray(b"early")}  # noqa: RUF012

    conn, other = Conn(), Conn()
    other.stream_buffers = {}
    assert budget.install(conn, "a") and budget.install(other, "b")
    assert not budget.install(conn, "a")  # once
    buffers = conn.stream_buffers
    assert isinstance(buffers, BoundedBuffers) and type(buffers[0]) is bytearray
    buffers[1] = bytearray()
    first = buffers[1]
    first.extend(b"x" * 50)
    assert budget.held == 50 and buffers.held == 50
    assert _refused(first, b"x" * 11)  # past one stream's bound
    assert budget.held == 0  # the broken stream's bytes are given back at once
    assert _refused(first, b"x")  # and it takes nothing more, uncounted
    assert rejects["stream:window_exceeded"] == 1 and penalties == [("a", "rate_limited")]
    buffers[2], buffers[3], buffers[5] = bytearray(), bytearray(), bytearray()
    buffers[2].extend(b"y" * 55)
    buffers[3].extend(b"y" * 45)
    assert _refused(buffers[5], b"y")  # past the connection's 100
    assert rejects["stream:connection_buffer_limit"] == 1
    assert penalties[-1] == ("a", "malformed") and budget.held == 100
    second = buffers[2]
    del second[:15]  # read
    assert budget.held == 85 and buffers.held == 85
    other.stream_buffers[1] = bytearray()
    other.stream_buffers[1].extend(b"z" * 60)
    other.stream_buffers[2] = bytearray()
    assert _refused(other.stream_buffers[2], b"z" * 6)  # past the host's 150
    assert rejects["stream:buffer_limit"] == 1 and len(penalties) == 2  # not its fault
    buffers.pop(2)  # dropped unread: given back
    del buffers[3]
    assert buffers.held == 0 and budget.held == 60
    other.stream_buffers.clear()
    assert budget.held == 0
    assert _refused(second, b"late")  # a dropped buffer takes nothing more


def _unread(net) -> int:
    """Bytes in every yamux stream buffer of `net`, measured, not as the budget counts them."""
    swarm = net.host.get_network()
    return sum(
        len(buffer)
        for conns in swarm.connections.values()
        for conn in conns
        for buffer in getattr(conn.muxed_conn, "stream_buffers", {}).values()
    )


async def _flood(
    target_limits: HostLimits, total: int, frame: int = 256 << 10
) -> tuple[Counter[str], int, int]:
    """A peer pushes `total` bytes in raw yamux DATA frames, ignoring the receive window,
    into a stream whose handler never reads; returns (rejects, most held, held after)."""
    rejects: Counter[str] = Counter()
    target, attacker, honest = _node(rejects, target_limits), _node(Counter()), _node(Counter())
    release = trio.Event()

    async def hold(stream) -> None:
        await release.wait()

    target.set_stream_handler(HOLD, hold)
    target.set_request_handler(ECHO, _echo)
    most = 0
    async with _running(target, attacker, honest):
        await attacker.connect(target.listen_addrs()[0])
        await honest.connect(target.listen_addrs()[0])
        target_id = ID.from_base58(target.peer_id)
        stream = await attacker.host.new_stream(target_id, [target.scope.protocol(HOLD)])
        await stream.write(b"hello")
        muxed = stream.muxed_conn
        stream_id = stream.muxed_stream.stream_id
        chunk = b"\0" * frame
        for _ in range(total // frame):  # past every window it was granted
            header = struct.pack(YAMUX_HEADER_FORMAT, 0, TYPE_DATA, 0, stream_id, frame)
            assert len(header) == HEADER_SIZE
            await muxed._write_frame(header + chunk)
            most = max(most, _unread(target))
        await _until(lambda: target.inbound.refused >= 1, 10, "the flood refused")
        most = max(most, _unread(target))
        # the honest peer is still served
        assert await honest.request(target.peer_id, ECHO, b"hi", timeout_s=5) == b"hi"
        release.set()  # the stream's handler ends: its buffer goes
        await _until(lambda: target.inbound.held < MiB, 10, "the bytes given back")
        return rejects, most, target.inbound.held


async def test_a_peer_past_its_connections_bound_is_refused_and_held_down():
    limits = HostLimits(max_buffered_bytes_per_connection=4 * MiB)
    rejects, most, after = await _flood(limits, 24 * MiB)
    assert rejects["stream:connection_buffer_limit"] == 1
    assert most <= 4 * MiB, most
    assert after < MiB


async def test_a_stream_past_the_largest_window_is_refused():
    limits = HostLimits(max_buffered_bytes_per_connection=64 * MiB)
    rejects, most, _ = await _flood(limits, 24 * MiB)
    assert rejects["stream:window_exceeded"] == 1
    assert most <= 16 * MiB + (256 << 10), most
