"""SWIM on the in-memory network in virtual time: the real core and driver on every member.

A crashed member is declared dead by every other within 5 s (5, 20, 100 members); no false
positives under 5 % loss and jitter; a paused member that comes back refutes its death; a
partition's sides declare each other dead and meet again after it heals."""

from __future__ import annotations

import time

import pytest
import trio

from p2p.testing.memnet import MemoryNetwork
from scheduler.swim import State, SwimSettings
from scheduler.swim_driver import SwimDriver, new_core
from tests.scheduler.swim_sim import identities, start_cluster

SETTLE_S = 2.0


@pytest.mark.parametrize("count", [5, 20, 100])
async def test_a_crashed_member_is_declared_dead_by_all_within_five_seconds(autojump_clock, count):
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(nursery, count, seed=count)
        await trio.sleep(SETTLE_S)
        assert sim.changes == []  # a quiet healthy cluster: nobody suspected
        victim = sim.members[count // 2]
        sim.crash(victim)
        crashed_at = trio.current_time()
        survivors = [m for m in sim.members if m is not victim]
        while trio.current_time() - crashed_at < 5.0:  # noqa: ASYNC110 (virtual time)
            if len(sim.declared(victim.peer_id, State.DEAD)) == len(survivors):
                break
            await trio.sleep(0.1)
        dead = sim.declared(victim.peer_id, State.DEAD)
        assert sorted(dead) == sorted(m.peer_id for m in survivors)
        assert max(dead.values()) - crashed_at <= 5.0
        assert sim.views(victim.peer_id, survivors) == {State.DEAD}
        # nobody else was even suspected
        assert {c.peer_id for _, _, c in sim.changes} == {victim.peer_id}
        nursery.cancel_scope.cancel()


async def test_no_false_positives_with_loss_and_jitter(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(nursery, 20, seed=7, loss=0.05, jitter_s=0.02)
        await trio.sleep(30.0)
        assert sim.hub.messages_dropped > 100
        dead = [c for _, _, c in sim.changes if c.state == State.DEAD]
        assert dead == []
        for member in sim.members:
            assert set(sim.views(member.peer_id, sim.members) - {None}) == {State.ALIVE}
        # lost pings went through relays: the indirect probes did their work
        assert sum(m.core.stats["ping_reqs"] for m in sim.members) > 0
        nursery.cancel_scope.cancel()


async def test_a_paused_member_that_comes_back_refutes_its_death(autojump_clock):
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(nursery, 20, seed=3)
        await trio.sleep(SETTLE_S)
        sleeper = sim.members[4]
        others = [m for m in sim.members if m is not sleeper]
        before = sleeper.core.incarnation
        sim.pause(sleeper)
        await trio.sleep(8.0)
        assert sim.views(sleeper.peer_id, others) == {State.DEAD}
        sim.resume(sleeper)
        resumed_at = trio.current_time()
        await trio.sleep(5.0)
        assert sim.views(sleeper.peer_id, others) == {State.ALIVE}
        back = sim.declared(sleeper.peer_id, State.ALIVE, since=resumed_at)
        assert max(back.values()) - resumed_at <= 5.0
        assert sleeper.core.incarnation > before  # it refuted
        assert sleeper.core.stats["pauses"] == 1  # and knew it had been paused:
        # it declared nobody dead for the time it slept
        assert all(by != sleeper.peer_id for _, by, _ in sim.changes)
        nursery.cancel_scope.cancel()


async def test_a_partition_declares_each_side_dead_to_the_other_then_heals(autojump_clock):
    """The majority declares the minority dead within 5 s; the minority is slower (within
    15 s; 10 s in the seeds tried): 7 members probe, accuse and gossip among 19 of which
    13 are unreachable, and its ping-reqs to unreachable relays miss their nacks, which
    raises its local health score (Lifeguard) and slows its probes, as it should for the
    cut-off side."""
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(nursery, 20, seed=5)
        await trio.sleep(SETTLE_S)
        majority, minority = sim.members[:13], sim.members[13:]
        sim.hub.partition([{m.peer_id for m in majority}, {m.peer_id for m in minority}])
        cut_at = trio.current_time()
        await trio.sleep(15.0)
        for side, other, limit in ((majority, minority, 5.0), (minority, majority, 15.0)):
            for member in other:
                dead = sim.declared(member.peer_id, State.DEAD)
                assert sorted(dead) == sorted(m.peer_id for m in side)
                assert max(dead.values()) - cut_at <= limit
            for member in side:  # nobody on a side loses one of its own side
                assert sim.views(member.peer_id, side) - {None} == {State.ALIVE}
        sim.hub.heal()
        healed_at = trio.current_time()
        await trio.sleep(10.0)
        for member in sim.members:
            assert sim.views(member.peer_id, sim.members) - {None} == {State.ALIVE}
        for side, other in ((majority, minority), (minority, majority)):
            for member in other:  # each side saw each member of the other come back
                back = sim.declared(member.peer_id, State.ALIVE, since=healed_at)
                assert sorted(back) == sorted(m.peer_id for m in side)
        nursery.cancel_scope.cancel()


async def test_new_core_starts_at_the_wall_clock_and_runs_on_a_driver(autojump_clock):
    """As the daemon will: `new_core` per cluster, one driver per node serving them all."""
    hub = MemoryNetwork(seed=9)
    idents = identities(3)
    peers = [i.peer_id for i in idents]
    before = time.time_ns() // 1_000_000
    changes: dict[str, list] = {p: [] for p in peers}
    async with trio.open_nursery() as nursery:
        drivers = []
        for ident in idents:
            driver = SwimDriver(hub.add_node(ident.peer_id))
            for cluster in ("one", "two"):
                core = new_core(ident, cluster, SwimSettings(), peers)
                assert before <= core.incarnation <= time.time_ns() // 1_000_000
                await nursery.start(driver.run, core, changes[ident.peer_id].append)
            drivers.append(driver)
        with pytest.raises(ValueError, match="already driven"):
            await drivers[0].run(new_core(idents[0], "one", SwimSettings(), peers))
        await trio.sleep(2.0)
        assert all(d.core(c).stats["probes_acked"] > 0 for d in drivers for c in ("one", "two"))
        hub.remove_node(peers[2])
        await trio.sleep(4.0)
        for peer in peers[:2]:  # each survivor, in each cluster
            seen = sorted((c.state, c.peer_id) for c in changes[peer])
            assert seen == sorted([(State.SUSPECT, peers[2]), (State.DEAD, peers[2])] * 2)
        nursery.cancel_scope.cancel()
