"""SWIM under attack, as a peer would make one: malformed messages, a stranger's probes and
claims, forged incarnations and signatures, and a lying member that keeps accusing a healthy
one. The trust model is in `scheduler.swim`'s docstring: only the member signs its own alive
claims, accusations are signed and carry the accused's own proof of the incarnation, and a
claim of death is only an accusation."""

from __future__ import annotations

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork
from scheduler import swim_wire as wire
from scheduler.swim import State
from scheduler.swim_driver import SWIM_PROTOCOL
from tests.scheduler.swim_pump import CLUSTER, Pump, deterministic_identity, identities
from tests.scheduler.swim_sim import CLUSTER as SIM_CLUSTER
from tests.scheduler.swim_sim import start_cluster
from tests.scheduler.test_swim_wire import messages

STRANGER = deterministic_identity(10_000)


def _claim(by: NodeIdentity, kind: int, member: str, inc: int, proof: bytes, cluster=CLUSTER):
    sig = b"" if kind == wire.ALIVE else by.sign(wire.claim_bytes(cluster, kind, member, inc))
    return wire.Update(kind, member, inc, proof, by.peer_id, sig)


def _proof(ident: NodeIdentity, inc: int, cluster: str = CLUSTER) -> bytes:
    return ident.sign(wire.claim_bytes(cluster, wire.ALIVE, ident.peer_id, inc))


def _gossip(sender: NodeIdentity, updates, *, inc: int = 1, cluster: str = CLUSTER) -> bytes:
    me = wire.Me(inc, _proof(sender, inc, cluster))
    return wire.encode(wire.Gossip(wire.WIRE_VERSION, cluster, 1, me, list(updates)))


def test_a_strangers_probes_and_claims_are_refused_and_counted():
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    a, x = pump.peers[0], pump.peers[1]
    core = pump.cores[a]
    ping = wire.Ping(1, CLUSTER, 7, wire.Me(1, _proof(STRANGER, 1)), [], a)
    assert core.on_message(STRANGER.peer_id, ping, pump.now) == []  # not even an ack
    assert core.stats["refused_non_member"] == 1
    # a member relaying a stranger's claim: the claim is refused, the member still heard
    member = identities(5)[2]
    dead_x = _claim(STRANGER, wire.DEAD, x, 1, pump.cores[a].members[x].proof)
    pump.inject(member.peer_id, a, _gossip(member, [dead_x]))
    about_stranger = _claim(member, wire.SUSPECT, STRANGER.peer_id, 1, _proof(STRANGER, 1))
    pump.inject(member.peer_id, a, _gossip(member, [about_stranger]))
    pump.run_for(3.0)
    assert core.stats["refused_non_member_claim"] == 1
    assert core.stats["refused_unknown_member"] == 1
    assert pump.changes == [] and core.state_of(x) == State.ALIVE


def test_forged_incarnations_and_signatures_are_refused():
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    idents = {i.peer_id: i for i in identities(5)}
    a, x, liar, other = pump.peers[0], pump.peers[1], pump.peers[2], pump.peers[3]
    core = pump.cores[a]
    x_inc = core.members[x].incarnation
    forged = [
        # a higher incarnation for x, its "proof" signed by the liar
        _claim(idents[liar], wire.SUSPECT, x, x_inc + 100, _proof(idents[liar], x_inc + 100)),
        # x alive at a higher incarnation (to keep it alive after a crash), not signed by x
        wire.Update(wire.ALIVE, x, x_inc + 1, _proof(idents[liar], x_inc + 1), x, b""),
        # an accusation in another member's name (a fake confirmation)
        wire.Update(
            wire.DEAD,
            x,
            x_inc,
            core.members[x].proof,
            other,
            idents[liar].sign(wire.claim_bytes(CLUSTER, wire.DEAD, x, x_inc)),
        ),
        # a real accusation signed for another cluster, replayed here
        _claim(idents[liar], wire.DEAD, x, x_inc, core.members[x].proof, cluster="c2"),
        # x's proof of its incarnation, but not the one a knows (a made-up signature)
        _claim(idents[liar], wire.SUSPECT, x, x_inc, bytes(64)),
    ]
    for update in forged:
        pump.inject(liar, a, _gossip(idents[liar], [update]))
    pump.run_for(0.1)
    assert core.stats["refused_bad_signature"] == len(forged)
    assert core.state_of(x) == State.ALIVE and core.members[x].incarnation == x_inc
    # the sender's own header must be its own signature too
    fake_me = wire.Gossip(1, CLUSTER, 1, wire.Me(9, _proof(idents[other], 9)), [])
    assert core.on_message(liar, fake_me, pump.now) == []
    assert core.stats["refused_bad_signature"] == len(forged) + 1
    # an old alive of x, validly signed, changes nothing
    pump.inject(liar, a, _gossip(idents[liar], [_claim(idents[x], wire.ALIVE, x, 1, b"")]))
    pump.run_for(0.1)
    assert core.members[x].incarnation == x_inc
    pump.run_for(5.0)
    assert pump.changes == []


