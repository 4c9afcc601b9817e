"""Raft's leader election among a cluster's voters, as a sans-IO state machine.

`ElectionCore` is pure: it is handed messages and the time (`receive`, `tick`) and answers
with effects (`Persist`, `Send`, `LeaderChanged`) that a driver carries out in order
(`scheduler.election_driver` does it on the `p2p.network.Network` seam). A `Persist` must be
durable before any effect after it is carried out: a vote or a new term is written before the
message that depends on it leaves, so a node that crashes and restarts never votes twice in a
term (Raft's election safety).

What it implements, beyond the terms, randomised timeouts and majority votes of Raft §5.2:
- Pre-vote (Raft thesis §9.6): a node whose timer fires first asks the voters whether they
  would vote for it in the next term, without changing anyone's term; only with a majority
  does it raise its term. A node coming back from a partition so cannot depose a healthy
  coordinator by inflating its term.
- Leader stickiness (thesis §4.2.3): a voter that heard from a coordinator less than the
  minimum election timeout ago (by its own clock) neither pre-votes nor votes for anyone
  else, nor adopts the requester's term. A node counts its own boot as such a contact, since
  it may have acknowledged a heartbeat just before it crashed.
- A lease: the coordinator may command only while a majority (itself included) answered
  a heartbeat round sent less than `lease_s` ago, by its own clock (`is_coordinator`).
  Because every voter that answered the round refuses other candidates for
  `election_timeout_min_s` of its own clock from receiving it, and
  `lease_s < election_timeout_min_s * (1 - e) / (1 + e)` for clock rates within ±e, no
  other coordinator can be elected while the lease holds. (Safety of commands does not rest
  on this: `scheduler.fencing` refuses stale terms whatever the clocks do.)
- CheckQuorum (thesis §6.2), apart from the lease: a coordinator whose lease ran out stops
  commanding at once but goes on sending heartbeats; it steps down by itself only when no
  majority answered a round sent in the last `step_down_s` within `election_timeout_max_s`.
  A heartbeat round trip that takes longer than the lease (a loaded machine, connections
  re-made after a partition heals) so costs a pause in commands, not a new term: the
  followers, whose timers the heartbeats keep resetting, go on following it; round trips
  that stay longer than a follower's longest timer end in a step-down and an election. A
  lease won back after a lapse is as safe as the first: a voter that answers a round of
  term T has not voted in a later term, and refuses to for `election_timeout_min_s` from
  then.

Time is only ever this node's monotonic clock, and only differences of it are used; no time
crosses the wire. Voter changes come from outside (the membership registry), one at a time.

Term proofs: a granted vote's `proof` (the voter's signature, checked by the driver before
the reply gets here) is kept with the vote, and the proofs of the votes that elected this
node, plus any that come in after it won, are `vote_proofs` (the driver makes them the term's
`TermProof`, `scheduler.fencing`). The core signs and verifies nothing.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from enum import Enum

from scheduler.election_wire import (
    ElectionMessage,
    Heartbeat,
    HeartbeatReply,
    VoteReply,
    VoteRequest,
)

MAX_ROUNDS_KEPT = 64  # heartbeat rounds whose answers still count towards the lease


@dataclass(frozen=True)
class ElectionSettings:
    """Timings of the election, in seconds of each node's own clock.

    The defaults aim at a failover (coordinator dead until a new one is known to all) under
    3 s at p99 with clocks whose rates are off by up to `max_rate_error` (5 %):
    - `heartbeat_s` 0.15: three heartbeat rounds per lease, so one lost round does not cost
      the coordinator its lease, at ~7 messages per voter per second;
    - `election_timeout_min_s` 0.6: four heartbeats, so followers do not start elections
      over a lost heartbeat or two, and the lease bound below leaves room;
    - `election_timeout_max_s` 1.2: a 0.6 s spread, wide against the ~4 network legs a
      pre-vote and a vote take, so candidacies rarely collide; a failover is then about one
      timeout (0.6-1.2 s) plus a few round trips, and a split vote costs one more timeout:
      2.4 s plus round trips stays under 3 s;
    - `lease_s` 0.5, below 0.6 * 0.95 / 1.05 = 0.543: a voter's refusal window
      (`election_timeout_min_s` on a clock up to 5 % fast) outlasts the coordinator's lease
      (on a clock up to 5 % slow) counted from the same heartbeat round;
    - `step_down_s` 3.0: how long after the last round a majority answered within
      `election_timeout_max_s` a coordinator gives up the lead (its commands stopped when
      its lease ran out). Measured on 5 real daemons on a 2-core machine: healing a
      partition saturated the CPUs for about 2 s and requests took 0.1-0.9 s meanwhile, so
      a coordinator that stepped down at its lease's end was replaced in every run. A
      coordinator really cut off from the majority is replaced as before: the majority
      does not hear it, and elects; a killed one too (this setting does not touch
      failover).
    """

    heartbeat_s: float = 0.15
    election_timeout_min_s: float = 0.6
    election_timeout_max_s: float = 1.2
    lease_s: float = 0.5
    max_rate_error: float = 0.05
    step_down_s: float = 3.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_rate_error < 1:
            raise ValueError("max_rate_error must be in [0, 1)")
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ValueError("heartbeat_s must be positive and below lease_s")
        if not self.step_down_s >= self.lease_s:
            raise ValueError("step_down_s must be at least lease_s")
        if not self.election_timeout_min_s < self.election_timeout_max_s:
            raise ValueError("election_timeout_min_s must be below election_timeout_max_s")
        e = self.max_rate_error
        if self.lease_s >= self.election_timeout_min_s * (1 - e) / (1 + e):
            raise ValueError(
                "lease_s must be below election_timeout_min_s * (1 - e) / (1 + e) for clock "
                f"rate error e = {e}, or two coordinators could hold leases at once"
            )


class Role(Enum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass(frozen=True)
class PersistentState:
    """What must survive a restart: the current term and the vote cast in it."""

    term: int = 0
    voted_for: str | None = None


@dataclass(frozen=True)
class Persist:
    """Write `state` durably before carrying out any later effect."""

    state: PersistentState


@dataclass(frozen=True)
class Send:
    to: str
    message: ElectionMessage


@dataclass(frozen=True)
class LeaderChanged:
    """This node's view of the coordinator changed (`leader` None: none known)."""

    term: int
    leader: str | None


