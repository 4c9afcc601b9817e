"""Streams to the next servers of chained steps: one pooled stream per next peer.

A chained step's output goes straight to the session's next hop. Opening a stream per step
would cost a round trip each, so each server keeps one stream per next peer (at most
`MAX_PEERS`), opened once even when steps race for it, replaced when unused long enough that
its server may have closed it as idle, and retried once on a fresh stream when a send fails.
"""

from __future__ import annotations

from typing import Any

import trio

from daemon.shards import SHARD_PROTOCOL, wire
from p2p.network import NetworkError, Stream, StreamOpener

MAX_PEERS = 64  # pooled push streams to next servers
# a pooled push stream unused for this long is replaced before use: its server may have
# closed it as idle (STREAM_IDLE_S, which config keeps at least twice this)
POOL_IDLE_S = 10.0
# a push (dial included) must fail well within the client's step timeout (10 s), so that
# the client hears `forward_error` and relays, rather than blaming this server
PUSH_BUDGET_S = 3.0
PUSH_BYTES_PER_S = 20e6  # plus this much time per byte, for large prefill tensors


class Outbox:
    """A stream whose sends may come from several tasks (replies, and results of chained
    steps arriving on other streams): one frame at a time."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._lock = trio.Lock()
        self.last_sent = trio.current_time()  # (the event loop's clock: virtual in tests)

    async def send(self, header: wire.Reply | wire.Forward, tensor: Any = None) -> None:
        await self.send_frame(wire.encode(header, tensor))

    async def send_frame(self, frame: bytes) -> None:
        async with self._lock:
            await self.stream.send(frame)
            self.last_sent = trio.current_time()


class PushPool:
    """Pushes frames to next servers over pooled streams opened with `opener`."""

    def __init__(self, opener: StreamOpener | None) -> None:
        self.opener = opener  # None: this server pushes to nobody
        self._peers: dict[str, Outbox] = {}
        self._dialing: dict[str, trio.Lock] = {}

    async def push(self, peer_id: str, frame: bytes) -> None:
        """Send a frame to the next server over a pooled stream (one fresh retry), within
        PUSH_BUDGET_S (plus time for the bytes)."""
        if self.opener is None:
            raise NetworkError("this server does not push to other servers")
        try:
            with trio.fail_after(PUSH_BUDGET_S + len(frame) / PUSH_BYTES_PER_S):
                for attempt in (1, 2):
                    outbox = await self._pooled(peer_id)
                    try:
                        await outbox.send_frame(frame)
                        return
                    except NetworkError:
                        await self._drop(peer_id, outbox)
                        if attempt == 2:
                            raise
                    except BaseException:  # cancelled mid-frame: the stream is unusable
                        await self._drop(peer_id, outbox)
                        raise
        except trio.TooSlowError:
            raise NetworkError(f"cannot push to {peer_id} in time") from None

    async def _pooled(self, peer_id: str) -> Outbox:
        """The pooled stream to a next server, opened once even when steps race for it."""
        if len(self._dialing) > 4 * MAX_PEERS:  # forget the locks of idle peers
            self._dialing = {p: lk for p, lk in self._dialing.items() if lk.locked()}
        lock = self._dialing.setdefault(peer_id, trio.Lock())
        async with lock:
            outbox = self._peers.get(peer_id)
            if outbox is not None and trio.current_time() - outbox.last_sent > POOL_IDLE_S:
                await self._drop(peer_id, outbox)  # its server may have closed it
                outbox = None
            if outbox is None:
                assert self.opener is not None
                outbox = Outbox(await self.opener.open_stream(peer_id, SHARD_PROTOCOL))
                while len(self._peers) >= MAX_PEERS:
                    oldest = next(iter(self._peers))
                    await self._drop(oldest, self._peers[oldest])
                self._peers[peer_id] = outbox
        return outbox

    async def _drop(self, peer_id: str, outbox: Outbox) -> None:
        """Forget a pooled stream (only that one: a fresh one may have replaced it)."""
        if self._peers.get(peer_id) is outbox:
            del self._peers[peer_id]
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await outbox.stream.close()
