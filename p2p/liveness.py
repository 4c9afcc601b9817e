"""Which peers are gone: a node that stopped or was cut off leaves `nodes_find` in seconds.

A resource record stays valid for its whole lifetime (90 s by default) after its node dies, and
until now `find()` listed a SIGKILLed node for that long. This module uses what the network
already observes, on the `Network` seam only (so it runs alike over libp2p and in memory):

- a connection that closes: the peer is dialled again once (`redial_timeout_s`); if that
  fails, it is taken for gone. A node killed outright refuses the dial at once; one whose
  connection closed for any other reason is connected again and stays listed;
- a connected peer that answers `misses` pings in a row (each bounded by the transport's ping
  timeout, `probe_interval_s` apart) is taken for gone: a partition leaves TCP connections
  open but silent. One ping answered, however late within its timeout, is enough: a slow link
  never makes an honest node flap.

A gone peer's record is kept, not deleted: it is listed again as soon as the peer answers a
ping or a record it issued after it was taken for gone is seen (it published again). Peers this
node has never been connected to are judged by their record's validity alone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from p2p.network import Network

log = logging.getLogger(__name__)


class Liveness:
    """`run()` watches connections and pings; `hides(peer, issued_at)` answers find()."""

    def __init__(
        self,
        net: Network,
        *,
        probe_interval_s: float = 1.0,
        misses: int = 3,
        redial_timeout_s: float = 2.0,
        max_parallel: int = 32,
    ) -> None:
        self._net = net
        self._probe_interval_s = probe_interval_s
        self._misses_needed = misses
        self._redial_timeout_s = redial_timeout_s
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._lost: dict[str, float] = {}  # peer -> when (net.now()) it was taken for gone
        self._misses: dict[str, int] = {}  # connected peer -> pings missed in a row
        self.lost_total = 0  # peers taken for gone (closed and not redialled, or silent)
        self.revived_total = 0  # gone peers seen alive again

    def lost(self) -> dict[str, float]:
        """Peers taken for gone, and since when (the network's clock)."""
        return dict(self._lost)

    def hides(self, peer_id: str, issued_at: float) -> bool:
        """Whether a record of `peer_id` issued at `issued_at` should not be listed: the peer
        is gone and the record is no newer than when it went."""
        since = self._lost.get(peer_id)
        if since is None:
            return False
        if issued_at > since:  # it published after we lost it: it lives, elsewhere
            self._revive(peer_id)
            return False
        return True

    def _mark_lost(self, peer_id: str, why: str) -> None:
        if peer_id not in self._lost:
            self._lost[peer_id] = self._net.now()
            self.lost_total += 1
            log.info("peer %s is gone (%s): no longer listed", peer_id, why)

    def _revive(self, peer_id: str) -> None:
        if self._lost.pop(peer_id, None) is not None:
            self.revived_total += 1
            log.info("peer %s is back", peer_id)

    async def _ping(self, peer_id: str) -> None:
        try:
            async with self._limiter:
                await self._net.ping(peer_id)
        except Exception:  # a timeout, a reset, no route: all mean no answer
            missed = self._misses.get(peer_id, 0) + 1
            self._misses[peer_id] = missed
            if missed >= self._misses_needed:
                self._mark_lost(peer_id, f"{missed} pings unanswered")
            return
        self._misses.pop(peer_id, None)
        self._revive(peer_id)

    async def _redial(self, peer_id: str, addrs: list[str]) -> None:
        """A connection to `peer_id` closed: dial it once again; gone if that fails."""
        async with self._limiter:
            for addr in addrs or [f"/p2p/{peer_id}"]:
                try:
                    await self._net.connect(addr, self._redial_timeout_s)
                    return
                except Exception:  # refused, unreachable, timed out, malformed address
                    continue
        self._mark_lost(peer_id, "connection closed, redial failed")

    async def run(
        self,
        watched: Callable[[str], bool],
        addrs_of: Callable[[str], list[str]],
    ) -> None:
        """Until cancelled: every `probe_interval_s`, redial the `watched` peers whose
        connections closed since a round saw them open (at `addrs_of(peer)`) and ping every
        connected peer. `watched`: peers whose loss matters (those with a record listed)."""
        seen: set[str] = set()  # peers connected at some round and not taken for gone since
        while True:
            connected = self._net.connected_peers() - {self._net.peer_id}
            closed = [p for p in seen - connected if watched(p) and p not in self._lost]
            seen = connected | {p for p in seen if p not in self._lost and watched(p)}
            async with trio.open_nursery() as nursery:
                for peer_id in closed:
                    self._misses.pop(peer_id, None)
                    nursery.start_soon(self._redial, peer_id, addrs_of(peer_id)[:4])
                for peer_id in connected:
                    nursery.start_soon(self._ping, peer_id)
            self._misses = {p: n for p, n in self._misses.items() if p in connected}
            await trio.sleep(self._probe_interval_s)

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of peers outside `keep` (their records expired)."""
        self._lost = {p: t for p, t in self._lost.items() if p in keep}
