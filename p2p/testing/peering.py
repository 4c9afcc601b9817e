"""Streams, connections and peer tracking of an in-memory node (the part of
`p2p.network.Network` beyond requests, gossip and the DHT); a mixin of `MemoryNode`.

Streams: opening one costs a round trip over the hub's links (so loss, partitions and dead
peers affect it as they do requests); the handler starts as the request arrives, in a task
of its own. Frames then travel at once (no latency, loss or partition applies to them), each
direction buffering at most the hub's `stream_capacity` frames before a send waits. A node
removed with `refuse=True` resets its streams; a node removed without (a dead machine) leaves
them silent. Either way its handlers stop.

Addresses are `/p2p/<peer id>`; `connect` also takes a bare peer id.
"""

from __future__ import annotations

import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import trio

from p2p.network import (
    MAX_STREAM_FRAME_BYTES,
    FrameBound,
    NetworkError,
    NetworkScope,
    PeerState,
    Stream,
    StreamHandler,
)
from p2p.streams import ChannelStream

# a p2p.testing.hub.MemoryNetwork: not imported, since that module builds on this one
Hub = Any

PING_TIMEOUT_S = 2.0


class Peering:
    """Needs `_hub`, `_peer_id`, `_alive`, `_table`, `_check_alive` and `connect` of its node."""

    _hub: Hub
    _peer_id: str
    _alive: bool
    scope: NetworkScope

    def _init_peering(self) -> None:
        self.peers: dict[str, PeerState] = {}
        self.stream_handler_errors = 0  # handlers that raised (their streams were reset)
        self._stream_handlers: dict[str, tuple[StreamHandler, FrameBound]] = {}
        self._streams: weakref.WeakSet[ChannelStream] = weakref.WeakSet()
        self._handler_scopes: set[trio.CancelScope] = set()
        self._contacts: set[str] = set()  # peers this node exchanged messages with

    # -- streams -----------------------------------------------------------------------------

    def set_stream_handler(
        self,
        protocol: str,
        handler: StreamHandler,
        max_frame_bytes: FrameBound = MAX_STREAM_FRAME_BYTES,
    ) -> None:
        self._stream_handlers[self.scope.protocol(protocol)] = (handler, max_frame_bytes)

    async def open_stream(
        self, peer_id: str, protocol: str, max_frame_bytes: FrameBound = MAX_STREAM_FRAME_BYTES
    ) -> Stream:
        """A stream to `peer_id`'s handler of `protocol` (one round trip); NetworkError when
        the peer is unknown, refuses, or serves no such protocol; hangs when it is dead or
        unreachable (bound the call)."""
        if peer_id == self._peer_id:
            raise NetworkError("a node cannot open a stream to itself")
        protocol = self.scope.protocol(protocol)
        stream = await self._hub._open_stream(self, peer_id, protocol, max_frame_bytes)  # type: ignore[arg-type]
        self._contacts.add(peer_id)
        return stream

    def _own_stream(self, stream: ChannelStream) -> None:
        self._streams.add(stream)

    def _start_stream_handler(self, handler: StreamHandler, stream: ChannelStream) -> None:
        self._own_stream(stream)
        self._contacts.add(stream.peer_id)
        scope = trio.CancelScope()
        self._handler_scopes.add(scope)
        trio.lowlevel.spawn_system_task(
            self._serve_stream, handler, stream, scope, name=f"memnet stream {self._peer_id}"
        )

    async def _serve_stream(
        self, handler: StreamHandler, stream: ChannelStream, scope: trio.CancelScope
    ) -> None:
        """One inbound stream: closed when the handler returns, reset when it raises (and
        counted), stopped when this node is removed."""
        try:
            with scope:
                try:
                    await handler(stream)
                except Exception:
                    self.stream_handler_errors += 1
                    await stream.reset()
                else:
                    await stream.close()
        finally:
            self._handler_scopes.discard(scope)

    def _end_streams(self, *, reset: bool) -> None:
        """This node is gone: its handlers stop and, with `reset`, its streams are reset."""
        for scope in list(self._handler_scopes):
            scope.cancel()
        if reset:
            for stream in list(self._streams):
                stream.abort()
        self._streams = weakref.WeakSet()
        self._contacts.clear()
        self.peers.clear()

    # -- connections and peers ---------------------------------------------------------------

    def connected_peers(self) -> set[str]:
        """Peers this node exchanged messages with that are still on the network (a peer
        behind a partition stays connected, as a frozen one does on TCP: pings notice it)."""
        nodes = self._hub._nodes
        return {p for p in self._contacts if p in nodes}

    def listen_addrs(self) -> list[str]:
        return [f"/p2p/{self._peer_id}"]

    def peer_addrs(self, peer_id: str) -> list[str]:
        state = self.peers.get(peer_id)
        if state is not None and state.addrs:
            return list(state.addrs)
        return [f"/p2p/{peer_id}"] if peer_id in self._contacts else []

    async def ping(self, peer_id: str) -> float:
        """Round-trip time in (virtual) milliseconds; NetworkError after PING_TIMEOUT_S."""
        started = trio.current_time()
        try:
            with trio.fail_after(PING_TIMEOUT_S):
                await self._hub._round_trip(self, peer_id)  # type: ignore[arg-type]
        except trio.TooSlowError:
            raise NetworkError(f"ping to {peer_id} timed out") from None
        return (trio.current_time() - started) * 1000

    def heard_at(self, peer_id: str) -> float | None:
        """Not tracked in memory: liveness and track_peers judge by pings alone here."""
        return None

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Any]:
        """Nothing to start: a memory node runs from `add_node` until `remove_node`."""
        yield self

    async def track_peers(self, interval_s: float) -> None:
        """Keep `peers` current: who is known, and the measured (virtual) round trip of
        those connected (a peer unreachable now keeps missing pings)."""
        while self._alive:
            connected = self.connected_peers()
            for peer_id in sorted(self.known_peers()):  # type: ignore[attr-defined]
                state = self.peers.setdefault(peer_id, PeerState(peer_id))
                state.addrs = state.addrs or [f"/p2p/{peer_id}"]
                if peer_id not in connected:  # as libp2p: only connected peers are pinged
                    state.rtt_ms = None
                    continue
                try:
                    state.rtt_ms = await self.ping(peer_id)
                    state.last_seen = self._hub.now()
                    state.missed_pings = 0
                except NetworkError:
                    state.rtt_ms = None
                    state.missed_pings += 1
            await trio.sleep(interval_s)

    async def keep_connected(
        self,
        addr: str,
        min_s: float,
        max_s: float,
        on_connected: Callable[[str], None] | None = None,
    ) -> None:
        """Connect to `addr` and reconnect with exponential backoff whenever lost."""
        target = peer_of(addr)
        delay = min_s
        while self._alive:
            if target not in self.connected_peers():
                try:
                    await self.connect(addr)  # type: ignore[attr-defined]
                    delay = min_s
                    if on_connected is not None:
                        on_connected(target)
                except NetworkError:
                    await trio.sleep(delay)
                    delay = min(delay * 2, max_s)
                    continue
            await trio.sleep(min_s)

    def _note_connected(self, peer_id: str, addr: str) -> None:
        self._contacts.add(peer_id)
        state = self.peers.setdefault(peer_id, PeerState(peer_id))
        state.addrs = [addr if addr.startswith("/") else f"/p2p/{peer_id}"]
        state.last_seen = self._hub.now()


def peer_of(addr: str) -> str:
    """The peer id of `/.../p2p/<peer id>`, or of a bare peer id."""
    return addr.rsplit("/p2p/", 1)[-1] if "/p2p/" in addr else addr
