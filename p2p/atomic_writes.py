"""Whole-frame writes on libp2p connections: a deadline never cuts a frame in two, and never
waits on a peer that stopped reading.

py-libp2p 0.8.1's Yamux writes a frame through Noise, which encrypts each message with the
connection's next nonce and then sends it. A trio deadline that fires after the encryption
(at the send's first checkpoint, or between the Noise messages of a frame over 64 KiB)
leaves the peer a nonce behind or with half a frame: it fails to authenticate the next
message and drops the connection, and with it every stream to that peer. Deadlines around
writes are everywhere (request timeouts, sync rounds, chained pushes), so under load
connections died in the middle of a deploy.

So each connection's frames are written, whole and in the order they were given, by a writer
task of its own (`_Writer`, started on the first frame and gone after `IDLE_S` without one).
A caller waits for its frame to be written, but that wait is cancellable: a caller whose
deadline passes leaves at once, and its frame is still written whole behind it. (Before, the
write itself was shielded: a peer that stopped reading held every caller that wrote to it,
whatever its deadline, for `WRITE_TIMEOUT_S`: a lookup or a record put that included a
hostile peer stalled for that long.) A peer that reads nothing for `WRITE_TIMEOUT_S` has its
connection closed, since part of a frame may be on the wire; the frames queued behind fail.
"""

from __future__ import annotations

import math
from typing import Any

import trio
from libp2p.network.connection.exceptions import RawConnError
from libp2p.stream_muxer.yamux.yamux import Yamux

WRITE_TIMEOUT_S = 30.0
IDLE_S = 10.0  # a connection's writer task ends after this long without a frame


class _Frame:
    __slots__ = ("data", "done", "error")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.done = trio.Event()
        self.error: BaseException | None = None


class _Writer:
    """The frames of one connection, written in order by one task (spawned as a system task:
    it must outlive the caller that started it, whose frame it may still be writing)."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self._send, self._receive = trio.open_memory_channel[_Frame](math.inf)
        self._running = False
        self._broken: BaseException | None = None

    async def write(self, data: bytes) -> None:
        if self._broken is not None:
            raise self._broken
        frame = _Frame(data)
        self._send.send_nowait(frame)  # (unbounded: each caller holds one frame)
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name=f"gridmesh frame writer {id(self)}")
        await frame.done.wait()  # cancellable: the frame is written all the same
        if frame.error is not None:
            raise frame.error

    async def _run(self) -> None:
        try:
            while True:
                frame: _Frame | None = None
                with trio.move_on_after(IDLE_S):  # (the wait only: never around a write)
                    frame = await self._receive.receive()
                if frame is None:
                    try:  # idle: end, unless a frame came in meanwhile (no await between)
                        frame = self._receive.receive_nowait()
                    except trio.WouldBlock:
                        return
                await self._write(frame)
        finally:
            self._running = False
            self._fail_queued()

    async def _write(self, frame: _Frame) -> None:
        try:
            if self._broken is not None:
                raise self._broken
            async with self._conn._write_lock:  # (py-libp2p's, should it write on its own)
                with trio.move_on_after(WRITE_TIMEOUT_S) as slow:
                    await self._conn.secured_conn.write(frame.data)
            if slow.cancelled_caught:
                self._broken = RawConnError(
                    f"a frame could not be written in {WRITE_TIMEOUT_S:g} s"
                )
                with trio.move_on_after(1):
                    await self._conn.secured_conn.close()
                raise self._broken
        except Exception as exc:  # the caller's to see; the writer goes on (failing fast)
            frame.error = exc
            if self._broken is None:
                self._broken = exc
        finally:
            frame.done.set()

    def _fail_queued(self) -> None:
        """Frames left when the task ended (cancelled with the run): none waits for ever."""
        while True:
            try:
                frame = self._receive.receive_nowait()
            except trio.WouldBlock:
                return
            frame.error = self._broken or RawConnError("the connection's writer stopped")
            frame.done.set()


async def _write_whole_frame(self: Yamux, data: bytes) -> None:
    writer = self.__dict__.get("_gridmesh_writer")
    if writer is None:
        writer = self.__dict__["_gridmesh_writer"] = _Writer(self)
    await writer.write(data)  # (a checkpoint: it waits for the writer task)


def install() -> None:
    """Make every Yamux connection write whole frames (idempotent)."""
    Yamux._write_frame = _write_whole_frame  # type: ignore[method-assign]
