"""The sans-IO election core: votes, terms, pre-vote, stickiness, the lease, persistence."""

from __future__ import annotations

import random

import pytest

from scheduler.election import (
    ElectionCore,
    ElectionSettings,
    LeaderChanged,
    Persist,
    PersistentState,
    Role,
    Send,
)
from scheduler.election_wire import Heartbeat, HeartbeatReply, VoteReply, VoteRequest

S = ElectionSettings()
VOTERS = frozenset({"a", "b", "c"})


def core(name: str = "a", voters: frozenset[str] = VOTERS, now: float = 0.0, **kw) -> ElectionCore:
    return ElectionCore("c1", name, voters, now, rng=random.Random(name), **kw)


def sends(effects, kind=None):
    return [
        e for e in effects if isinstance(e, Send) and (kind is None or isinstance(e.message, kind))
    ]


def fire(c: ElectionCore, now: float | None = None):
    """Tick at the core's own deadline (or `now`)."""
    return c.tick(c.next_deadline() if now is None else now)


def elect(c: ElectionCore, now: float = 1.5) -> float:
    """Drive `c` through pre-vote and vote to leadership with the others' grants."""
    effects = fire(c, now)
    assert c.role is Role.PRE_CANDIDATE
    term = c.term + 1
    assert {e.to for e in sends(effects, VoteRequest)} == set(VOTERS - {c.self_id})
    effects = c.receive("b", VoteReply("c1", term, True, pre=True), now)
    assert c.role is Role.CANDIDATE and c.term == term and c.voted_for == c.self_id
    assert isinstance(effects[0], Persist) and effects[0].state == PersistentState(term, c.self_id)
    effects = c.receive("b", VoteReply("c1", term, True, pre=False), now + 0.01)
    assert c.role is Role.LEADER and c.leader == c.self_id
    assert LeaderChanged(term, c.self_id) in effects
    assert {e.to for e in sends(effects, Heartbeat)} == {"b", "c"}
    return now + 0.01


def test_settings_refuse_a_lease_that_clock_drift_could_overlap_with_an_election():
    with pytest.raises(ValueError, match="lease_s"):
        ElectionSettings(lease_s=0.55)
    ElectionSettings(lease_s=0.54)
    with pytest.raises(ValueError):
        ElectionSettings(heartbeat_s=0.6)
    with pytest.raises(ValueError):
        ElectionSettings(election_timeout_min_s=2.0, election_timeout_max_s=1.0)


def test_election_timeouts_are_randomised_within_bounds():
    deadlines = {core(str(i), frozenset({str(i), "x", "y"})).next_deadline() for i in range(50)}
    assert len(deadlines) == 50
    assert all(S.election_timeout_min_s <= d <= S.election_timeout_max_s for d in deadlines)


def test_a_node_wins_with_a_majority_and_heartbeats():
    a = core()
    now = elect(a)
    assert a.is_coordinator(now)
    effects = fire(a)
    assert {e.to for e in sends(effects, Heartbeat)} == {"b", "c"}
    assert a.stats["elections_won"] == 1


def test_pre_vote_changes_no_term_and_a_minority_of_pre_votes_starts_no_election():
    a = core()
    effects = fire(a, 1.5)
    assert a.term == 0 and a.role is Role.PRE_CANDIDATE
    assert not any(isinstance(e, Persist) for e in effects)
    req = sends(effects, VoteRequest)[0].message
    assert req.pre and req.term == 1
    a.receive("b", VoteReply("c1", 0, False, pre=True), 1.5)
    assert a.role is Role.PRE_CANDIDATE and a.term == 0
    # its timer fires again: another pre-vote, still term 0
    fire(a)
    assert a.term == 0 and a.stats["pre_votes_started"] == 2


