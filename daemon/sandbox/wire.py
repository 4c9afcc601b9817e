"""The wire between the daemon and a worker: msgpack messages in frames of a 4-byte
big-endian length and the body, over a pair of pipes. Every frame is bounded: a writer
refuses to send a body over its limit, a reader refuses a header that announces one before
reading it (so a hostile worker cannot make the daemon buffer 100 MiB)."""

from __future__ import annotations

import os
import struct
from typing import Any, Protocol

import msgpack

from daemon.sandbox.errors import MessageTooLarge, WorkerCrashed

HEADER = struct.Struct(">I")


def encode(message: Any, limit: int, what: str = "message") -> bytes:
    """One frame holding `message`; MessageTooLarge if its body is over `limit` bytes."""
    try:
        body = msgpack.packb(message, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(f"{what} cannot be sent as msgpack: {exc}") from None
    if len(body) > limit:
        raise MessageTooLarge(f"{what} is {len(body)} bytes, over the limit of {limit}")
    return HEADER.pack(len(body)) + body


def decode(body: bytes) -> Any:
    """The message in a frame's body (msgpack bounds its nesting itself)."""
    return msgpack.unpackb(body, raw=False, strict_map_key=False)


def body_length(header: bytes, limit: int, what: str = "message") -> int:
    """The body length a header announces; MessageTooLarge if over `limit`."""
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise MessageTooLarge(f"{what} is {length} bytes, over the limit of {limit}")
    return length


# -- blocking, for the worker ---------------------------------------------------------------


def read_exactly(fd: int, count: int) -> bytes:
    """`count` bytes from `fd`; EOFError if it closes first."""
    chunks, left = [], count
    while left:
        chunk = os.read(fd, min(left, 1 << 20))
        if not chunk:
            raise EOFError("the pipe closed")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def read_frame(fd: int, limit: int) -> Any:
    """The next message on `fd` (blocking)."""
    length = body_length(read_exactly(fd, HEADER.size), limit)
    return decode(read_exactly(fd, length))


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# -- async, for the pool (any stream with trio's receive_some) ------------------------------


class ReceiveStream(Protocol):
    async def receive_some(self, max_bytes: int | None = None) -> bytes: ...


class FrameReader:
    """Frames from an async byte stream, keeping what arrived past the last frame."""

    def __init__(self, stream: ReceiveStream) -> None:
        self.stream = stream
        self.buffer = bytearray()

    async def _fill(self, count: int) -> None:
        while len(self.buffer) < count:
            chunk = await self.stream.receive_some(max(65536, count - len(self.buffer)))
            if not chunk:
                raise WorkerCrashed("the worker closed its pipe")
            self.buffer += chunk

    async def receive(self, limit: int, what: str = "reply") -> Any:
        await self._fill(HEADER.size)
        length = body_length(bytes(self.buffer[: HEADER.size]), limit, what)
        await self._fill(HEADER.size + length)
        body = bytes(self.buffer[HEADER.size : HEADER.size + length])
        del self.buffer[: HEADER.size + length]
        try:
            return decode(body)
        except Exception as exc:  # msgpack's errors have no common base
            raise WorkerCrashed(f"the worker sent a malformed {what}: {exc}") from None
