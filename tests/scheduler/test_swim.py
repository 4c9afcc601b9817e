"""The SWIM core alone (`scheduler.swim`), on a discrete-event pump: probes, indirect probes,
suspicion and its timeout, refutation, death, rejoining, piggyback bounds, local health."""

from __future__ import annotations

import math

import msgspec
import pytest

from scheduler import swim_wire as wire
from scheduler.swim import State, Suspicion, SwimSettings
from scheduler.swim_state import Broadcasts
from tests.scheduler.swim_pump import Pump, identities, make_core

DEFAULTS = SwimSettings()


def _pings(pump: Pump, src: str, kind: type = wire.Ping) -> list[tuple[float, str]]:
    """(when, to) of every `kind` message `src` sent."""
    return [(t, s.to) for t, by, s in pump.sent if by == src and type(s.message) is kind]


def test_probes_go_round_robin_and_are_acked_directly():
    pump = Pump.cluster(4)
    pump.run_for(5.0)
    a = pump.peers[0]
    core = pump.cores[a]
    targets = [to for _, to in _pings(pump, a)]
    assert len(targets) >= 20  # one per probe interval
    for start in range(0, len(targets) - 3, 3):  # each round probes every other member once
        assert sorted(targets[start : start + 3]) == sorted(pump.peers[1:])
    assert core.stats["probes_acked"] >= core.stats["probes"] - 1
    assert core.stats["ping_reqs"] == 0 and pump.changes == []


def test_a_lost_direct_ping_is_saved_by_indirect_probes():
    pump = Pump.cluster(5)
    a, b = pump.peers[:2]
    pump.cut |= {(a, b), (b, a)}  # a and b cannot talk; everyone else can
    pump.run_for(10.0)
    assert pump.cores[a].stats["ping_reqs"] > 0
    assert pump.cores[a].stats["probes_failed"] == 0
    assert sum(c.stats["relayed"] for c in pump.cores.values()) > 0
    assert pump.changes == []  # nobody was suspected


def test_the_suspicion_timeout_grows_with_log_n_and_shrinks_with_confirmations():
    n = 100
    min_s = DEFAULTS.suspicion_mult * math.log10(n) * DEFAULTS.probe_interval_s
    max_s = DEFAULTS.suspicion_max_timeout_mult * min_s
    suspicion = Suspicion(1, 10.0, 2, min_s, max_s, ["a"])
    assert suspicion.timeout() == pytest.approx(max_s)
    suspicion.accusers.append("b")
    one = max_s - (max_s - min_s) * math.log(2) / math.log(3)
    assert suspicion.timeout() == pytest.approx(one)
    suspicion.accusers.append("c")
    assert suspicion.timeout() == pytest.approx(min_s)
    assert suspicion.deadline == pytest.approx(10.0 + min_s)
    suspicion.accusers.append("d")
    assert suspicion.timeout() == pytest.approx(min_s)  # never below min


@pytest.mark.parametrize(("count", "k"), [(3, 0), (4, 2), (20, 2)])
def test_a_crashed_member_is_suspected_then_declared_dead(count, k):
    """k = suspicion_mult - 2 confirmations bring the timeout to its min; none are awaited
    where fewer than k other members could confirm."""
    pump = Pump.cluster(count)
    pump.run_for(2.0)
    victim = pump.peers[-1]
    pump.crashed.add(victim)
    seen_k = set()
    for _ in range(160):
        pump.run_for(0.05)
        seen_k |= {c.suspicions[victim].k for c in pump.cores.values() if victim in c.suspicions}
    assert seen_k == {k}
    suspected = pump.declared(victim, State.SUSPECT)
    dead = pump.declared(victim, State.DEAD)
    assert sorted(dead) == sorted(pump.peers[:-1])
    min_s = DEFAULTS.suspicion_mult * max(1.0, math.log10(count)) * DEFAULTS.probe_interval_s
    for peer, when in dead.items():
        assert min_s - 1e-9 <= when - suspected[peer] <= DEFAULTS.suspicion_max_timeout_mult * min_s
        core = pump.cores[peer]
        assert core.state_of(victim) == State.DEAD and victim not in core.suspicions
        assert core.stats["declared_dead"] == 1
    assert max(dead.values()) - 2.0 <= 5.0


def test_a_suspected_member_refutes_with_a_higher_incarnation():
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    b = pump.peers[1]
    others = [p for p in pump.peers if p != b]
    pump.cut |= {(p, b) for p in others}  # b hears nothing for a while
    pump.run_for(0.8)
    assert pump.declared(b, State.SUSPECT)
    pump.cut.clear()
    pump.run_for(3.0)
    core = pump.cores[b]
    assert core.incarnation >= 2 and core.stats["refutations"] >= 1
    assert all(pump.view(p, b) == State.ALIVE for p in others)
    assert all(pump.cores[p].members[b].incarnation == core.incarnation for p in others)
    assert pump.declared(b, State.DEAD) == {}
    assert sum(pump.cores[p].stats["refuted"] for p in others) >= 1


def _restart(pump: Pump, index: int, incarnation: int) -> None:
    ident = identities(len(pump.cores))[index]
    core = make_core(
        ident, pump.peers, pump.settings, now=pump.now, incarnation=incarnation, seed=99
    )
    pump.cores[ident.peer_id] = core
    pump.crashed.discard(ident.peer_id)