def test_one_vote_per_term_persisted_before_the_grant_is_sent():
    b = core("b")
    effects = b.receive("a", VoteRequest("c1", 1, pre=False), 2.0)
    assert [type(e) for e in effects] == [Persist, Persist, Send]
    assert effects[-2].state == PersistentState(1, "a")
    assert effects[-1].message == VoteReply("c1", 1, True, pre=False)
    # c asks in the same term, later (b's stickiness from its vote has passed): refused
    effects = b.receive("c", VoteRequest("c1", 1, pre=False), 4.0)
    assert effects == [Send("c", VoteReply("c1", 1, False, pre=False))]
    # a asks again (a retransmission): granted again, nothing new to persist
    effects = b.receive("a", VoteRequest("c1", 1, pre=False), 4.1)
    assert effects == [Send("a", VoteReply("c1", 1, True, pre=False))]


def test_the_vote_survives_a_restart():
    b = core("b")
    effects = b.receive("a", VoteRequest("c1", 3, pre=False), 2.0)
    saved = [e.state for e in effects if isinstance(e, Persist)][-1]
    restarted = core("b", state=saved, now=100.0)
    assert restarted.term == 3 and restarted.voted_for == "a"
    effects = restarted.receive("c", VoteRequest("c1", 3, pre=False), 200.0)
    assert effects == [Send("c", VoteReply("c1", 3, False, pre=False))]


def test_a_restarted_node_refuses_votes_for_the_minimum_timeout_then_grants():
    b = core("b", now=10.0)
    early = b.receive("a", VoteRequest("c1", 1, pre=True), 10.0 + S.election_timeout_min_s / 2)
    assert early == [Send("a", VoteReply("c1", 0, False, pre=True))]
    later = b.receive("a", VoteRequest("c1", 1, pre=True), 10.01 + S.election_timeout_min_s)
    assert later == [Send("a", VoteReply("c1", 1, True, pre=True))]
    assert b.term == 0  # a pre-vote changes nothing


def test_lower_term_requests_are_refused_with_the_current_term():
    b = core("b", state=PersistentState(5, None))
    effects = b.receive("a", VoteRequest("c1", 4, pre=False), 5.0)
    assert effects == [Send("a", VoteReply("c1", 5, False, pre=False))]
    effects = b.receive("a", VoteRequest("c1", 5, pre=True), 5.0)
    assert effects == [Send("a", VoteReply("c1", 5, False, pre=True))]
    effects = b.receive("a", Heartbeat("c1", 4, 1), 5.0)
    assert effects == [Send("a", HeartbeatReply("c1", 5, 1, False))]


def test_a_follower_of_a_live_coordinator_refuses_a_returning_node():
    """Pre-vote and stickiness: a node back from a partition cannot depose the coordinator."""
    b = core("b")
    b.receive("a", Heartbeat("c1", 2, 7), 3.0)
    assert b.leader == "a" and b.term == 2
    # c comes back with an inflated term: refused, and b does not adopt it
    pre = b.receive("c", VoteRequest("c1", 9, pre=True), 3.2)
    assert pre == [Send("c", VoteReply("c1", 2, False, pre=True))]
    vote = b.receive("c", VoteRequest("c1", 9, pre=False), 3.3)
    assert vote == [Send("c", VoteReply("c1", 2, False, pre=False))]
    assert b.term == 2 and b.leader == "a"


def test_a_candidate_adopts_a_higher_term_from_a_refusal_and_steps_back():
    a = core()
    fire(a, 1.5)
    effects = a.receive("b", VoteReply("c1", 7, False, pre=True), 1.5)
    assert a.term == 7 and a.role is Role.FOLLOWER and a.voted_for is None
    assert Persist(PersistentState(7, None)) in effects


def test_a_leader_stops_commanding_at_its_lease_end_and_steps_down_after_step_down_s():
    a = core()
    now = elect(a)
    lease_end = a.lease_until
    assert lease_end <= now + S.lease_s
    # nobody answers: the lease runs out (no commands), heartbeats go on until step_down_s
    t = now
    heartbeats_after_lease = 0
    while a.role is Role.LEADER:
        t = a.next_deadline()
        effects = a.tick(t)
        assert t <= now + S.step_down_s + 1e-9
        if t >= lease_end and a.role is Role.LEADER:
            assert not a.is_coordinator(t)
            heartbeats_after_lease += len(sends(effects, Heartbeat))
    assert t == pytest.approx(now + S.step_down_s)
    assert heartbeats_after_lease > 0 and a.stats["lease_lapsed"] == 1
    assert a.stats["stepped_down"] == 1 and a.leader is None
    assert LeaderChanged(a.term, None) in effects
    assert not a.is_coordinator(t)


