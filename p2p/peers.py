"""Who this host is connected to: peers forgotten when their last connection closes, round
trips measured and frozen peers dropped, and bootstrap connections kept up."""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio
from libp2p.abc import INotifee

from p2p.network import Network, NetworkError, PeerState

log = logging.getLogger(__name__)

MAX_MISSED_PINGS = 3
FROZEN_AFTER_S = 20.0
AUTO_DIAL_MAX_FAILURES = 6  # failed auto-connect dials in a row before a peer is forgotten
MAX_FORGOTTEN = 4096  # peers remembered as forgotten (beyond: the oldest is dialled again)


class AutoDialBound:
    """A bound on py-libp2p's auto-connector: a peer it failed to dial `max_failures` times
    in a row is forgotten (never auto-dialled again) until it connects.

    Below its low watermark (always, in a network of fewer than ~100 peers) the
    auto-connector dials every peer of the peerstore it is not connected to, every 10 s, a
    failed one again after 5, 15, 20, 40 s and then every 60 s, for as long as its addresses
    last in the peerstore (2 h for identify's, renewed by every Kademlia walk that names it):
    a peer gone for good was dialled once a minute for hours by every node. Its own success
    clears its count, as does our notifee's `connected` (`forgive`)."""

    def __init__(self, swarm: Any, max_failures: int = AUTO_DIAL_MAX_FAILURES) -> None:
        self._connector = swarm.auto_connector
        self._max_failures = max_failures
        self._skip = self._connector._should_skip_peer
        self._forgotten: dict[Any, None] = {}  # peer ID -> None, oldest first
        self.forgotten_total = 0  # peers forgotten (/metrics)
        self._connector._should_skip_peer = self._should_skip

    def _should_skip(self, peer: Any) -> bool:
        if peer in self._forgotten:
            return True
        if self._connector._failure_counts.get(peer, 0) >= self._max_failures:
            self._forgotten[peer] = None
            self.forgotten_total += 1
            if len(self._forgotten) > MAX_FORGOTTEN:
                del self._forgotten[next(iter(self._forgotten))]
            log.info("peer %s: %d auto-dials failed, no longer dialled", peer, self._max_failures)
            return True
        return bool(self._skip(peer))

    def forgive(self, peer: Any) -> None:
        """`peer` connected: auto-dialled again if it goes (py-libp2p's backoff afresh)."""
        self._forgotten.pop(peer, None)
        self._connector._failure_counts.pop(peer, None)


class ForgetDisconnected(INotifee):
    """Drop a peer from the DHT routing table when its last connection closes.

    py-libp2p keeps dead peers in the routing table, and every lookup then spends seconds
    dialling them (the "ghost node" problem exo users report). A live peer that comes back
    reconnects and is added again on its first exchange with us.
    """

    def __init__(self, owner: Any) -> None:
        self._owner = owner

    async def disconnected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self._owner.dht.routing_table.remove_peer(peer)
            self._owner.peers.pop(peer.to_base58(), None)
            self._owner.hello_gate.forget_unverified(peer.to_base58())

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        self._owner.auto_dials.forgive(conn.muxed_conn.peer_id)
        peer = conn.muxed_conn.peer_id.to_base58()
        self._owner.inbound.install(conn.muxed_conn, peer)  # unread bytes bounded (p2p.buffers)
        if self._owner.bans.is_banned(peer):  # its identity is known now: refuse it
            self._owner.refuse_banned(peer)
            return
        # every connection, inbound or dialled by the DHT, gets a hello: until one is valid
        # the peer is served nothing else (see `p2p.guard.StreamGuard`)
        self._owner.hello_gate.in_background(peer)

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


async def track_peers(
    net: Network, interval_s: float, disconnect: Callable[[str], Awaitable[None]]
) -> None:
    """Keep `net.peers` current: who is connected or routable, and their measured RTT; a
    peer silent for long (no ping answered, nothing heard from it) is disconnected."""
    alive_at: dict[str, float] = {}  # connected peer -> when it last answered (trio clock)
    while True:
        connected = net.connected_peers()
        alive_at = {p: t for p, t in alive_at.items() if p in connected}
        for peer_id in net.known_peers():
            state = net.peers.setdefault(peer_id, PeerState(peer_id))
            state.addrs = net.peer_addrs(peer_id) or state.addrs
            if peer_id in connected:
                try:
                    state.rtt_ms = await net.ping(peer_id)
                    state.last_seen = time.time()
                    state.missed_pings = 0
                    alive_at[peer_id] = trio.current_time()
                except Exception:
                    # connected but silent: a frozen or half-closed peer. Drop it so that
                    # lookups stop waiting on it; a live peer reconnects on its own.
                    state.rtt_ms = None
                    state.missed_pings += 1
                    now = trio.current_time()
                    # its messages still arriving (a flood elsewhere can fail py-libp2p's
                    # pings between honest nodes for seconds) count as answers
                    heard = net.heard_at(peer_id)
                    last = max(alive_at.setdefault(peer_id, now), heard or -math.inf)
                    # a busy peer (a long import holding the GIL) misses a few pings;
                    # only one silent for a long time is taken for frozen
                    if state.missed_pings >= MAX_MISSED_PINGS and now - last >= FROZEN_AFTER_S:
                        log.info("peer %s does not answer pings; disconnecting", peer_id)
                        with contextlib.suppress(Exception):
                            await disconnect(peer_id)
        await trio.sleep(interval_s)


async def keep_connected(
    net: Network,
    addr: str,
    target: str,
    min_s: float,
    max_s: float,
    on_connected: Callable[[str], None] | None = None,
) -> None:
    """Bootstrap: connect to `addr` (the peer `target`) and reconnect with exponential
    backoff whenever lost."""
    delay = min_s
    while True:
        if target not in net.connected_peers():
            try:
                await net.connect(addr)
                log.info("connected to bootstrap %s", addr)
                delay = min_s
                if on_connected is not None:
                    on_connected(target)
            except NetworkError as exc:
                log.info("bootstrap %s unreachable (%s); retry in %.1f s", addr, exc, delay)
                await trio.sleep(delay)
                delay = min(delay * 2, max_s)
                continue
        await trio.sleep(min_s)
