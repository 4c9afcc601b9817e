"""A per-peer budget of inbound bytes, enforced by backpressure: over it, the peer's
connections are not read until the budget has refilled.

Every byte a peer sends costs this node before any limit looks at it: Noise decrypts it,
yamux parses it into frames and buffers, a handler reads it. A flood that stays under each
message limit (huge never-finished frames, garbage frames answered one by one, gossip
dropped only once decoded) still takes the node's event loop from honest users: profiled on
the abuse bench's target during the frames flood (7 MB/s), yamux's frame reader was 13 % of
its samples, the largest single part. Refusing bytes once read costs as much as taking
them; not reading them costs nothing: the kernel's socket buffer and the peer's yamux send
windows fill, and the sender blocks.

Each peer has a token bucket of bytes (`HostLimits.inbound_bytes_per_s`,
`inbound_bytes_burst`), shared by its connections, charged as each connection's reader
takes bytes from its secure channel; a reader that overdraws it sleeps until the bucket is
back at zero (`inbound`/`throttled`, counted once per pause). The rate is set far above an
honest peer's traffic (a server's activations between hops included); what brings it down
is the peer's score (p2p.scoring): it halves for every `inbound_halving_score` points
below 0, down to `min_inbound_bytes_per_s`, so a peer that has sent garbage is read slowly
from its first penalties on, long before a ban, and at full speed again as its score
recovers. Honest peers' rare penalties (a stale record, 0.1) barely move it.

Throttling alone would keep a flooder connected for ever: read at the floor, it is refused
rarely, and its score recovers as fast as its few refusals lower it. So a peer read at the
floor that still sends past it is penalized for the time it is held back (`over_budget`,
one event per OVER_BUDGET_EVENT_S), which bans a flood pinned at the floor within seconds;
an honest peer (score near 0) is only ever slowed by its budget, never scored for it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio

from p2p.limits import HostLimits, RejectHook

# the score (<= 0) of a peer now (p2p.scoring.PeerScores.score)
ScoreOf = Callable[[str], float]
# (peer, reason, events): p2p.bans.PeerBans.penalize
Penalize = Callable[[str, str, int], None]

OVER_BUDGET_EVENT_S = 0.1  # held back this long at the floor: one `over_budget` event


class InboundBudget:
    """Per-peer token buckets of inbound bytes; `install` puts one connection under them."""

    def __init__(
        self,
        limits: HostLimits,
        score_of: ScoreOf,
        on_reject: RejectHook,
        clock: Callable[[], float] = trio.current_time,
        penalize: Penalize | None = None,
    ) -> None:
        self.rate = float(limits.inbound_bytes_per_s)
        self.burst = float(limits.inbound_bytes_burst)
        self.floor = float(min(limits.min_inbound_bytes_per_s, limits.inbound_bytes_per_s))
        self.halving = limits.inbound_halving_score
        self._max_peers = limits.max_tracked_peers
        self._score_of = score_of
        self._on_reject = on_reject
        self._clock = clock
        self._penalize = penalize or (lambda peer, reason, events: None)
        self._owed: dict[str, float] = {}  # seconds held back at the floor, not yet scored
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when
        self.pauses = 0  # readers paused for a peer over its budget
        self.paused_s = 0.0  # and for how long in all

    def rate_of(self, peer: str) -> float:
        """Bytes per second `peer` may send now: the full rate at a score of 0, halved for
        every `halving` points below it, never under the floor."""
        score = min(0.0, self._score_of(peer))
        return max(self.floor, self.rate * 2.0 ** (score / self.halving))

    def charge(self, peer: str, size: int) -> float:
        """Take `size` bytes from `peer`'s bucket; the seconds its readers must now wait
        (0 while the bucket holds). The burst shrinks with the rate: a penalized peer does
        not keep a full one."""
        now, rate = self._clock(), self.rate_of(peer)
        burst = self.burst * rate / self.rate
        tokens, last = self._buckets.pop(peer, (burst, now))
        tokens = min(burst, tokens + max(0.0, now - last) * rate) - size
        self._buckets[peer] = (tokens, now)
        while len(self._buckets) > self._max_peers:
            self._buckets.popitem(last=False)
        return -tokens / rate if tokens < 0 else 0.0

    async def take(self, peer: str, size: int) -> None:
        """Charge `size` bytes to `peer`; over its budget, sleep until it is paid back."""
        wait = self.charge(peer, size)
        if wait > 0:
            self.pauses += 1
            self.paused_s += wait
            self._on_reject("inbound", "throttled")
            if self.rate_of(peer) <= self.floor:
                self._score_flood(peer, wait)
            await trio.sleep(wait)

    def _score_flood(self, peer: str, wait: float) -> None:
        owed = self._owed.pop(peer, 0.0) + wait
        events = int(owed / OVER_BUDGET_EVENT_S)
        if events:
            self._penalize(peer, "over_budget", events)
            owed -= events * OVER_BUDGET_EVENT_S
        self._owed[peer] = owed
        while len(self._owed) > self._max_peers:
            del self._owed[next(iter(self._owed))]

    def install(self, muxed_conn: Any, peer: str) -> bool:
        """Put the reads of `muxed_conn`'s secure channel (a yamux connection's) under
        `peer`'s budget; False where there is none to wrap, or it is wrapped already."""
        secured = getattr(muxed_conn, "secured_conn", None)
        read = getattr(secured, "read", None)
        if read is None or getattr(read, "_gridmesh_budgeted", False):
            return False

        async def budgeted(n: int | None = None) -> bytes:
            data = await read(n)
            if data:
                await self.take(peer, len(data))
            return data

        budgeted._gridmesh_budgeted = True  # type: ignore[attr-defined]
        secured.read = budgeted
        return True


class BudgetOnConnect:
    """A swarm notifee that puts every new connection under its peer's inbound budget."""

    def __init__(self, budget: InboundBudget) -> None:
        self.budget = budget

    async def connected(self, network: Any, conn: Any) -> None:
        self.budget.install(conn.muxed_conn, conn.muxed_conn.peer_id.to_base58())

    async def disconnected(self, network: Any, conn: Any) -> None:
        pass

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass
