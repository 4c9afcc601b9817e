"""Python-block calls over long-lived streams: a new libp2p stream per call costs a stream
negotiation each time (bench/vdag.py --procs measured ~26 ms per remote node with one
request per call); kept streams cost one frame each way.

`BlockStreams` keeps up to `MAX_IDLE_PER_PEER` idle streams per peer. A call takes one (or
opens one), sends the `BlockCall` frame, reads the `BlockReply` frame, and puts the stream
back; a stream that failed or whose call was cancelled is reset, never reused. A kept stream
found broken (the peer restarted) is replaced once by a fresh one. The server side
(`serve`) answers frames one after another until the caller closes the stream; a malformed
frame is refused, counted and the stream reset.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from daemon.vdags.protocol import (
    MAX_MESSAGE_BYTES,
    BlockCall,
    BlockReply,
    ProtocolError,
    decode_call,
    encode,
)
from p2p.network import NetworkError, StreamClosed

BLOCK_STREAM_PROTOCOL = "/gridmesh/vdag-block-stream/1.0.0"
MAX_IDLE_PER_PEER = 4
MAX_PEERS = 1024  # peers with idle streams kept
OPEN_TIMEOUT_S = 5.0  # a peer that does not take a stream by then is tried no longer


class BlockStreams:
    """The caller's side: calls over kept streams to each peer."""

    def __init__(self, net: Any) -> None:
        self.net = net
        self.idle: defaultdict[str, list[Any]] = defaultdict(list)

    async def _open(self, peer_id: str) -> Any:
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                return await self.net.open_stream(peer_id, BLOCK_STREAM_PROTOCOL, MAX_MESSAGE_BYTES)
        except trio.TooSlowError:
            raise NetworkError(f"no stream to {peer_id} within {OPEN_TIMEOUT_S:g} s") from None

    async def call(self, peer_id: str, payload: bytes) -> bytes:
        """The peer's reply frame; NetworkError when it cannot be had."""
        kept = self.idle.get(peer_id)
        if kept:
            stream = kept.pop()
            try:
                return await self._exchange(peer_id, stream, payload)
            except NetworkError:  # stale (the peer restarted, the connection dropped)
                pass
        return await self._exchange(peer_id, await self._open(peer_id), payload)

    async def _exchange(self, peer_id: str, stream: Any, payload: bytes) -> bytes:
        done = False
        try:
            await stream.send(payload)
            reply = await stream.receive()
            done = True
            return reply
        finally:
            if done and len(self.idle[peer_id]) < MAX_IDLE_PER_PEER and len(self.idle) <= MAX_PEERS:
                self.idle[peer_id].append(stream)
            else:
                with trio.CancelScope(shield=True):
                    await stream.reset()

    async def close(self) -> None:
        streams = [s for kept in self.idle.values() for s in kept]
        self.idle.clear()
        with trio.CancelScope(shield=True):
            for stream in streams:
                await stream.close()


def stream_handler(
    run: Callable[[BlockCall], Awaitable[BlockReply]], reject: Callable[[str], None]
) -> Callable[[Any], Awaitable[None]]:
    """The server's side: answer each call frame on a stream, in order."""

    async def serve(stream: Any) -> None:
        while True:
            try:
                frame = await stream.receive()
            except (StreamClosed, NetworkError):  # the caller is done with it, or gone
                return
            try:
                call = decode_call(frame)
            except ProtocolError as exc:
                reject(exc.reason)
                await stream.reset()
                return
            await stream.send(encode(await run(call)))

    return serve