Effect = Persist | Send | LeaderChanged


def majority(voters: frozenset[str]) -> int:
    return len(voters) // 2 + 1


class ElectionCore:
    """One node's part in one cluster's election. Not thread-safe; call from one task."""

    def __init__(
        self,
        cluster: str,
        self_id: str,
        voters: frozenset[str],
        now: float,
        *,
        settings: ElectionSettings | None = None,
        state: PersistentState | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.cluster = cluster
        self.self_id = self_id
        self.voters = frozenset(voters)
        self.settings = settings or ElectionSettings()
        self._rng = rng or random.Random()
        state = state or PersistentState()
        self.term = state.term
        self.voted_for = state.voted_for
        self.role = Role.FOLLOWER
        self.leader: str | None = None
        self.stats: Counter[str] = Counter()
        # booting counts as hearing from a coordinator (see the module docstring)
        self._last_leader_contact = now
        self._election_deadline = now + self._timeout()
        self._votes: set[str] = set()
        self._proofs: dict[str, bytes] = {}  # voter -> its signed vote in this candidacy
        self._candidacy_started = now
        self._round = 0
        self._round_sent: dict[int, float] = {}
        self._round_acks: dict[int, set[str]] = {}
        self._next_heartbeat = now
        self._lease_until = now
        self._leader_since = now
        self._acked: dict[str, float] = {}
        self._lapsed = False  # leading past the lease's end (counted once per lapse)
        self._quorum_at = now  # when the last round a majority answered in time was sent

    # -- queries -----------------------------------------------------------------------

    def is_coordinator(self, now: float) -> bool:
        """True while this node leads with a valid lease (may issue commands)."""
        return self.role is Role.LEADER and now < self._lease_until

    @property
    def lease_until(self) -> float:
        return self._lease_until

    @property
    def last_leader_contact(self) -> float:
        """When this node last heard from a coordinator (or voted, or booted), its clock."""
        return self._last_leader_contact

    @property
    def last_acks(self) -> dict[str, float]:
        """While leading: each voter's last answered heartbeat (when its round was sent)."""
        return dict(self._acked)

    def next_deadline(self) -> float:
        """When `tick` must next be called (this node's clock)."""
        if self.role is Role.LEADER:
            return min(self._next_heartbeat, self._step_down_at())
        return self._election_deadline

    @property
    def vote_proofs(self) -> dict[str, bytes]:
        """While leading: the signed votes of this term (voter -> signature; this node's own
        is not among them)."""
        return dict(self._proofs) if self.role is Role.LEADER else {}

    @property
    def persistent(self) -> PersistentState:
        return PersistentState(self.term, self.voted_for)

    # -- inputs ------------------------------------------------------------------------

    def tick(self, now: float) -> list[Effect]:
        """Timers: the lease, heartbeats, and the election timeout."""
        out: list[Effect] = []
        if self.role is Role.LEADER:
            if now >= self._step_down_at():
                self.stats["lease_lost"] += 1
                self._become_follower(now, None, out)
                return out
            if now >= self._lease_until and not self._lapsed:
                self._lapsed = True  # commands stop; heartbeats go on (CheckQuorum)
                self.stats["lease_lapsed"] += 1
            if now >= self._next_heartbeat:
                self._send_heartbeats(now, out)
            return out
        if now >= self._election_deadline and self.self_id in self.voters:
            self._start_pre_vote(now, out)
        elif now >= self._election_deadline:
            self._election_deadline = now + self._timeout()
        return out

    def receive(self, sender: str, message: ElectionMessage, now: float) -> list[Effect]:
        """One message from `sender` (its identity as the transport vouches for it)."""
        out: list[Effect] = []
        if message.cluster != self.cluster:
            self.stats["wrong_cluster"] += 1
            return out
        if sender not in self.voters or sender == self.self_id:
            self.stats["not_voter"] += 1
            return out
        if self.role is Role.LEADER and now >= self._step_down_at():
            self.stats["lease_lost"] += 1  # a paused coordinator wakes up: lease first
            self._become_follower(now, None, out)
        if isinstance(message, VoteRequest):
            self._on_vote_request(sender, message, now, out)
        elif isinstance(message, VoteReply):
            self._on_vote_reply(sender, message, now, out)
        elif isinstance(message, Heartbeat):
            self._on_heartbeat(sender, message, now, out)
        else:
            self._on_heartbeat_reply(sender, message, now, out)
        return out

    def set_voters(self, voters: frozenset[str], now: float) -> list[Effect]:
        """Apply one voter change from the membership registry (one voter added or removed)."""
        voters = frozenset(voters)
        if len(voters ^ self.voters) > 1:
            raise ValueError("voters change one at a time")
        out: list[Effect] = []
        self.voters = voters
        if self.self_id not in voters and self.role is not Role.FOLLOWER:
            self._become_follower(now, None, out)
        elif self.role is Role.CANDIDATE and len(self._votes & voters) >= majority(voters):
            self._become_leader(now, out)
        return out

    def step_down(self, now: float) -> list[Effect]:
        """Give up the lead (the driver's call: its term proof no longer convinces the
        members, after a voter change); the next election proves a new term."""
        out: list[Effect] = []
        if self.role is Role.LEADER:
            self.stats["proof_short"] += 1
            self._become_follower(now, None, out)
        return out

    # -- handlers ----------------------------------------------------------------------

    def _on_vote_request(
        self, sender: str, msg: VoteRequest, now: float, out: list[Effect]
    ) -> None:
        # heard from a coordinator lately (or booted, or voted, lately: a lease may hold)
        sticky = (
            self.role is Role.LEADER
            or now - self._last_leader_contact < self.settings.election_timeout_min_s
        )
        if msg.pre:
            granted = msg.term > self.term and not sticky
            self.stats["pre_votes_granted" if granted else "pre_votes_denied"] += 1
            term = msg.term if granted else self.term
            out.append(Send(sender, VoteReply(self.cluster, term, granted, pre=True)))
            return
        if msg.term < self.term or sticky:
            self.stats["votes_denied"] += 1
            out.append(Send(sender, VoteReply(self.cluster, self.term, False, pre=False)))
            return
        if msg.term > self.term:
            self._adopt_term(msg.term, now, out)
        granted = self.voted_for in (None, sender)
        if granted:
            if self.voted_for is None:
                self.voted_for = sender
                out.append(Persist(self.persistent))
            self._last_leader_contact = now  # as if it led: see the lease in the docstring
            self._election_deadline = now + self._timeout()
            self.stats["votes_granted"] += 1
        else:
            self.stats["votes_denied"] += 1
        out.append(Send(sender, VoteReply(self.cluster, self.term, granted, pre=False)))

    def _on_vote_reply(self, sender: str, msg: VoteReply, now: float, out: list[Effect]) -> None:
        if msg.term > self.term and not msg.granted:
            self._adopt_term(msg.term, now, out)
            return
        if msg.pre:
            if self.role is Role.PRE_CANDIDATE and msg.granted and msg.term == self.term + 1:
                self._votes.add(sender)
                if len(self._votes & self.voters) >= majority(self.voters):
                    self._start_election(now, out)
            return
        if not msg.granted or msg.term != self.term:
            return
        if self.role is Role.LEADER and sender not in self._proofs and msg.proof is not None:
            self._proofs[sender] = msg.proof  # a late vote: a stronger proof of the term
            return
        if self.role is Role.CANDIDATE:
            self._votes.add(sender)
            if msg.proof is not None:
                self._proofs[sender] = msg.proof
            if len(self._votes & self.voters) >= majority(self.voters):
                self._become_leader(now, out)

    def _on_heartbeat(self, sender: str, msg: Heartbeat, now: float, out: list[Effect]) -> None:
        if msg.term < self.term:
            self.stats["stale_heartbeats"] += 1
            out.append(Send(sender, HeartbeatReply(self.cluster, self.term, msg.round, False)))
            return
        if msg.term > self.term:
            self._adopt_term(msg.term, now, out)
        if self.role is Role.LEADER:  # cannot happen with one vote per term: refuse, count
            self.stats["rival_leader"] += 1
            return
        if self.role is not Role.FOLLOWER:
            self.role = Role.FOLLOWER
        self._last_leader_contact = now
        self._election_deadline = now + self._timeout()
        if self.leader != sender:
            self.leader = sender
            out.append(LeaderChanged(self.term, sender))
        out.append(Send(sender, HeartbeatReply(self.cluster, self.term, msg.round, True)))

    def _on_heartbeat_reply(
        self, sender: str, msg: HeartbeatReply, now: float, out: list[Effect]
    ) -> None:
        if msg.term > self.term:
            self._adopt_term(msg.term, now, out)
            return
        if self.role is not Role.LEADER or msg.term != self.term or not msg.ok:
            return
        acks = self._round_acks.get(msg.round)
        if acks is None:
            return  # too old to count
        acks.add(sender)
        self._acked[sender] = max(self._acked.get(sender, 0.0), self._round_sent[msg.round])
        if len(acks & self.voters) < majority(self.voters):
            return
        sent = self._round_sent[msg.round]
        if now < sent + self.settings.lease_s:
            self._lease_until = max(self._lease_until, sent + self.settings.lease_s)
            self._lapsed = False
        if now - sent < self.settings.election_timeout_max_s:
            # in touch with a majority, if slowly: put off stepping down. Round trips that
            # stay longer than a follower's longest timer end in a step-down and an election
            self._quorum_at = max(self._quorum_at, sent)

    # -- transitions -------------------------------------------------------------------

    def _step_down_at(self) -> float:
        """A coordinator steps down `step_down_s` after the last heartbeat round that a
        majority answered within `election_timeout_max_s` was sent, or after it was elected,
        if none was since."""
        return max(self._quorum_at, self._leader_since) + self.settings.step_down_s

    def _timeout(self) -> float:
        s = self.settings
        return self._rng.uniform(s.election_timeout_min_s, s.election_timeout_max_s)

    def _others(self) -> list[str]:
        return sorted(self.voters - {self.self_id})

    def _adopt_term(self, term: int, now: float, out: list[Effect]) -> None:
        """A higher term seen: follow it, with no vote cast yet (persisted at once)."""
        self.term = term
        self.voted_for = None
        out.append(Persist(self.persistent))
        self._become_follower(now, None, out, reset_timer=False)

    def _become_follower(
        self, now: float, leader: str | None, out: list[Effect], *, reset_timer: bool = True
    ) -> None:
        was_leader = self.role is Role.LEADER
        self.role = Role.FOLLOWER
        self._votes = set()
        self._proofs = {}
        if was_leader:
            self.stats["stepped_down"] += 1
            self._round_sent.clear()
            self._round_acks.clear()
        if reset_timer or was_leader:
            self._election_deadline = now + self._timeout()
        if self.leader != leader:
            self.leader = leader
            out.append(LeaderChanged(self.term, leader))

    def _start_pre_vote(self, now: float, out: list[Effect]) -> None:
        self.role = Role.PRE_CANDIDATE
        self._votes = {self.self_id}
        self._proofs = {}
        self._election_deadline = now + self._timeout()
        self.stats["pre_votes_started"] += 1
        if self.leader is not None:
            self.leader = None
            out.append(LeaderChanged(self.term, None))
        if len(self._votes & self.voters) >= majority(self.voters):
            self._start_election(now, out)
            return
        request = VoteRequest(self.cluster, self.term + 1, pre=True)
        out.extend(Send(peer, request) for peer in self._others())

    def _start_election(self, now: float, out: list[Effect]) -> None:
        self.role = Role.CANDIDATE
        self.term += 1
        self.voted_for = self.self_id
        self._votes = {self.self_id}
        self._proofs = {}
        self._candidacy_started = now
        self._election_deadline = now + self._timeout()
        self.stats["elections_started"] += 1
        out.append(Persist(self.persistent))
        if len(self._votes & self.voters) >= majority(self.voters):
            self._become_leader(now, out)
            return
        request = VoteRequest(self.cluster, self.term, pre=False)
        out.extend(Send(peer, request) for peer in self._others())

    def _become_leader(self, now: float, out: list[Effect]) -> None:
        self.role = Role.LEADER
        self.stats["elections_won"] += 1
        self._round_sent.clear()
        self._round_acks.clear()
        self._acked = {}
        self._lapsed = False
        self._quorum_at = now
        # every voter that granted its vote refuses others from the moment it granted it,
        # which is after the candidacy started
        self._lease_until = self._candidacy_started + self.settings.lease_s
        self._leader_since = now
        self.leader = self.self_id
        out.append(LeaderChanged(self.term, self.self_id))
        self._send_heartbeats(now, out)

    def _send_heartbeats(self, now: float, out: list[Effect]) -> None:
        self._round += 1
        self._round_sent[self._round] = now
        self._round_acks[self._round] = {self.self_id}
        if len(self._round_sent) > MAX_ROUNDS_KEPT:
            oldest = min(self._round_sent)
            del self._round_sent[oldest]
            del self._round_acks[oldest]
        self._next_heartbeat = now + self.settings.heartbeat_s
        if majority(self.voters) <= 1 and self.self_id in self.voters:
            self._lease_until = now + self.settings.lease_s  # a cluster of one
        heartbeat = Heartbeat(self.cluster, self.term, self._round)
        out.extend(Send(peer, heartbeat) for peer in self._others())
