"""Whole-frame writes on libp2p connections: a deadline never cuts a frame in two.

py-libp2p 0.8.1's Yamux writes a frame through Noise, which encrypts each message with the
connection's next nonce and then sends it. A trio deadline that fires after the encryption
(at the send's first checkpoint, or between the Noise messages of a frame over 64 KiB)
leaves the peer a nonce behind or with half a frame: it fails to authenticate the next
message and drops the connection, and with it every stream to that peer. Deadlines around
writes are everywhere (request timeouts, sync rounds, chained pushes), so under load
connections died in the middle of a deploy.

Here a frame, once its turn to be written has come, is written whole even when its writer
is cancelled (waiting for that turn stays cancellable, and nothing is encrypted before it).
A peer that reads nothing for `WRITE_TIMEOUT_S` cannot hold a writer forever: the
connection is closed instead, since part of the frame may be on the wire.
"""

from __future__ import annotations

import trio
from libp2p.network.connection.exceptions import RawConnError
from libp2p.stream_muxer.yamux.yamux import Yamux

WRITE_TIMEOUT_S = 30.0


async def _write_whole_frame(self: Yamux, data: bytes) -> None:
    async with self._write_lock:
        with trio.CancelScope(shield=True):
            with trio.move_on_after(WRITE_TIMEOUT_S) as slow:
                await self.secured_conn.write(data)
            if slow.cancelled_caught:
                with trio.move_on_after(1):
                    await self.secured_conn.close()
                raise RawConnError(f"a frame could not be written in {WRITE_TIMEOUT_S:g} s")
    await trio.lowlevel.checkpoint()


def install() -> None:
    """Make every Yamux connection write whole frames (idempotent)."""
    Yamux._write_frame = _write_whole_frame  # type: ignore[method-assign]