def test_a_lapsed_lease_is_won_back_by_a_majority_answering_a_later_round():
    """A round trip longer than the lease for a while (a loaded machine) costs commands,
    not the lead: answers to a later round give the lease back."""
    a = core()
    now = elect(a)
    t = a.lease_until + 0.2
    effects = a.tick(t)
    assert a.role is Role.LEADER and not a.is_coordinator(t)
    rnd = sends(effects, Heartbeat)[0].message.round
    # a stale round's answer (sent before the lease ran out, answered late) gives nothing
    a.receive("b", HeartbeatReply("c1", a.term, rnd - 1, True), t + 0.1)
    assert not a.is_coordinator(t + 0.1)
    a.receive("b", HeartbeatReply("c1", a.term, rnd, True), t + 0.1)  # with a: two of three
    assert a.is_coordinator(t + 0.1) and a.lease_until == pytest.approx(t + S.lease_s)
    assert a.stats["stepped_down"] == 0 and now < t


def test_answers_extend_the_lease_from_when_their_round_was_sent():
    a = core()
    now = elect(a)
    effects = fire(a)
    t = a.next_deadline() - S.heartbeat_s  # when that round went out
    rnd = sends(effects, Heartbeat)[0].message.round
    a.receive("b", HeartbeatReply("c1", a.term, rnd, True), t + 0.3)
    assert a.lease_until == pytest.approx(t + S.lease_s)
    # a stale answer of another term does not count
    a.receive("c", HeartbeatReply("c1", a.term - 1, rnd + 1, True), t + 0.3)
    assert a.lease_until == pytest.approx(t + S.lease_s)
    assert a.is_coordinator(now + 0.4)


def test_a_paused_leader_steps_down_before_it_does_anything_else():
    a = core()
    now = elect(a)
    # paused 3 s past its lease, then a heartbeat answer arrives first
    effects = a.receive("b", HeartbeatReply("c1", a.term, 1, True), now + 3.0)
    assert a.role is Role.FOLLOWER and not a.is_coordinator(now + 3.0)
    assert not sends(effects, Heartbeat)


def test_a_stale_leader_learns_the_new_term_from_a_heartbeat_answer():
    a = core()
    elect(a)
    effects = a.receive("b", HeartbeatReply("c1", a.term + 3, 1, False), 1.6)
    assert a.role is Role.FOLLOWER and a.term == 4
    assert Persist(PersistentState(4, None)) in effects


def test_messages_from_non_voters_and_other_clusters_are_ignored_and_counted():
    b = core("b")
    assert b.receive("mallory", VoteRequest("c1", 5, pre=False), 5.0) == []
    assert b.receive("mallory", Heartbeat("c1", 5, 1), 5.0) == []
    assert b.receive("a", Heartbeat("other", 5, 1), 5.0) == []
    assert b.term == 0 and b.leader is None
    assert b.stats["not_voter"] == 2 and b.stats["wrong_cluster"] == 1


def test_a_cluster_of_one_elects_itself():
    a = core("a", frozenset({"a"}))
    effects = fire(a)
    assert a.role is Role.LEADER and a.term == 1
    assert Persist(PersistentState(1, "a")) in effects
    t = a.next_deadline()
    fire(a)
    assert a.is_coordinator(t + 0.01)


def test_voters_change_one_at_a_time_and_a_removed_leader_steps_down():
    a = core()
    now = elect(a)
    with pytest.raises(ValueError):
        a.set_voters(frozenset({"a", "d", "e"}), now)
    a.set_voters(VOTERS | {"d"}, now)
    assert a.role is Role.LEADER
    effects = fire(a)
    assert {e.to for e in sends(effects, Heartbeat)} == {"b", "c", "d"}
    a.set_voters((VOTERS | {"d"}) - {"a"}, now + 0.2)
    assert a.role is Role.FOLLOWER and a.leader is None


