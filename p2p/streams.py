"""In-process streams: two connected ends of a `p2p.network.Stream`, on trio memory channels.

For a daemon talking to itself (a shard client reaching its own shard server: libp2p cannot
dial itself) and, through `p2p.testing.memnet`, for the streams of the in-memory network.
Each direction holds at most `capacity` frames (0: a send waits for the receiver), so a
sender that outruns its reader waits, as on a real transport.
"""

from __future__ import annotations

import trio

from p2p.network import FrameBound, NetworkError, StreamClosed, StreamReset, frame_limit


class _Link:
    """What both ends of one stream share: whether either reset it."""

    __slots__ = ("reset",)

    def __init__(self) -> None:
        self.reset = False


class ChannelStream:
    """One end of an in-memory stream; `peer_id` is the other end's peer."""

    def __init__(
        self,
        peer_id: str,
        send: trio.MemorySendChannel[bytes],
        receive: trio.MemoryReceiveChannel[bytes],
        link: _Link | None = None,
        *,
        max_frame_bytes: FrameBound | None = None,
    ) -> None:
        self.peer_id = peer_id
        self._send, self._receive = send, receive
        self._link = link or _Link()
        self.max_frame_bytes = max_frame_bytes  # None: unbounded (a stream to ourselves)

    def _broken(self, verb: str) -> NetworkError:
        if self._link.reset:
            return StreamReset(f"stream {verb} {self.peer_id} was reset")
        return NetworkError(f"stream {verb} {self.peer_id} closed")

    async def send(self, frame: bytes) -> None:
        if self._link.reset:
            raise self._broken("to")
        try:
            await self._send.send(frame)
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise self._broken("to") from exc

    async def receive(self) -> bytes:
        if self._link.reset:
            raise self._broken("from")
        try:
            frame = await self._receive.receive()
        except trio.EndOfChannel:
            if self._link.reset:
                raise self._broken("from") from None
            raise StreamClosed(f"stream from {self.peer_id} ended") from None
        except (trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise self._broken("from") from exc
        if self.max_frame_bytes is not None:
            limit = frame_limit(self.max_frame_bytes)
            if len(frame) > limit:
                await self.reset()
                raise NetworkError(f"frame of {len(frame)} bytes exceeds the limit of {limit}")
        return frame

    async def close_write(self) -> None:
        await self._send.aclose()

    async def close(self) -> None:
        """Half-close: the peer reads what was sent, then `StreamClosed`. (What the peer
        sends afterwards stays unread; a reset or the peer's own close ends it.)"""
        await self._send.aclose()

    async def reset(self) -> None:
        self.abort()
        await trio.lowlevel.checkpoint()

    def abort(self) -> None:
        """Break both directions at once, as a killed process would: the other end's
        sends and receives fail."""
        self._link.reset = True
        self._send.close()
        self._receive.close()


def stream_pair(
    a_id: str,
    b_id: str,
    capacity: int = 8,
    *,
    max_frame_bytes: tuple[FrameBound | None, FrameBound | None] = (None, None),
) -> tuple[ChannelStream, ChannelStream]:
    """Two connected stream ends: the first is `a`'s end (its peer is `b`), then `b`'s.
    `max_frame_bytes`: the longest frame each end takes (None: any)."""
    a_to_b_send, a_to_b_recv = trio.open_memory_channel[bytes](capacity)
    b_to_a_send, b_to_a_recv = trio.open_memory_channel[bytes](capacity)
    link = _Link()
    a_end = ChannelStream(b_id, a_to_b_send, b_to_a_recv, link, max_frame_bytes=max_frame_bytes[0])
    b_end = ChannelStream(a_id, b_to_a_send, a_to_b_recv, link, max_frame_bytes=max_frame_bytes[1])
    return a_end, b_end
