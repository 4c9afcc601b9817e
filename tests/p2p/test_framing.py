"""How a libp2p stream's end reads through `FramedStream`: an end between frames is orderly
(StreamClosed), an end inside a frame is not, and a reset is a reset."""

from __future__ import annotations

import struct

import pytest
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.exceptions import StreamReset as Libp2pStreamReset

from p2p.framing import FramedStream
from p2p.network import NetworkError, StreamClosed, StreamReset


class RawStream:
    """A libp2p stream that returns `chunks`, then raises `end`."""

    def __init__(self, chunks: list[bytes], end: Exception) -> None:
        self.chunks, self.end = list(chunks), end

    async def read(self, n: int | None = None) -> bytes:
        if not self.chunks:
            raise self.end
        chunk = self.chunks.pop(0)
        if n is not None and len(chunk) > n:
            chunk, rest = chunk[:n], chunk[n:]
            self.chunks.insert(0, rest)
        return chunk


def framed(chunks: list[bytes], end: Exception) -> FramedStream:
    return FramedStream(RawStream(chunks, end), "peer", 1 << 20)


async def test_an_end_between_frames_is_orderly():
    stream = framed([struct.pack(">I", 2) + b"hi"], StreamEOF())
    assert await stream.receive() == b"hi"
    with pytest.raises(StreamClosed):
        await stream.receive()


async def test_an_end_inside_a_frame_is_a_broken_stream():
    stream = framed([struct.pack(">I", 10), b"abc"], StreamEOF())
    with pytest.raises(NetworkError, match="mid-frame") as caught:
        await stream.receive()
    assert not isinstance(caught.value, StreamClosed)


async def test_a_reset_is_a_reset():
    stream = framed([], Libp2pStreamReset())
    with pytest.raises(StreamReset):
        await stream.receive()