def test_a_non_voter_never_starts_an_election():
    w = core("w")
    for _ in range(5):
        assert fire(w) == []
    assert w.term == 0 and w.role is Role.FOLLOWER


def test_three_cores_elect_exactly_one_coordinator():
    """A tiny loop delivering every Send at once: one leader, the others follow it."""
    cores = {n: core(n) for n in sorted(VOTERS)}
    now = 0.0
    for _ in range(200):
        now = min(c.next_deadline() for c in cores.values())
        queue = [(n, e) for n, c in cores.items() for e in c.tick(now)]
        while queue:
            src, effect = queue.pop(0)
            if isinstance(effect, Send):
                queue.extend(
                    (effect.to, e) for e in cores[effect.to].receive(src, effect.message, now)
                )
        leaders = [c for c in cores.values() if c.role is Role.LEADER]
        if leaders and all(c.leader == leaders[0].self_id for c in cores.values()):
            break
    assert len(leaders) == 1
    assert {c.term for c in cores.values()} == {leaders[0].term}


def test_the_signed_votes_that_elected_a_coordinator_are_kept_late_ones_too():
    c = core("a", frozenset({"a", "b", "c", "d", "e"}))
    fire(c, 1.5)
    term = c.term + 1
    for voter in ("b", "c"):
        c.receive(voter, VoteReply("c1", term, True, pre=True), 1.5)
    assert c.role is Role.CANDIDATE and c.vote_proofs == {}
    c.receive("b", VoteReply("c1", term, True, False, proof=b"sig b"), 1.51)
    c.receive("c", VoteReply("c1", term, True, False, proof=b"sig c"), 1.52)
    assert c.role is Role.LEADER and c.vote_proofs == {"b": b"sig b", "c": b"sig c"}
    c.receive("d", VoteReply("c1", term, True, False, proof=b"sig d"), 1.53)  # late
    c.receive("e", VoteReply("c1", term - 1, True, False, proof=b"old"), 1.53)  # another term
    assert c.vote_proofs == {"b": b"sig b", "c": b"sig c", "d": b"sig d"}
    assert c.step_down(1.6) and c.role is Role.FOLLOWER and c.stats["proof_short"] == 1
    assert c.vote_proofs == {} and c.step_down(1.7) == []


def lead_with_late_answers(late_s: float) -> tuple[ElectionCore, float, float, int]:
    """A leader whose every heartbeat round is answered by b `late_s` after it was sent;
    (core, elected at, last tick, answers) once it stepped down or 10 s passed."""
    a = core()
    now = elect(a)
    t = now
    sent: list[tuple[float, int]] = []  # (when, round)
    answered = 0
    while a.role is Role.LEADER and t < now + 10:
        t = a.next_deadline()
        while sent and sent[0][0] + late_s <= t:
            a.receive("b", HeartbeatReply("c1", a.term, sent.pop(0)[1], True), t)
            answered += 1
            assert not a.is_coordinator(t)  # always past the lease: never commands
        sent += [(t, e.message.round) for e in sends(a.tick(t), Heartbeat)]
    return a, now, t, answered


def test_round_trips_over_the_lease_keep_the_lead_without_commands():
    """Answered 0.7 s after each round (a saturated machine): no lease, so no command, but
    the majority is in touch: the followers keep following and the term is kept."""
    a, now, t, answered = lead_with_late_answers(0.7)
    assert a.role is Role.LEADER and t >= now + 10 and answered > 50
    assert a.stats["stepped_down"] == 0 and a.stats["lease_lapsed"] == 1


def test_round_trips_over_the_longest_timer_end_in_a_step_down():
    """Answered later than a follower's longest timer: out of touch, it steps down
    `step_down_s` after it was elected (no round answered in time since)."""
    a, now, t, answered = lead_with_late_answers(S.election_timeout_max_s + 0.1)
    assert answered >= 5 and a.stats["stepped_down"] == 1
    assert t == pytest.approx(now + S.step_down_s, abs=S.heartbeat_s)
