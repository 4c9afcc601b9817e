"""A discrete-event pump for unit tests of the SWIM core: cores of one cluster, messages
carried after a fixed latency (each one encoded and decoded, as on the wire), links that can
be cut one way, crashed members, and a record of every state change. No trio, no IO."""

from __future__ import annotations

import hashlib
import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from p2p.identity import NodeIdentity, verify
from scheduler import swim_wire as wire
from scheduler.swim import Send, State, StateChanged, Swim, SwimSettings

CLUSTER = "c1"
_IDENTITIES: list[NodeIdentity] = []


def deterministic_identity(index: int) -> NodeIdentity:
    """The same keys in every run, so a seed replays a run."""
    seed = hashlib.sha256(f"swim test node {index}".encode()).digest()
    return NodeIdentity(node_seed=seed, payout_key=hashlib.sha256(seed).digest())


def identities(count: int) -> list[NodeIdentity]:
    """`count` node identities, made once per test run (sorted by peer id)."""
    while len(_IDENTITIES) < count:
        _IDENTITIES.append(deterministic_identity(len(_IDENTITIES)))
    return sorted(_IDENTITIES[:count], key=lambda i: i.peer_id)


def make_core(
    ident: NodeIdentity,
    members: list[str],
    settings: SwimSettings,
    *,
    now: float = 0.0,
    incarnation: int = 1,
    seed: int = 0,
) -> Swim:
    return Swim(
        ident.peer_id,
        CLUSTER,
        settings,
        sign=ident.sign,
        verify=verify,
        incarnation=incarnation,
        now=now,
        members=members,
        rng=random.Random(seed),
    )


@dataclass
class Pump:
    settings: SwimSettings = field(default_factory=SwimSettings)
    latency: float = 0.005
    now: float = 0.0
    cores: dict[str, Swim] = field(default_factory=dict)
    crashed: set[str] = field(default_factory=set)
    cut: set[tuple[str, str]] = field(default_factory=set)  # (from, to) links that drop all
    changes: list[tuple[float, str, StateChanged]] = field(default_factory=list)  # (t, by, ...)
    sent: list[tuple[float, str, Send]] = field(default_factory=list)
    tap: Callable[[str, Send], None] | None = None
    _events: list[tuple[float, int, str, str, bytes]] = field(default_factory=list)
    _seq: int = 0
    _ticks: dict[str, float] = field(default_factory=dict)  # each live core's next deadline

    @classmethod
    def cluster(cls, count: int, settings: SwimSettings | None = None, **kw: Any) -> Pump:
        pump = cls(settings or SwimSettings(), **kw)
        idents = identities(count)
        peers = [i.peer_id for i in idents]
        for index, ident in enumerate(idents):
            pump.cores[ident.peer_id] = make_core(ident, peers, pump.settings, seed=index)
        return pump

    @property
    def peers(self) -> list[str]:
        return list(self.cores)

    def deliver(self, src: str, effects: list[Any]) -> None:
        for effect in effects:
            if isinstance(effect, StateChanged):
                self.changes.append((self.now, src, effect))
                continue
            self.sent.append((self.now, src, effect))
            if self.tap is not None:
                self.tap(src, effect)
            self.inject(src, effect.to, wire.encode(effect.message))

    def inject(self, src: str, dst: str, data: bytes, delay: float | None = None) -> None:
        """Carry `data` from `src` to `dst` (dropped on a cut link or to a crashed node)."""
        if (src, dst) in self.cut or src in self.crashed:
            return
        self._seq += 1
        when = self.now + (self.latency if delay is None else delay)
        heapq.heappush(self._events, (when, self._seq, src, dst, data))

    def run_until(self, until: float) -> None:
        self._ticks = {p: c.next_deadline() for p, c in self.cores.items() if p not in self.crashed}
        while True:
            ticker = min(self._ticks, key=self._ticks.__getitem__)
            tick_at = self._ticks[ticker]
            message_at = self._events[0][0] if self._events else float("inf")
            when = min(tick_at, message_at)
            if when > until:
                self.now = until
                return
            self.now = max(self.now, when)
            if message_at <= tick_at:
                _, _, src, dst, data = heapq.heappop(self._events)
                if dst in self.crashed or dst not in self.cores:
                    continue
                self.deliver(dst, self.cores[dst].on_message(src, wire.decode(data), self.now))
                self._ticks[dst] = self.cores[dst].next_deadline()
            else:
                self.deliver(ticker, self.cores[ticker].on_tick(self.now))
                self._ticks[ticker] = self.cores[ticker].next_deadline()

    def run_for(self, seconds: float) -> None:
        self.run_until(self.now + seconds)

    def view(self, observer: str, peer: str) -> State | None:
        return self.cores[observer].state_of(peer)

    def declared(self, peer: str, state: State) -> dict[str, float]:
        """When each member first saw `peer` in `state`."""
        out: dict[str, float] = {}
        for when, by, change in self.changes:
            if change.peer_id == peer and change.state == state and by not in out:
                out[by] = when
        return out
