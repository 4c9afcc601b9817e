"""Length-prefixed frames over py-libp2p streams, and `FramedStream`: a libp2p stream as a
`p2p.network.Stream` (bounded frames with deadlines, half-close, reset)."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from typing import Any

import trio
from libp2p.network.stream.exceptions import StreamEOF as _Libp2pStreamEOF
from libp2p.network.stream.exceptions import StreamReset as _Libp2pStreamReset

from p2p import localsock
from p2p.limits import RejectHook
from p2p.network import FrameBound, NetworkError, StreamClosed, StreamReset

MAX_FRAME_BYTES = 4 << 20  # the longest request or response
_LEN = struct.Struct(">I")

# A frame that has begun must finish within FRAME_DEADLINE_S plus its length at
# FRAME_MIN_BYTES_PER_S: the rule of the local socket (p2p.localsock), for libp2p streams too.
FRAME_DEADLINE_S = localsock.FRAME_TIMEOUT_S
FRAME_MIN_BYTES_PER_S = localsock.FRAME_BYTES_PER_S


class FrameDeadlineError(NetworkError):
    """A frame began but did not finish within its deadline (a trickling or stalled peer)."""

    reason = "frame_deadline"


class FrameTooLargeError(NetworkError):
    """A frame's length prefix is over the receiver's bound. Peers running our code know the
    bounds, so it is garbage: held against the sender's score (`FramedStream`, p2p.guard)."""

    reason = "frame_too_large"


frame_time_limit_s = localsock.frame_time_limit_s


async def read_frame(
    stream: Any,
    max_bytes: FrameBound = MAX_FRAME_BYTES,
    *,
    deadline_s: float = FRAME_DEADLINE_S,
    min_bytes_per_s: float = FRAME_MIN_BYTES_PER_S,
) -> bytes:
    """The next length-prefixed frame: at most `max_bytes` (refused from its prefix), and
    finished within `frame_time_limit_s(length)` of its first byte, else FrameDeadlineError.

    Waiting for a frame's first byte is not bounded here (idle streams are the caller's
    business); once a peer has begun a frame it cannot hold the read, and the bytes buffered
    so far, open by trickling or stopping.
    """
    head = await stream.read(_LEN.size)  # returns what has arrived: 1 to 4 bytes
    if not head:
        raise StreamClosed("stream closed")
    begun = trio.current_time()
    limit = max_bytes() if callable(max_bytes) else max_bytes  # what we take may have changed
    with trio.move_on_at(begun + deadline_s) as scope:
        if len(head) < _LEN.size:
            head += await _read_exactly(stream, _LEN.size - len(head))
        (length,) = _LEN.unpack(head)
        if length > limit:
            raise FrameTooLargeError(f"frame of {length} bytes exceeds the limit of {limit}")
        scope.deadline = begun + frame_time_limit_s(length, deadline_s, min_bytes_per_s)
        return await _read_exactly(stream, length)
    waited = trio.current_time() - begun
    raise FrameDeadlineError(f"a frame was not finished within {waited:.1f} s of its first byte")


async def write_frame(stream: Any, payload: bytes) -> None:
    if len(payload) > MAX_FRAME_BYTES:
        raise NetworkError(f"frame of {len(payload)} bytes exceeds the limit")
    await stream.write(_LEN.pack(len(payload)) + payload)


async def _read_exactly(stream: Any, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        try:
            chunk = await stream.read(remaining)
        except _Libp2pStreamEOF:  # an end inside a frame is no orderly end (StreamClosed)
            chunk = b""
        if not chunk:
            raise NetworkError("stream closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class FramedStream:
    """A libp2p stream carrying length-prefixed frames (the `p2p.network.Stream` protocol).

    Each frame is bounded by `max_frame_bytes` (asked per frame when it is a function) and
    must finish within `frame_time_limit_s` of its first byte: a stream whose peer misses
    that is reset and counted (`stream`/`frame_deadline` on the reject hook).
    """

    def __init__(
        self,
        stream: Any,
        peer_id: str,
        max_frame_bytes: FrameBound,
        *,
        on_reject: RejectHook | None = None,
        on_frame: Callable[[str], None] | None = None,
        on_garbage: Callable[[str], None] | None = None,
        frame_deadline_s: float = FRAME_DEADLINE_S,
        min_bytes_per_s: float = FRAME_MIN_BYTES_PER_S,
    ) -> None:
        self._stream = stream
        self._on_frame = on_frame or (lambda peer_id: None)  # a frame of the peer arrived
        self._on_garbage = on_garbage or (lambda peer_id: None)  # it sent garbage (scored)
        self._max = max_frame_bytes
        self._on_reject = on_reject or (lambda source, reason: None)
        self._deadline_s = frame_deadline_s
        self._min_bytes_per_s = min_bytes_per_s
        self.peer_id = peer_id

    def misbehaved(self) -> None:
        """The peer sent what its protocol refuses as garbage (a frame that does not decode):
        held against its score, so its bytes are read more slowly (p2p.inbound) and, kept
        up, it is banned. Optional on other streams: callers look it up with getattr."""
        self._on_garbage(self.peer_id)

    async def send(self, frame: bytes) -> None:
        try:
            await self._stream.write(_LEN.pack(len(frame)) + frame)
        except Exception as exc:
            raise NetworkError(f"stream to {self.peer_id} broke: {exc!r}") from exc

    async def receive(self) -> bytes:
        try:
            frame = await read_frame(
                self._stream,
                self._max,
                deadline_s=self._deadline_s,
                min_bytes_per_s=self._min_bytes_per_s,
            )
            self._on_frame(self.peer_id)
            return frame
        except FrameDeadlineError as exc:
            self._on_reject("stream", exc.reason)
            await self.reset()
            error = FrameDeadlineError(f"stream from {self.peer_id}: {exc}")
            error._gridmesh_counted = True  # type: ignore[attr-defined]  # the guard: not again
            raise error from None
        except FrameTooLargeError as exc:
            self.misbehaved()
            exc._gridmesh_scored = True  # type: ignore[attr-defined]  # the guard: not again
            raise
        except NetworkError:
            raise
        except _Libp2pStreamEOF:
            raise StreamClosed(f"stream from {self.peer_id} ended") from None
        except _Libp2pStreamReset:
            raise StreamReset(f"stream from {self.peer_id} was reset") from None
        except Exception as exc:
            raise NetworkError(f"stream from {self.peer_id} broke: {exc!r}") from exc

    async def close_write(self) -> None:
        """Half-close (a yamux FIN): the peer reads to the end; we may still receive."""
        with contextlib.suppress(Exception):
            await self._stream.close_write()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.close()

    async def reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.reset()
