"""Failure detection inside a cluster: SWIM with Lifeguard's refinements, as a sans-IO core.

As HashiCorp memberlist does it:
- every `probe_interval_s` a member pings the next member of a shuffled round-robin list; no
  ack within `probe_timeout_s` and it asks `indirect_checks` random members to ping it
  (ping-req); no ack through any of them by the end of the interval and it suspects it;
- a suspicion ends in death after a timeout that grows with log10 of the cluster size and
  shrinks from a max toward a min as independent accusers confirm it (Lifeguard's dynamic
  suspicion: `suspicion_mult`, `suspicion_max_timeout_mult`, k = suspicion_mult - 2);
- a suspected member refutes by signing a higher incarnation;
- Lifeguard's local health: missed acks and nacks, and having to refute, raise an awareness
  score that multiplies the probe interval and timeout (up to `awareness_max_multiplier`),
  so a slow or overloaded member probes less and accuses less;
- state changes ride on every message (pings, acks, gossip) and on a gossip round while
  there is something to spread, each retransmitted at most retransmit_mult*ceil(log10(n+1))
  times, fewest-sent first.

The trust model (memberlist trusts every member's word; we do not):
- the transport authenticates who sent a message (Noise in libp2p); messages from peers that
  are not members (the membership registry says who is) are refused and counted, and so are
  claims made by or about non-members;
- an alive claim is valid only when signed by the member itself, so nobody can keep a dead
  member alive, resurrect it or refute for it;
- a suspect or dead claim is signed by its accuser and carries the accused member's own
  signature of the incarnation it accuses (`proof`): nobody can accuse an incarnation the
  member never had, so a forged higher incarnation cannot outrun the member's refutation;
- a claim of death is only an accusation: each member declares a death itself, when its own
  suspicion timer runs out; one accuser (a lying member) never makes it shorter than the
  timeout of one confirmation, within which the accused, being healthy, hears the claim
  (it rides on every message to it) and refutes. Confirmations count distinct accusers.
  What is left: a lying member can make a healthy one refute (churn, counted), and k
  colluding members can shrink the timeout to its min; they cannot kill a member that
  refutes within it.
A claim about ourselves at an incarnation above ours, proved with our own signature, is from
an earlier life of this node (restarted): we refute above it.

The core does no IO and reads no clock: `on_message` and `on_tick` take the time from the
caller (a monotonic clock, seconds) and return effects: `Send` (a message to a member; Ping,
PingReq and Gossip are requests answered by an Ack or a Nack) and `StateChanged`.
`next_deadline()` says when to call `on_tick` next. `scheduler.swim_driver` runs it on a
`p2p.network.Network`; `scheduler.swim_wire` holds the messages.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Iterable

from scheduler import swim_wire as wire
from scheduler.swim_state import (
    Broadcasts,
    Effect,
    Member,
    Probe,
    Relay,
    Send,
    State,
    StateChanged,
    Suspicion,
    SwimSettings,
)
from scheduler.swim_wire import ALIVE, DEAD, SUSPECT, Update

__all__ = ["Effect", "Member", "Send", "State", "StateChanged", "Suspicion", "Swim", "SwimSettings"]


class Swim:
    """One member's failure detector for one cluster (see the module docstring)."""

    def __init__(
        self,
        me: str,
        cluster: str,
        settings: SwimSettings,
        *,
        sign: Callable[[bytes], bytes],
        verify: Callable[[str, bytes, bytes], bool],
        incarnation: int,
        now: float,
        members: Iterable[str] = (),
        rng: random.Random | None = None,
    ) -> None:
        """`incarnation`: where this life starts; above any of an earlier life (the driver
        passes the wall clock in ms; at least 1). `sign` signs with this node's key;
        `verify(peer id, message, signature)` checks another's."""
        if incarnation < 1:
            raise ValueError("an incarnation starts at 1 (0 means never heard from)")
        if settings.probe_timeout_s >= settings.probe_interval_s:
            raise ValueError("probe_timeout_s must be shorter than probe_interval_s")
        self.me = me
        self.cluster = cluster
        self.settings = settings
        self._sign = sign
        self._verify = verify
        self._rng = rng or random.Random()
        self.incarnation = incarnation
        self._proof = sign(wire.claim_bytes(cluster, ALIVE, me, incarnation))
        self.members: dict[str, Member] = {}
        self.suspicions: dict[str, Suspicion] = {}
        self.awareness = 0  # Lifeguard's local health score: 0 (healthy) .. max - 1
        self.stats: Counter[str] = Counter()
        self._order: list[str] = []  # the probe round
        self._next_index = 0
        self._probe: Probe | None = None
        self._relays: dict[int, Relay] = {}
        self._queue = Broadcasts()
        self._seq = 0
        self._next_probe = now + self._rng.uniform(0, settings.probe_interval_s)
        self._next_gossip = now
        self._next_reconnect = now + settings.reconnect_interval_s
        self._now = now  # the latest time we were called at
        self._dead = 0  # members in state DEAD
        self._expected = now  # when we last asked to be called (pause detection)
        self.set_members(members, now)
        self._enqueue(self._alive_claim())  # our join, as memberlist announces it

    # -- the members ---------------------------------------------------------------------

    def set_members(self, peer_ids: Iterable[str], now: float) -> None:
        """The cluster's members as the registry has them (ourselves included or not): new
        ones start alive and unheard of; removed ones are forgotten."""
        wanted = {p for p in peer_ids if p != self.me}
        for peer_id in list(self.members):
            if peer_id not in wanted:
                self._dead -= self.members[peer_id].state == State.DEAD
                del self.members[peer_id]
                self.suspicions.pop(peer_id, None)
                self._queue.forget(peer_id)
        for peer_id in sorted(wanted - set(self.members)):
            self.members[peer_id] = Member(peer_id, since=now)
            self._order.insert(self._rng.randint(0, len(self._order)), peer_id)

    def state_of(self, peer_id: str) -> State | None:
        member = self.members.get(peer_id)
        return None if member is None else member.state

    def live_members(self) -> list[str]:
        """Members not dead (suspects included), ourselves not."""
        return [p for p, m in self.members.items() if m.state != State.DEAD]

    @property
    def queued(self) -> int:
        """Updates waiting to be piggybacked (0 in a quiet cluster)."""
        return len(self._queue)

    @property
    def size(self) -> int:
        """The cluster's size as the timeouts count it (ourselves included)."""
        return len(self.members) + 1

    def scaled(self, seconds: float) -> float:
        """A probe interval or timeout under the current local health."""
        return seconds * (self.awareness + 1)

    def retransmit_limit(self) -> int:
        return self.settings.retransmit_mult * math.ceil(math.log10(self.size + 1))

    def _adjust_awareness(self, delta: int) -> None:
        top = self.settings.awareness_max_multiplier - 1
        self.awareness = min(top, max(0, self.awareness + delta))

    # -- time ----------------------------------------------------------------------------

    def next_deadline(self) -> float:
        """When `on_tick` should run next."""
        times = [self._next_probe, *(r.deadline for r in self._relays.values())]
        if self._probe is not None:
            probe = self._probe
            times.append(probe.deadline if probe.indirect_sent else probe.ack_deadline)
        times.extend(s.deadline for s in self.suspicions.values())
        # timers that wait only while there is work: none is due before the last call
        if self._queue:
            times.append(max(self._next_gossip, self._now))
        if self._dead:
            times.append(max(self._next_reconnect, self._now))
        return min(times)

    def _check_pause(self, now: float) -> None:
        """Called far later than asked: we were paused, and heard nothing meanwhile. Shift
        every timer by the pause, so no suspicion expires and no probe fails for it."""
        late = now - self._expected
        self._now = max(self._now, now)
        if late <= self.settings.pause_threshold_s:
            return
        self.stats["pauses"] += 1
        for suspicion in self.suspicions.values():
            suspicion.start += late
        self._probe = None  # its answer, if any, came while we slept
        self._relays.clear()  # their askers gave up long ago
        self._next_probe = self._next_gossip = now
        self._next_reconnect = now + self.settings.reconnect_interval_s

    def _done(self, now: float, effects: list[Effect]) -> list[Effect]:
        self._expected = max(self.next_deadline(), now)
        return effects

    def on_tick(self, now: float) -> list[Effect]:
        """Run every timer that is due."""
        self._check_pause(now)
        effects: list[Effect] = []
        probe = self._probe
        if probe is not None and not probe.indirect_sent and now >= probe.ack_deadline:
            self._indirect(probe, effects)
        if probe is not None and now >= probe.deadline:
            self._probe_failed(probe, now, effects)
        for seq, relay in list(self._relays.items()):
            if now >= relay.deadline:
                del self._relays[seq]
                effects.append(Send(relay.requester, self._reply(wire.Nack, relay)))
        for peer_id, suspicion in list(self.suspicions.items()):
            if now >= suspicion.deadline:
                self._declare_dead(peer_id, now, effects)
        if now >= self._next_probe:
            self._start_probe(now, effects)
        if self._queue and now >= self._next_gossip:
            self._gossip(now, effects)
        if now >= self._next_reconnect:
            self._reconnect(now, effects)
        return self._done(now, effects)

    # -- probing -------------------------------------------------------------------------

    def _next_target(self) -> str | None:
        for _ in range(2):
            while self._next_index < len(self._order):
                peer_id = self._order[self._next_index]
                self._next_index += 1
                member = self.members.get(peer_id)
                if member is not None and member.state != State.DEAD:
                    return peer_id
            # a new round: reshuffled, without the dead and the removed
            self._order = [p for p, m in self.members.items() if m.state != State.DEAD]
            self._rng.shuffle(self._order)
            self._next_index = 0
        return None

    def _start_probe(self, now: float, effects: list[Effect]) -> None:
        interval = self.scaled(self.settings.probe_interval_s)
        self._next_probe = now + interval
        if self._probe is not None:  # still running (its deadline is due at the same time)
            return
        target = self._next_target()
        if target is None:
            return
        seq = self._new_seq()
        self._probe = Probe(
            seq,
            target,
            ack_deadline=now + self.scaled(self.settings.probe_timeout_s),
            deadline=now + interval,
        )
        self.stats["probes"] += 1
        effects.append(Send(target, self._ping(wire.Ping, seq, target, target), interval))

    def _indirect(self, probe: Probe, effects: list[Effect]) -> None:
        probe.indirect_sent = True
        others = [
            p for p, m in self.members.items() if p != probe.target and m.state == State.ALIVE
        ]
        probe.relays = self._rng.sample(others, min(len(others), self.settings.indirect_checks))
        wait = max(probe.deadline - probe.ack_deadline, 0.0)
        for relay in probe.relays:
            self.stats["ping_reqs"] += 1
            message = self._ping(wire.PingReq, probe.seq, probe.target, relay)
            effects.append(Send(relay, message, wait))

    def _probe_failed(self, probe: Probe, now: float, effects: list[Effect]) -> None:
        self._probe = None
        self.stats["probes_failed"] += 1
        if probe.relays:  # Lifeguard: a missing nack means our own links may be the trouble
            self._adjust_awareness(len(probe.relays) - len(probe.nacks))
        else:
            self._adjust_awareness(1)
        member = self.members.get(probe.target)
        if member is None or member.state == State.DEAD:
            return
        claim = self._claim(SUSPECT, member)
        self._accuse(member, claim, now, effects)

    def _probe_acked(self, probe: Probe) -> None:
        self._probe = None
        self.stats["probes_acked"] += 1
        self._adjust_awareness(-1)

    def _gossip(self, now: float, effects: list[Effect]) -> None:
        self._next_gossip = now + self.settings.gossip_interval_s
        horizon = now - self.settings.gossip_to_the_dead_s
        peers = [
            p for p, m in self.members.items() if m.state != State.DEAD or (m.since >= horizon)
        ]
        for peer_id in self._rng.sample(peers, min(len(peers), self.settings.gossip_nodes)):
            if not self._queue:
                break
            message = self._message(wire.Gossip, self._new_seq(), peer_id)
            effects.append(Send(peer_id, message, self.settings.probe_interval_s))

    def _reconnect(self, now: float, effects: list[Effect]) -> None:
        """Ping one random dead member: one that is back refutes its death in its ack."""
        self._next_reconnect = now + self.settings.reconnect_interval_s
        dead = [p for p, m in self.members.items() if m.state == State.DEAD]
        if dead:
            target = self._rng.choice(dead)
            self.stats["reconnect_pings"] += 1
            message = self._ping(wire.Ping, self._new_seq(), target, target)
            effects.append(Send(target, message, self.settings.probe_interval_s))

    # -- messages ------------------------------------------------------------------------

    def _new_seq(self) -> int:
        self._seq += 1
        return self._seq

    def _me(self) -> wire.Me:
        return wire.Me(self.incarnation, self._proof)

    def _updates(self, to: str) -> list[Update]:
        """What rides on a message to `to`: our claim about `to` itself first when we hold
        it suspect or dead (so it can refute: Lifeguard's buddy system), then the queued
        updates sent fewest times (newest first), each at most retransmit_limit() times."""
        out: list[Update] = []
        member = self.members.get(to)
        if member is not None and member.claim is not None:
            out.append(member.claim)
        for update in self._queue.take(self.settings.max_piggyback, self.retransmit_limit()):
            if update not in out:
                out.append(update)
        return out

    def _message(self, kind: type[wire.Gossip] | type[wire.Ack], seq: int, to: str) -> wire.Message:
        return kind(wire.WIRE_VERSION, self.cluster, seq, self._me(), self._updates(to))

    def _ping(
        self, kind: type[wire.Ping] | type[wire.PingReq], seq: int, target: str, to: str
    ) -> wire.Message:
        updates = self._updates(to)
        member = self.members.get(target)
        if to != target and member is not None:  # a ping-req: our claim about the target
            claim = member.claim
            if claim is not None and claim not in updates:
                updates = [claim, *updates][: wire.MAX_UPDATES]
        return kind(wire.WIRE_VERSION, self.cluster, seq, self._me(), updates, target)

    def _reply(self, kind: type[wire.Ack] | type[wire.Nack], relay: Relay) -> wire.Message:
        return self._message(kind, relay.requester_seq, relay.requester)  # type: ignore[arg-type]

    def relaying(self, requester: str, seq: int) -> bool:
        """True while a ping-req from `requester` with `seq` awaits its target's answer."""
        return any(
            r.requester == requester and r.requester_seq == seq for r in self._relays.values()
        )

    def on_message(self, sender: str, message: wire.Message, now: float) -> list[Effect]:
        """A message from `sender` (as the transport authenticated it)."""
        self._check_pause(now)
        return self._done(now, self._on_message(sender, message, now))

    def _on_message(self, sender: str, message: wire.Message, now: float) -> list[Effect]:
        if sender not in self.members:
            self.stats["refused_non_member"] += 1
            return []
        if message.cluster != self.cluster:
            self.stats["refused_wrong_cluster"] += 1
            return []
        effects: list[Effect] = []
        me = message.me
        own = Update(ALIVE, sender, me.incarnation, me.proof, sender, b"")
        if not self._apply(own, now, effects):
            return effects  # a sender that cannot prove its own incarnation is not heard
        for update in message.updates:
            self._apply(update, now, effects)
        if isinstance(message, wire.Ping):
            if message.target != self.me:
                self.stats["refused_misdirected"] += 1
            else:
                effects.append(Send(sender, self._message(wire.Ack, message.seq, sender)))
        elif isinstance(message, wire.Gossip):
            effects.append(Send(sender, self._message(wire.Ack, message.seq, sender)))
        elif isinstance(message, wire.PingReq):
            self._relay(sender, message, now, effects)
        elif isinstance(message, wire.Ack):
            self._on_ack(sender, message, effects)
        elif isinstance(message, wire.Nack):
            probe = self._probe
            if probe is not None and probe.seq == message.seq and sender in probe.relays:
                probe.nacks.add(sender)
        return effects

    def _relay(self, sender: str, message: wire.PingReq, now: float, out: list[Effect]) -> None:
        target = message.target
        relay = Relay(sender, message.seq, target, now)
        if target in (sender, self.me) or target not in self.members:
            self.stats["refused_bad_ping_req"] += 1
            out.append(Send(sender, self._reply(wire.Nack, relay)))
            return
        if len(self._relays) >= self.settings.max_relays:
            self.stats["refused_busy"] += 1
            out.append(Send(sender, self._reply(wire.Nack, relay)))
            return
        seq = self._new_seq()
        timeout = self.scaled(self.settings.probe_timeout_s)
        relay.deadline = now + timeout * self.settings.nack_ratio
        self._relays[seq] = relay
        self.stats["relayed"] += 1
        out.append(Send(target, self._ping(wire.Ping, seq, target, target), timeout))

    def _on_ack(self, sender: str, message: wire.Ack, effects: list[Effect]) -> None:
        probe = self._probe
        if (
            probe is not None
            and probe.seq == message.seq
            and (sender == probe.target or sender in probe.relays)
        ):
            self._probe_acked(probe)
            return
        relay = self._relays.get(message.seq)
        if relay is not None and relay.target == sender:
            del self._relays[message.seq]
            effects.append(Send(relay.requester, self._reply(wire.Ack, relay)))

    # -- claims --------------------------------------------------------------------------

    def _claim(self, kind: int, member: Member) -> Update:
        """Our own signed suspect or dead claim about `member`'s current incarnation."""
        sig = self._sign(wire.claim_bytes(self.cluster, kind, member.peer_id, member.incarnation))
        return Update(kind, member.peer_id, member.incarnation, member.proof, self.me, sig)

    def _valid_proof(self, member: str, incarnation: int, proof: bytes) -> bool:
        message = wire.claim_bytes(self.cluster, ALIVE, member, incarnation)
        if self._verify(member, message, proof):
            return True
        self.stats["refused_bad_signature"] += 1
        return False

    def _apply(self, update: Update, now: float, effects: list[Effect]) -> bool:
        """One claim from a member; False when refused (counted in `stats`)."""
        subject, origin = update.member, update.origin
        if subject != self.me and subject not in self.members:
            self.stats["refused_unknown_member"] += 1
            return False
        if origin == self.me:
            return True  # our own claim coming back
        if origin not in self.members:
            self.stats["refused_non_member_claim"] += 1
            return False
        if update.kind == ALIVE:
            if origin != subject or update.sig:
                self.stats["refused_malformed_claim"] += 1
                return False
            return self._alive(update, now, effects)
        if origin == subject:
            self.stats["refused_malformed_claim"] += 1
            return False
        if subject == self.me:
            return self._accused(update)
        member = self.members[subject]
        if update.incarnation < member.incarnation or member.state == State.DEAD:
            self.stats["stale_claims"] += 1
            return True
        suspicion = self.suspicions.get(subject)
        if (
            suspicion is not None
            and update.incarnation <= suspicion.incarnation
            and origin in suspicion.accusers
        ):
            return True  # heard already
        if update.incarnation == member.incarnation:
            if update.proof != member.proof:  # Ed25519 is deterministic: one valid proof
                self.stats["refused_bad_signature"] += 1
                return False
        elif not self._valid_proof(subject, update.incarnation, update.proof):
            return False
        message = wire.claim_bytes(self.cluster, update.kind, subject, update.incarnation)
        if not self._verify(origin, message, update.sig):
            self.stats["refused_bad_signature"] += 1
            return False
        if update.incarnation > member.incarnation:
            member.incarnation, member.proof = update.incarnation, update.proof
        self._accuse(member, update, now, effects)
        return True

    def _alive(self, update: Update, now: float, effects: list[Effect]) -> bool:
        subject = update.member
        if subject == self.me:
            if update.incarnation > self.incarnation:  # an earlier life's, if it is ours
                if not self._valid_proof(self.me, update.incarnation, update.proof):
                    return False
                self._refute(update.incarnation)
            return True
        member = self.members[subject]
        if update.incarnation < member.incarnation:
            return True
        if update.incarnation == member.incarnation:
            if update.proof != member.proof and member.incarnation > 0:
                self.stats["refused_bad_signature"] += 1
                return False
            return True
        if not self._valid_proof(subject, update.incarnation, update.proof):
            return False
        member.incarnation, member.proof = update.incarnation, update.proof
        self.suspicions.pop(subject, None)
        if member.state != State.ALIVE:
            self.stats["refuted" if member.state == State.SUSPECT else "rejoined"] += 1
            self._set_state(member, State.ALIVE, now, effects)
        # spread on, as memberlist does a join or a refutation: an accusation holds only
        # against the incarnation its receiver knows, so every member should know the same
        self._enqueue(update)
        return True

    def _accused(self, update: Update) -> bool:
        """A suspect or dead claim about ourselves: refute it with a higher incarnation."""
        if update.incarnation < self.incarnation:  # its maker has not heard of our refutation
            self.stats["stale_claims"] += 1
            self._enqueue(self._alive_claim())
            return True
        if update.incarnation == self.incarnation:
            if update.proof != self._proof:
                self.stats["refused_bad_signature"] += 1
                return False
        elif not self._valid_proof(self.me, update.incarnation, update.proof):
            return False
        message = wire.claim_bytes(self.cluster, update.kind, self.me, update.incarnation)
        if not self._verify(update.origin, message, update.sig):
            self.stats["refused_bad_signature"] += 1
            return False
        self._adjust_awareness(1)  # Lifeguard: being suspected hints we are slow
        self._refute(update.incarnation)
        return True

    def _refute(self, above: int) -> None:
        self.incarnation = above + 1
        self._proof = self._sign(wire.claim_bytes(self.cluster, ALIVE, self.me, self.incarnation))
        self.stats["refutations"] += 1
        self._enqueue(self._alive_claim())

    def _alive_claim(self) -> Update:
        return Update(ALIVE, self.me, self.incarnation, self._proof, self.me, b"")

    def _accuse(self, member: Member, claim: Update, now: float, effects: list[Effect]) -> None:
        """A suspect or dead claim (ours or a member's, checked) about `member`."""
        suspicion = self.suspicions.get(member.peer_id)
        if suspicion is not None:  # as memberlist: a confirmation, whatever its incarnation
            raised = member.incarnation > suspicion.incarnation
            suspicion.incarnation = member.incarnation
            # a new accuser is spread on (memberlist stops at k: then members that hear of
            # the suspicion late never see it confirmed and wait out the max), and so is a
            # newer incarnation (who knows it ignores older claims)
            spread = raised
            if claim.origin not in suspicion.accusers:
                spread = True
                suspicion.accusers.append(claim.origin)
                self.stats["confirmations"] += 1
            if raised:
                member.claim = claim
            if spread:
                self._enqueue(claim)
            return
        n = self.size
        k = self.settings.suspicion_mult - 2
        if n - 2 < k:
            k = 0
        min_s = (
            self.settings.suspicion_mult * max(1.0, math.log10(n)) * self.settings.probe_interval_s
        )
        max_s = self.settings.suspicion_max_timeout_mult * min_s
        self.suspicions[member.peer_id] = Suspicion(
            member.incarnation, now, max(k, 0), min_s, max_s, [claim.origin]
        )
        member.claim = claim
        self.stats["suspected"] += 1
        self._set_state(member, State.SUSPECT, now, effects)
        self._enqueue(claim)

    def _declare_dead(self, peer_id: str, now: float, effects: list[Effect]) -> None:
        del self.suspicions[peer_id]
        member = self.members[peer_id]
        member.claim = self._claim(DEAD, member)
        self.stats["declared_dead"] += 1
        self._set_state(member, State.DEAD, now, effects)
        self._enqueue(member.claim)

    def _set_state(self, member: Member, state: State, now: float, effects: list[Effect]) -> None:
        self._dead += (state == State.DEAD) - (member.state == State.DEAD)
        member.state = state
        member.since = now
        if state == State.ALIVE:
            member.claim = None
        effects.append(StateChanged(member.peer_id, state, member.incarnation))

    def _enqueue(self, update: Update) -> None:
        self._queue.add(update)
