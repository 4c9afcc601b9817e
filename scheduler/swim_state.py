"""The data of the SWIM core (`scheduler.swim`): its settings, member states and effects,
suspicions with Lifeguard's dynamic timeout, and the queue of updates to piggyback."""

from __future__ import annotations

import enum
import heapq
import math
import operator
from dataclasses import dataclass, field
from typing import Annotated

from msgspec import Meta

from scheduler import swim_wire as wire
from scheduler.swim_wire import ALIVE, DEAD, SUSPECT, Update


class State(enum.IntEnum):
    ALIVE = ALIVE
    SUSPECT = SUSPECT
    DEAD = DEAD


@dataclass(frozen=True)
class SwimSettings:
    """How a member probes and judges the others. Defaults declare a crashed member dead
    within 5 s in clusters of up to 100 members with round trips under ~40 ms (a LAN-like
    cluster, as memberlist's DefaultLANConfig, scaled down). The `Meta` bounds are what a
    config may set."""

    probe_interval_s: Annotated[float, Meta(gt=0)] = 0.2
    probe_timeout_s: Annotated[float, Meta(gt=0)] = 0.08  # direct ack wait (< the interval)
    indirect_checks: Annotated[int, Meta(ge=0, le=16)] = 3
    # a ping-req relay answers Nack when the target has not answered this share of its
    # probe timeout (Lifeguard: 80 %), so the Nack arrives within the asker's interval
    nack_ratio: Annotated[float, Meta(gt=0, le=1)] = 0.8
    suspicion_mult: Annotated[int, Meta(ge=1, le=64)] = 4
    suspicion_max_timeout_mult: Annotated[int, Meta(ge=1, le=64)] = 6
    retransmit_mult: Annotated[int, Meta(ge=1, le=64)] = 4
    gossip_interval_s: Annotated[float, Meta(gt=0)] = 0.1
    gossip_nodes: Annotated[int, Meta(ge=1, le=64)] = 3
    # dead members still get gossip this long (so one that was only paused learns of it)
    gossip_to_the_dead_s: Annotated[float, Meta(ge=0)] = 5.0
    # a random dead member is pinged this often: one that comes back is seen again
    reconnect_interval_s: Annotated[float, Meta(gt=0)] = 2.0
    max_piggyback: Annotated[int, Meta(ge=1, le=wire.MAX_UPDATES - 1)] = 8
    awareness_max_multiplier: Annotated[int, Meta(ge=1, le=64)] = 8
    # ping-reqs relayed at once (more are answered Nack at once)
    max_relays: Annotated[int, Meta(ge=1)] = 64
    # called this much later than asked, the node was paused (SIGSTOP, a stalled VM): its
    # timers are shifted by the pause instead of firing as if it had been listening
    pause_threshold_s: Annotated[float, Meta(gt=0)] = 0.5


@dataclass(frozen=True)
class Send:
    to: str
    message: wire.Message
    timeout_s: float | None = None  # for requests: how long the answer is worth waiting for


@dataclass(frozen=True)
class StateChanged:
    peer_id: str
    state: State
    incarnation: int


Effect = Send | StateChanged


@dataclass
class Member:
    peer_id: str
    state: State = State.ALIVE
    incarnation: int = 0  # 0 with an empty proof: never heard from
    proof: bytes = b""
    since: float = 0.0  # when the state last changed
    claim: Update | None = None  # the signed claim behind a suspect or dead state


@dataclass
class Suspicion:
    incarnation: int
    start: float
    k: int  # confirmations that bring the timeout down to min_s
    min_s: float
    max_s: float
    accusers: list[str] = field(default_factory=list)  # distinct, the first one first

    def timeout(self) -> float:
        """Lifeguard: max_s shrinking toward min_s as log(confirmations + 1) / log(k + 1)."""
        confirmations = len(self.accusers) - 1
        if self.k < 1 or confirmations >= self.k:
            return self.min_s
        frac = math.log(confirmations + 1) / math.log(self.k + 1)
        return max(self.min_s, self.max_s - frac * (self.max_s - self.min_s))

    @property
    def deadline(self) -> float:
        return self.start + self.timeout()


@dataclass
class Probe:
    seq: int
    target: str
    ack_deadline: float  # then ping-reqs
    deadline: float  # then the target is suspected
    relays: list[str] = field(default_factory=list)
    nacks: set[str] = field(default_factory=set)
    indirect_sent: bool = False


@dataclass
class Relay:
    requester: str
    requester_seq: int
    target: str
    deadline: float


@dataclass
class _Queued:
    update: Update
    rank: tuple[int, int]  # (transmissions so far, -order): the smallest goes first


_RANK = operator.attrgetter("rank")


class Broadcasts:
    """Updates waiting to ride on messages (memberlist's TransmitLimitedQueue): each goes
    out at most `limit` times, the least sent (then the newest) first."""

    def __init__(self) -> None:
        self._queue: list[_Queued] = []
        self._order = 0

    def __len__(self) -> int:
        return len(self._queue)

    def add(self, update: Update) -> None:
        """Queue `update`; it replaces queued ones it makes moot (older incarnations of the
        same member, the same accuser's weaker or equal claim)."""
        member, incarnation, origin, kind = (
            update.member,
            update.incarnation,
            update.origin,
            update.kind,
        )
        self._queue = [
            q
            for q in self._queue
            if q.update.member != member
            or not (
                q.update.incarnation < incarnation
                or (q.update.origin == origin and q.update.kind <= kind)
            )
        ]
        self._order += 1
        self._queue.append(_Queued(update, (0, -self._order)))

    def forget(self, member: str) -> None:
        self._queue = [q for q in self._queue if q.update.member != member]

    def take(self, count: int, limit: int) -> list[Update]:
        """Up to `count` updates to send now; each counts one transmission of `limit`."""
        if not self._queue:
            return []
        taken = heapq.nsmallest(count, self._queue, key=_RANK)
        spent = False
        for queued in taken:
            sent, order = queued.rank
            queued.rank = (sent + 1, order)
            spent |= sent + 1 >= limit
        if spent:
            self._queue = [q for q in self._queue if q.rank[0] < limit]
        return [q.update for q in taken]
