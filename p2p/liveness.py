"""Which peers are gone: a node that stopped or was cut off leaves `nodes_find` in seconds.

A resource record stays valid for its whole lifetime (90 s by default) after its node dies, and
until now `find()` listed a SIGKILLed node for that long. This module uses what the network
already observes, on the `Network` seam only (so it runs alike over libp2p and in memory):

- a connection that closes: the peer is dialled again (at the addresses its record
  advertises, within `redial_timeout_s`); if that fails, it is taken for gone. A node killed
  outright refuses the dial at once; one whose connection closed for any other reason is
  connected again and stays listed. A gone peer is dialled again every `recheck_s` while its
  record lasts, and is back when a dial succeeds;
- a connected peer that misses `misses` pings in a row (each bounded by the transport's ping
  timeout, `probe_interval_s` apart) is taken for gone: a partition leaves TCP connections
  open but silent. One ping answered, however late within its timeout, is enough: a slow
  link never makes an honest node flap. A ping missed by a peer heard from since the round
  before (a request, an answer, a frame of it: `Network.heard_at`) is no miss either: under
  a flood py-libp2p's pings between honest nodes failed for seconds while their other
  traffic flowed, and `nodes_find` lost live nodes (bench/abuse.py; much of that was
  py-libp2p's ping client failing every ping that overlapped another to the same peer,
  replaced by `p2p.ping`). A round in which most
  peers missed (2 of 3, half of 4 or more), or which began late (this node's event loop
  lagging), counts no misses: the trouble is then this node's own (a flood saturating it hid
  honest peers from its `nodes_find` in bench/abuse.py), and its peers judge it. Likewise a
  redial refused at once marks the peer gone, one that only ran out of time must fail twice
  in a row.

At most `max_pings` peers are pinged a round, however many are connected (a node that looked
up a thousand records holds a thousand connections): those that missed a ping first, then
the others in turn, each once a cycle of about connected / `max_pings` rounds. A newly
connected peer's first turn falls at a random round of the coming cycle, so the nodes that
connected to a peer at the same moment (all that looked up its new record) do not all ping
it in the same round of their cycles: they did (a peer was appended to each node's line),
and a peer cut off just after that round went unpinged by everyone for a whole cycle (a
cut-off node left every list after 11.25 s at 200 nodes, where a cycle is 12 rounds; at
1,000 nodes a cycle is 62). With a few peers every one is pinged every round.

A gone peer's record is kept, not deleted: it is listed again as soon as the peer answers a
ping or a dial, or a record it issued after it was taken for gone is seen. Peers this
node has never been connected to are judged by their record's validity alone.

A gone peer is dialled again at once, then `recheck_s` later, the gap doubling each time up
to `recheck_max_s`; after `max_rechecks` such dials it is forgotten: not dialled again (it
stays unlisted) until it shows itself (connects, answers, publishes a newer record). Every
node dialled a gone peer every `recheck_s` for as long as its record lasted: a hostile peer
of a flood, gone with a record valid for an hour, was dialled ~12 times a minute by each
node for that hour (bench/abuse.py's logs, "Failed to open TCP stream"). Both are counted
(`rechecks_total`, `forgotten_total`: /metrics).
"""

from __future__ import annotations