def test_forged_alive_claims_cannot_keep_a_crashed_member_alive():
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    idents = {i.peer_id: i for i in identities(5)}
    x, liar = pump.peers[1], pump.peers[2]
    pump.crashed.add(x)
    for step in range(60):  # every 0.1 s, to everyone, x "alive" at ever higher incarnations
        for peer in pump.peers:
            if peer not in (x, liar):
                alive = wire.Update(wire.ALIVE, x, 2 + step, _proof(idents[liar], 2 + step), x, b"")
                pump.inject(liar, peer, _gossip(idents[liar], [alive]))
        pump.run_for(0.1)
    dead = pump.declared(x, State.DEAD)
    assert sorted(dead) == sorted(p for p in pump.peers if p != x)
    assert max(dead.values()) - 1.0 <= 5.0


def test_a_lying_member_cannot_kill_a_healthy_one():
    """The liar signs dead and suspect claims about a healthy member at its real incarnation
    (with its real proof), to everyone, every 0.2 s: each is an accusation, the accused hears
    it and refutes, and nobody ever declares it dead."""
    pump = Pump.cluster(5)
    pump.run_for(1.0)
    idents = {i.peer_id: i for i in identities(5)}
    x, liar = pump.peers[1], pump.peers[2]
    for _ in range(50):
        x_core = pump.cores[x]
        inc, proof = x_core.incarnation, _proof(idents[x], x_core.incarnation)
        for peer in pump.peers:
            if peer != liar:
                kind = wire.DEAD if peer != x else wire.SUSPECT
                update = _claim(idents[liar], kind, x, inc, proof)
                pump.inject(liar, peer, _gossip(idents[liar], [update]))
        pump.run_for(0.2)
    assert pump.declared(x, State.DEAD) == {}
    assert pump.cores[x].stats["refutations"] >= 10  # the cost: churn, counted
    assert len(pump.declared(x, State.SUSPECT)) == 3  # all but the liar
    pump.run_for(3.0)
    assert all(pump.view(p, x) == State.ALIVE for p in pump.peers if p != x)


async def test_the_driver_refuses_malformed_messages_and_strangers_and_keeps_going(
    autojump_clock,
):
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(nursery, 5, seed=11)
        await trio.sleep(1.0)
        hub: MemoryNetwork = sim.hub
        target = sim.members[0]
        stranger = hub.add_node(STRANGER.peer_id)
        me = wire.Me(1, _proof(STRANGER, 1, SIM_CLUSTER))
        bad = [
            b"",
            b"\xc1",
            b"\x00" * 70_000,
            b"\x91" * 60_000,
            wire.encode(wire.Ack(1, SIM_CLUSTER, 1, me, [])),  # a reply is no request
            wire.encode(wire.Ping(1, "other-cluster", 1, me, [], target.peer_id)),
            wire.encode(wire.Ping(1, SIM_CLUSTER, 1, me, [], target.peer_id)),  # a stranger
            wire.encode(wire.PingReq(1, SIM_CLUSTER, 1, me, [], sim.members[1].peer_id)),
        ]
        for payload in bad:
            assert await stranger.request(target.peer_id, SWIM_PROTOCOL, payload) == b""
        stats = target.driver.stats
        assert stats["refused_malformed"] == 3 and stats["refused_too_large"] == 1
        assert stats["refused_not_a_request"] == 1 and stats["refused_unknown_cluster"] == 1
        assert stats["refused_non_member"] == 2
        assert target.core.stats["refused_non_member"] == 2
        # a member's ping is still answered, and the cluster is as it was
        member = sim.members[1]
        ping = wire.Ping(1, SIM_CLUSTER, 5, member.core._me(), [], target.peer_id)
        reply = wire.decode(
            await member.node.request(target.peer_id, SWIM_PROTOCOL, wire.encode(ping))
        )
        assert isinstance(reply, wire.Ack) and reply.seq == 5
        await trio.sleep(3.0)
        assert sim.changes == []
        nursery.cancel_scope.cancel()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), messages, st.floats(0, 0.5)), max_size=12))
def test_random_messages_never_break_the_core(script):
    """Typed but arbitrary messages, from members and a stranger, interleaved with ticks:
    the core never raises, nobody dies, and it still probes and answers afterwards."""
    pump = Pump.cluster(5)
    a = pump.peers[0]
    core = pump.cores[a]
    senders = [*pump.peers[1:], STRANGER.peer_id, a]
    now = 0.0
    for index, message, step in script:
        now += step
        sender = senders[index]
        if index % 2:  # half of them in this cluster, from a signed header, to reach deeper
            inc = message.me.incarnation or 1
            ident = next((i for i in identities(5) if i.peer_id == sender), STRANGER)
            message = type(message)(
                **{
                    **{f: getattr(message, f) for f in message.__struct_fields__},
                    "cluster": CLUSTER,
                    "me": wire.Me(inc, _proof(ident, inc)),
                }
            )
        core.on_message(sender, message, now)
        core.on_tick(now)
    pump.now = now
    pump.run_for(3.0)
    assert pump.declared(a, State.DEAD) == {}
    assert all(s == State.ALIVE for s in (core.state_of(p) for p in pump.peers[1:]))
    assert core.stats["probes_acked"] > 0
