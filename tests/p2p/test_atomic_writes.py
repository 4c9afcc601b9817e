"""p2p.atomic_writes on a scripted connection and trio's virtual clock: frames go out whole
and in order, a caller's deadline frees the caller (not the frame), and a peer that stops
reading has its connection closed."""

from __future__ import annotations

import pytest
import trio
from libp2p.network.connection.exceptions import RawConnError

from p2p import atomic_writes
from p2p.atomic_writes import IDLE_S, WRITE_TIMEOUT_S, _write_whole_frame


class _Secured:
    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.draining = trio.Event()  # writes block until the peer reads
        self.draining.set()
        self.closed = False

    async def write(self, data: bytes) -> None:
        await self.draining.wait()
        await trio.sleep(0.01)  # a frame takes a little time on the wire
        self.written.append(data)

    async def close(self) -> None:
        self.closed = True


class _Conn:
    def __init__(self) -> None:
        self.secured_conn = _Secured()
        self._write_lock = trio.Lock()


async def test_frames_go_out_whole_in_call_order(autojump_clock):
    conn = _Conn()
    async with trio.open_nursery() as nursery:
        for i in range(5):
            nursery.start_soon(_write_whole_frame, conn, b"%d" % i)
            await trio.sleep(0.001)  # each call is made (and queued) before the next
    assert conn.secured_conn.written == [b"0", b"1", b"2", b"3", b"4"]


async def test_a_deadline_frees_the_caller_and_its_frame_still_goes_out_whole(autojump_clock):
    conn = _Conn()
    conn.secured_conn.draining = trio.Event()  # the peer stopped reading
    started = trio.current_time()
    with trio.move_on_after(1.0) as waited:
        await _write_whole_frame(conn, b"first")
    assert waited.cancelled_caught and trio.current_time() - started == pytest.approx(1.0)
    assert conn.secured_conn.written == []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_write_whole_frame, conn, b"second")
        await trio.sleep(2.0)
        conn.secured_conn.draining.set()  # it reads again: both go out, in order
    assert conn.secured_conn.written == [b"first", b"second"]
    assert not conn.secured_conn.closed


async def test_a_peer_that_reads_nothing_has_its_connection_closed(autojump_clock):
    conn = _Conn()
    conn.secured_conn.draining = trio.Event()  # never set
    failures: list[str] = []

    async def write(data: bytes) -> None:
        try:
            await _write_whole_frame(conn, data)
        except RawConnError as exc:
            failures.append(str(exc))

    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(write, b"stuck")
        nursery.start_soon(write, b"queued behind")
    assert trio.current_time() - started == pytest.approx(WRITE_TIMEOUT_S, abs=0.1)
    assert conn.secured_conn.closed and len(failures) == 2
    with pytest.raises(RawConnError):  # a broken connection fails fast from then on
        await _write_whole_frame(conn, b"later")
    assert trio.current_time() - started == pytest.approx(WRITE_TIMEOUT_S, abs=0.1)


async def test_the_writer_task_ends_when_idle_and_comes_back(autojump_clock):
    conn = _Conn()
    await _write_whole_frame(conn, b"a")
    writer = conn.__dict__["_gridmesh_writer"]
    assert writer._running
    await trio.sleep(IDLE_S + 1)
    assert not writer._running
    await _write_whole_frame(conn, b"b")
    assert writer._running and conn.secured_conn.written == [b"a", b"b"]


def test_install_patches_yamux():
    from libp2p.stream_muxer.yamux.yamux import Yamux

    atomic_writes.install()
    assert Yamux._write_frame is _write_whole_frame


async def test_a_frame_given_just_before_the_writer_idles_out_is_written_whole(autojump_clock):
    """The idle timer bounds the wait for a frame, never a write: a write cut by it would
    leave the peer half a frame (and the caller told it was written)."""
    conn = _Conn()
    await _write_whole_frame(conn, b"a")
    await trio.sleep(IDLE_S - 0.005)  # the frame's write (0.01 s) outlasts the idle timer
    await _write_whole_frame(conn, b"b")
    assert conn.secured_conn.written == [b"a", b"b"]