import heapq
import logging
import math
import random
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
        redial_timeout_s: float = 5.0,
        recheck_s: float = 5.0,
        recheck_max_s: float = 300.0,
        max_rechecks: int = 6,
        max_parallel: int = 32,
        max_pings: int = 16,
        on_lost: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        """`on_lost(peer)`: this node saw `peer` go (not told: see `mark_gone`), or, when it
        pings only some of its peers a round, suspects it (a ping unanswered and counted:
        others check for themselves, see `p2p.gone`). `rng`: places newcomers' first turns
        (tests pass a seeded one)."""
        self._net = net
        self._probe_interval_s = probe_interval_s
        self._misses_needed = misses
        self._redial_timeout_s = redial_timeout_s
        self._recheck_s = recheck_s
        self._recheck_max_s = recheck_max_s
        self._max_rechecks = max_rechecks
        self._rechecked: dict[str, float] = {}  # gone peer -> when it was last dialled
        self._rechecks: dict[str, int] = {}  # gone peer -> dials since it went (the backoff)
        self._slow_dials: set[str] = set()  # peers whose last redial ran out of time
        self._limiter = trio.CapacityLimiter(max_parallel)
        self._max_pings = max_pings
        self._on_lost = on_lost or (lambda peer_id: None)
        self._rng = rng or random.Random()
        self._round = 0  # rounds run (the clock of the turns)
        self._turn: dict[str, int] = {}  # connected peer -> the round of its next turn
        self._turns: list[tuple[int, str]] = []  # heap of (round, peer); stale ones skipped
        self._capped = False  # whether the last round pinged only some connected peers
        self._lost: dict[str, float] = {}  # peer -> when (net.now()) it was taken for gone
        self._misses: dict[str, int] = {}  # connected peer -> pings missed in a row
        self.lost_total = 0  # peers taken for gone (closed and not redialled, or silent)
        self.revived_total = 0  # gone peers seen alive again
        self.rounds_spared = 0  # rounds whose misses were not counted (the trouble was ours)
        self.heard_spared = 0  # pings missed by peers heard from meanwhile (not counted)
        self.rechecks_total = 0  # dials of gone peers (to see whether they are back)
        self.forgotten_total = 0  # gone peers no longer dialled (max_rechecks reached)

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

    def _mark_lost(self, peer_id: str, why: str, *, seen: bool = True) -> None:
        if peer_id not in self._lost:
            self._lost[peer_id] = self._net.now()
            self.lost_total += 1
            log.info("peer %s is gone (%s): no longer listed", peer_id, why)
            if seen:
                self._on_lost(peer_id)

    def mark_gone(self, peer_id: str, why: str) -> None:
        """Take `peer_id` for gone on another's word, checked by the caller (`p2p.gone`): as
        a peer this node saw go, it is listed again when it answers or publishes anew."""
        self._mark_lost(peer_id, why, seen=False)

    def _revive(self, peer_id: str) -> None:
        self._rechecks.pop(peer_id, None)  # it showed itself: a later loss starts afresh
        if self._lost.pop(peer_id, None) is not None:
            self.revived_total += 1
            log.info("peer %s is back", peer_id)

    async def _ping(self, peer_id: str, missed: list[str]) -> None:
        """Ping `peer_id`; it goes into `missed` if it does not answer (counted by the round)
        and was not heard from since the round before either."""
        started = trio.current_time()
        try:
            async with self._limiter:
                await self._net.ping(peer_id)
        except Exception:  # a timeout, a reset, no route: all mean no answer
            heard = self._net.heard_at(peer_id)
            if heard is None or heard < started - self._probe_interval_s:
                missed.append(peer_id)
                return
            self.heard_spared += 1  # its pings fail, its messages arrive: busy, not gone
        self._misses.pop(peer_id, None)
        self._revive(peer_id)

    def _count_misses(
        self, missed: list[str], pinged: int, late_s: float, watched: Callable[[str], bool]
    ) -> None:
        """Count a round's unanswered pings, unless the trouble looks like ours: most peers
        missed at once (this node overloaded, or its own link cut: others judge it), or the
        round itself started late (our event loop lagging, the pings' time eaten by it)."""
        most = 2 * len(missed) >= pinged if pinged >= 4 else 2 * len(missed) > pinged
        if late_s > self._probe_interval_s or (pinged >= 3 and most):
            self.rounds_spared += 1
            return
        for peer_id in missed:
            count = self._misses.get(peer_id, 0) + 1
            self._misses[peer_id] = count
            # (a peer with no record listed has nothing to hide: not marked, nor logged)
            if count >= self._misses_needed and watched(peer_id):
                self._mark_lost(peer_id, f"{count} pings unanswered")
            elif self._capped and watched(peer_id):
                # suspected, by one of the few that ping it: the others may check it now
                # (where each node pings every peer each round, each judges for itself)
                self._on_lost(peer_id)

    async def _redial(self, peer_id: str, addrs: list[str]) -> None:
        """A connection to `peer_id` closed (or it is gone and due for another try): dial it
        again; gone if that fails, back if it answers."""
        started = trio.current_time()
        async with self._limiter:
            for addr in addrs or [f"/p2p/{peer_id}"]:
                try:
                    await self._net.connect(addr, self._redial_timeout_s)
                except Exception:  # refused, unreachable, timed out, malformed address
                    continue
                self._slow_dials.discard(peer_id)
                self._rechecks.pop(peer_id, None)
                self._revive(peer_id)
                return
        # refused at once: nothing listens there (a killed node). A dial that only ran out of
        # time may be our own load: gone after the second such dial in a row
        if trio.current_time() - started < self._redial_timeout_s or peer_id in self._slow_dials:
            self._slow_dials.discard(peer_id)
            self._mark_lost(peer_id, "connection closed, redial failed")
        else:
            self._slow_dials.add(peer_id)

    async def run(
        self,
        watched: Callable[[str], bool],
        addrs_of: Callable[[str], list[str]],
    ) -> None:
        """Until cancelled: every `probe_interval_s`, redial the `watched` peers whose
        connections closed since a round saw them open (at `addrs_of(peer)`) and ping the
        connected peers (at most `max_pings`).
        `watched`: peers whose loss matters (those with a record listed)."""
        seen: set[str] = set()  # peers connected at some round and not taken for gone since
        dialling: set[str] = set()  # redials under way (they run beside the rounds)
        late_s = 0.0  # how much later than asked the last round began

        async def redial(peer_id: str) -> None:
            try:
                await self._redial(peer_id, addrs_of(peer_id)[:4])
            finally:
                dialling.discard(peer_id)

        async with trio.open_nursery() as background:
            while True:
                connected = self._net.connected_peers() - {self._net.peer_id}
                gone_away = seen - connected  # (only these are looked at one by one)
                closed = [p for p in gone_away if watched(p) and p not in self._lost]
                seen = connected | {p for p in gone_away if p not in self._lost and watched(p)}
                now = trio.current_time()
                # a gone peer (while its record lasts) is dialled again, less and less often,
                # then forgotten (`_recheck_due`): a live one whose redial failed once (a
                # loaded machine) comes back without waiting for a newer record of it
                again = [*self._lost, *self._slow_dials]
                for peer_id in again:
                    idle = peer_id not in connected and peer_id not in dialling
                    if idle and watched(peer_id) and self._recheck_due(peer_id, now):
                        closed.append(peer_id)
                self._rechecked = {
                    p: t for p, t in self._rechecked.items() if p in self._lost or p in again
                }
                self._rechecks = {p: n for p, n in self._rechecks.items() if p in self._rechecked}
                self._slow_dials &= {p for p in self._slow_dials if watched(p)}
                for peer_id in closed:
                    self._misses.pop(peer_id, None)
                    if peer_id not in dialling:
                        dialling.add(peer_id)
                        background.start_soon(redial, peer_id)
                missed: list[str] = []
                pinged = self._to_ping(connected)
                async with trio.open_nursery() as nursery:
                    for peer_id in pinged:
                        nursery.start_soon(self._ping, peer_id, missed)
                self._count_misses(missed, len(pinged), late_s, watched)
                if self._misses:
                    self._misses = {p: n for p, n in self._misses.items() if p in connected}
                slept_from = trio.current_time()
                await trio.sleep(self._probe_interval_s)
                late_s = trio.current_time() - slept_from - self._probe_interval_s

    def _recheck_due(self, peer_id: str, now: float) -> bool:
        """Whether gone `peer_id` is dialled again now (counted if so): at once, then
        `recheck_s` after the last dial, the gap doubling up to `recheck_max_s`; never
        after `max_rechecks` dials (it is forgotten, counted once)."""
        done = self._rechecks.get(peer_id, 0)
        if done >= self._max_rechecks:
            if done == self._max_rechecks:
                self._rechecks[peer_id] = done + 1  # (counted once)
                self.forgotten_total += 1
                log.info("peer %s is still gone after %d dials: no longer dialled", peer_id, done)
            return False
        gap = 0.0 if done == 0 else min(self._recheck_s * 2 ** (done - 1), self._recheck_max_s)
        if now - self._rechecked.get(peer_id, -math.inf) < gap:
            return False
        self._rechecked[peer_id] = now
        self._rechecks[peer_id] = done + 1
        self.rechecks_total += 1
        return True

    def _to_ping(self, connected: set[str]) -> list[str]:
        """This round's pings: every connected peer, or at most `max_pings` of them (those
        that missed the last ping first, then in turn: see the module)."""
        self._round += 1
        self._capped = len(connected) > self._max_pings
        turn = self._turn
        if not self._capped:
            turn.clear()
            self._turns.clear()
            return list(connected)
        for peer_id in turn.keys() - connected:
            del turn[peer_id]
        cycle = -(-len(connected) // self._max_pings)
        heap = self._turns
        for peer_id in connected - turn.keys():
            due = self._round + self._rng.randrange(cycle)
            turn[peer_id] = due
            heapq.heappush(heap, (due, peer_id))
        if len(heap) > 2 * len(turn) + 64:  # mostly stale entries: rebuild
            heap[:] = [(due, peer_id) for peer_id, due in turn.items()]
            heapq.heapify(heap)
        chosen = [p for p in self._misses if p in connected][: self._max_pings]
        picked = set(chosen)
        while len(chosen) < self._max_pings and heap:
            due, peer_id = heapq.heappop(heap)
            if turn.get(peer_id) == due and peer_id not in picked:
                chosen.append(peer_id)
                picked.add(peer_id)
        for peer_id in chosen:  # to the back of the line: next cycle
            due = self._round + cycle
            turn[peer_id] = due
            heapq.heappush(heap, (due, peer_id))
        return chosen

    def forget(self, keep: set[str]) -> None:
        """Drop what is known of peers outside `keep` (their records expired)."""
        self._lost = {p: t for p, t in self._lost.items() if p in keep}