@pytest.mark.parametrize("incarnation", [50, 1])
def test_a_dead_member_rejoins_with_a_higher_incarnation(incarnation):
    """Restarted with a higher incarnation it is alive again at once; restarted with the
    same one (a clock that went back), it hears its death and refutes above it."""
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    x = pump.peers[2]
    pump.crashed.add(x)
    pump.run_for(6.0)
    assert len(pump.declared(x, State.DEAD)) == 4
    back_at = pump.now
    _restart(pump, 2, incarnation)
    pump.run_for(4.0)
    rejoined = pump.declared(x, State.ALIVE)
    assert len(rejoined) == 4 and all(t >= back_at for t in rejoined.values())
    core = pump.cores[x]
    assert core.incarnation == (50 if incarnation == 50 else 2)
    assert all(pump.cores[p].members[x].incarnation == core.incarnation for p in rejoined)
    assert sum(c.stats["rejoined"] for c in pump.cores.values()) == 4


def test_broadcasts_go_fewest_sent_first_and_at_most_limit_times():
    queue = Broadcasts()
    ups = [wire.Update(wire.ALIVE, f"m{i}", 1, b"", f"m{i}", b"") for i in range(10)]
    for update in ups:
        queue.add(update)
    sent: dict[str, int] = {}
    first = queue.take(4, limit=3)
    assert [u.member for u in first] == ["m9", "m8", "m7", "m6"]  # newest first
    for update in first:
        sent[update.member] = 1
    while len(queue):
        batch = queue.take(4, limit=3)
        assert 0 < len(batch) <= 4
        for update in batch:
            sent[update.member] = sent.get(update.member, 0) + 1
    assert sent == {f"m{i}": 3 for i in range(10)}
    # a newer incarnation of a member replaces the queued older one
    queue.add(wire.Update(wire.SUSPECT, "m1", 1, b"", "m2", b""))
    queue.add(wire.Update(wire.ALIVE, "m1", 2, b"", "m1", b""))
    assert [u.incarnation for u in queue.take(8, limit=3)] == [2]


def test_piggybacked_updates_are_bounded_per_message_and_in_retransmissions():
    settings = SwimSettings(max_piggyback=3, retransmit_mult=2)
    pump = Pump.cluster(20, settings)
    pump.run_for(2.0)
    for victim in pump.peers[-3:]:
        pump.crashed.add(victim)
    pump.run_for(6.0)
    limit = pump.cores[pump.peers[0]].retransmit_limit()
    assert limit == 2 * math.ceil(math.log10(21))
    per_sender: dict[tuple[str, wire.Update], int] = {}
    for _, src, send in pump.sent:
        updates = send.message.updates
        # the queue's share, plus our claim about the receiver or the ping-req's target
        assert len(updates) <= settings.max_piggyback + 2
        assert len(wire.encode(send.message)) < wire.MAX_MESSAGE_BYTES
        for update in updates:
            key = (src, update)
            per_sender[key] = per_sender.get(key, 0) + 1
    # an update about a member other than the receiver travels only through the queue;
    # the same claim may be queued again when it changes a member's view anew
    queued = {k: v for k, v in per_sender.items() if k[1].origin == k[0]}
    assert max(queued.values()) <= 4 * limit


def test_a_member_that_misses_its_acks_slows_down_and_recovers():
    """Lifeguard's local health: a member whose answers do not come back raises its score,
    which multiplies its probe interval; once its acks arrive again it falls back. (A long
    suspicion timeout keeps the others from dying in its eyes meanwhile.)"""
    settings = SwimSettings(suspicion_mult=64)
    pump = Pump.cluster(5, settings)
    pump.run_for(1.0)
    a = pump.peers[0]
    core = pump.cores[a]
    pump.cut |= {(p, a) for p in pump.peers if p != a}  # a's messages go out, none come in
    pump.run_for(4.0)
    assert core.awareness == settings.awareness_max_multiplier - 1
    before = core.stats["probes"]
    slowest = settings.probe_interval_s * settings.awareness_max_multiplier  # 1.6 s
    pump.run_for(4 * slowest)
    assert core.stats["probes"] - before in (4, 5)  # healthy, it would have made 32
    assert pump.declared(a, State.DEAD) == {}
    pump.cut.clear()
    pump.run_for(20.0)
    assert core.awareness == 0
    assert core.stats["probes"] - before > 60


def test_a_paused_member_shifts_its_timers_instead_of_declaring_deaths():
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    a, x = pump.peers[0], pump.peers[1]
    core = pump.cores[a]
    pump.crashed.add(x)
    while x not in core.suspicions:
        pump.run_for(0.05)
    left = core.suspicions[x].deadline - pump.now
    # a sleeps 10 s (not ticked, nothing delivered), then is called again
    later = pump.now + 10.0
    effects = core.on_tick(later)
    assert core.stats["pauses"] == 1
    assert not [e for e in effects if getattr(e, "state", None) == State.DEAD]
    assert core.state_of(x) == State.SUSPECT
    assert core.suspicions[x].deadline - later == pytest.approx(left, abs=0.25)


def test_settings_are_checked_as_a_config_would_be():
    assert msgspec.convert({"probe_interval_s": 0.5}, SwimSettings).probe_interval_s == 0.5
    for bad in ({"probe_interval_s": 0}, {"max_piggyback": wire.MAX_UPDATES}, {"gossip_nodes": 0}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, SwimSettings)
    ident = identities(1)[0]
    with pytest.raises(ValueError, match="shorter"):
        make_core(ident, [], SwimSettings(probe_interval_s=0.1, probe_timeout_s=0.1))
    with pytest.raises(ValueError, match="incarnation"):
        make_core(ident, [], DEFAULTS, incarnation=0)
