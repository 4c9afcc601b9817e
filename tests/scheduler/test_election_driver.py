"""The election driver on the in-memory network, in virtual time: election, failover,
persistence across restarts, fencing of a paused coordinator, partitions, bad input."""

from __future__ import annotations

import hashlib
import random

import msgspec
import pytest
import trio
import trio.testing
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import codec
from p2p.identity import NodeIdentity
from p2p.testing.faults import FaultyNetwork, SkewedClock
from p2p.testing.strategies import msgpack_scalars, msgpack_values
from scheduler import election_wire as wire
from scheduler.election import PersistentState, Role
from scheduler.election_driver import (
    ElectionDriver,
    ElectionFileError,
    ElectionRouter,
    FileElectionStore,
    MemoryElectionStore,
    NotCoordinatorError,
)
from scheduler.fencing import (
    FenceKeeper,
    MemoryFenceStore,
    sign_command,
    sign_vote,
    vote_ok,
)

CLUSTER = "c1"


class Node:
    def __init__(self, hub: FaultyNetwork, ident: NodeIdentity, voters: frozenset[str]) -> None:
        self.hub = hub
        self.ident = ident
        self.voters = voters
        self.store = MemoryElectionStore()
        self.fence_store = MemoryFenceStore()
        self.commands: list[wire.Command] = []
        self.scope: trio.CancelScope | None = None
        self.driver: ElectionDriver | None = None
        self.router: ElectionRouter | None = None

    @property
    def peer_id(self) -> str:
        return self.ident.peer_id

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        node = self.hub.add_node(self.peer_id)
        fence = FenceKeeper(self.fence_store, lambda cluster: self.voters)
        self.router = ElectionRouter(node, fence, on_command=self.commands.append)
        self.driver = ElectionDriver(
            self.router,
            CLUSTER,
            self.voters,
            self.store,
            ident=self.ident,
            rng=random.Random(self.peer_id),
        )
        with trio.CancelScope() as self.scope:
            await self.driver.run(task_status=task_status)

    def crash(self) -> None:
        self.scope.cancel()
        self.hub.remove_node(self.peer_id)


def identities(size: int) -> list[NodeIdentity]:
    """Fixed keys: the nodes' random timeouts are seeded by peer id, so runs repeat."""
    return [
        NodeIdentity(hashlib.sha256(b"driver test %d" % i).digest(), bytes(31) + b"\x01")
        for i in range(size)
    ]


async def cluster(nursery: trio.Nursery, size: int = 3, seed: int = 1):
    hub = FaultyNetwork(seed=seed, latency_s=0.005)
    idents = identities(size)
    voters = frozenset(i.peer_id for i in idents)
    nodes = [Node(hub, ident, voters) for ident in idents]
    for node in nodes:
        await nursery.start(node.run)
    return hub, nodes


def agreed(nodes: list[Node]) -> Node | None:
    leaders = [n for n in nodes if n.driver.core.role is Role.LEADER]
    if len(leaders) != 1:
        return None
    core = leaders[0].driver.core
    if all(
        n.driver.core.leader == leaders[0].peer_id and n.driver.core.term == core.term
        for n in nodes
    ):
        return leaders[0]
    return None


async def wait_agreed(nodes: list[Node], limit_s: float = 3.0) -> Node:
    deadline = trio.current_time() + limit_s
    while trio.current_time() < deadline:
        leader = agreed(nodes)
        if leader is not None:
            return leader
        await trio.sleep(0.01)
    raise AssertionError(f"no coordinator known to all within {limit_s} s")


async def test_three_nodes_elect_one_and_fail_over_within_3s(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery)
        leader = await wait_agreed(nodes)
        assert leader.driver.is_coordinator()
        for node in nodes:  # the term and any vote are on disk
            assert node.store.states[CLUSTER].term == leader.driver.core.term
        leader.crash()
        rest = [n for n in nodes if n is not leader]
        start = trio.current_time()
        new = await wait_agreed(rest)
        assert trio.current_time() - start < 3.0
        assert new.driver.core.term > leader.store.states[CLUSTER].term
        # the old coordinator comes back with its persisted term and follows
        nursery.start_soon(leader.run)
        await trio.sleep(1.0)
        assert await wait_agreed(nodes) is new
        nursery.cancel_scope.cancel()


async def test_a_paused_coordinator_is_fenced_and_steps_down(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery)
        leader = await wait_agreed(nodes)
        first = leader.driver.sign_next_command("assign", b"a")
        results = await leader.driver.send_command(first)
        assert set(results.values()) == {None}
        zombie = leader.driver.sign_next_command("assign", b"b")  # decided, then SIGSTOP
        leader.driver.freeze()
        rest = [n for n in nodes if n is not leader]
        new = await wait_agreed(rest)
        await trio.sleep(2.0)
        leader.driver.thaw()
        results = await leader.driver.send_command(zombie)
        assert set(results.values()) == {"stale_term"}
        for node in rest:
            assert node.router.fence.refused["stale_term"] == 1
            assert [c.seq for c in node.commands] == [1]
        await trio.sleep(0.1)
        assert leader.driver.core.role is Role.FOLLOWER
        assert not leader.driver.is_coordinator()
        with pytest.raises(NotCoordinatorError):
            leader.driver.sign_next_command("assign", b"c")
        assert await wait_agreed(nodes) is new
        nursery.cancel_scope.cancel()


async def test_a_minority_elects_nobody_and_the_majority_keeps_a_coordinator(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery, size=5)
        leader = await wait_agreed(nodes)
        minority = [leader, *[n for n in nodes if n is not leader][:1]]
        majority = [n for n in nodes if n not in minority]
        hub.partition([{n.peer_id for n in minority}, {n.peer_id for n in majority}])
        new = await wait_agreed(majority)
        await trio.sleep(5.0)
        assert not any(n.driver.core.role is Role.LEADER for n in minority)
        assert agreed(majority) is new
        # pre-vote: the minority's terms did not run away while cut off
        assert max(n.driver.core.term for n in minority) <= new.driver.core.term
        hub.heal()
        assert await wait_agreed(nodes) is new
        nursery.cancel_scope.cancel()


async def test_one_way_cut_from_the_coordinator_and_skewed_clocks_still_converge(autojump_clock):
    hub = FaultyNetwork(seed=3, latency_s=0.005)
    idents = identities(3)
    voters = frozenset(i.peer_id for i in idents)
    nodes = [Node(hub, ident, voters) for ident in idents]
    async with trio.open_nursery() as nursery:
        skews = [(0.95, -5.0), (1.05, 5.0), (1.0, 0.0)]
        for node, (rate, offset) in zip(nodes, skews, strict=True):
            await nursery.start(_run_with_clock, node, SkewedClock(rate, offset))
        leader = await wait_agreed(nodes)
        for other in nodes:  # nothing the coordinator sends arrives
            if other is not leader:
                hub.block(leader.peer_id, other.peer_id)
        rest = [n for n in nodes if n is not leader]
        await wait_agreed(rest, 3.0)
        hub.clear_faults()
        await wait_agreed(nodes, 3.0)
        nursery.cancel_scope.cancel()


async def _run_with_clock(node: Node, clock: SkewedClock, task_status=trio.TASK_STATUS_IGNORED):
    net = node.hub.add_node(node.peer_id)
    fence = FenceKeeper(node.fence_store, lambda cluster: node.voters)
    node.router = ElectionRouter(net, fence, on_command=node.commands.append)
    node.driver = ElectionDriver(
        node.router,
        CLUSTER,
        node.voters,
        node.store,
        ident=node.ident,
        clock=clock,
        rng=random.Random(node.peer_id),
    )
    with trio.CancelScope() as node.scope:
        await node.driver.run(task_status=task_status)


async def test_bad_input_is_counted_and_changes_nothing(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery)
        leader = await wait_agreed(nodes)
        term = leader.driver.core.term
        target = next(n for n in nodes if n is not leader)
        outsider_ident = NodeIdentity.generate()
        outsider = hub.add_node(outsider_ident.peer_id)
        garbage = [b"", b"\xc1", codec.encode({"v": 2, "t": "hb"}), codec.encode([1, 2])]
        for payload in garbage:
            await outsider.request(target.peer_id, wire.ELECTION_PROTOCOL, payload)
        # a vote request and a heartbeat of a huge term from a non-member
        for msg in (wire.VoteRequest(CLUSTER, 99, pre=False), wire.Heartbeat(CLUSTER, 99, 1)):
            await outsider.request(target.peer_id, wire.ELECTION_PROTOCOL, wire.encode(msg))
        # commands: from a non-voter, forged, replayed, stale
        good = leader.driver.sign_next_command("assign", b"x")
        await leader.driver.send_command(good)
        bad = [
            sign_command(outsider_ident, CLUSTER, term, 5, "assign", b"x"),
            msgspec.structs.replace(
                sign_command(outsider_ident, CLUSTER, term, 6, "assign", b"x"),
                signer=leader.peer_id,
            ),
            good,
            sign_command(leader.ident, CLUSTER, term - 1, 9, "assign", b"x"),
        ]
        answers = []
        for command in bad:
            raw = await outsider.request(
                target.peer_id, wire.COMMAND_PROTOCOL, wire.encode(command)
            )
            answers.append(codec.decode(raw)["refused"])
        assert answers == ["not_voter", "bad_signature", "replayed_seq", "stale_term"]
        await outsider.request(target.peer_id, wire.COMMAND_PROTOCOL, b"\x00garbage")
        stats = target.router.stats
        assert stats["election_malformed"] + stats["election_bad_version"] == len(garbage)
        assert stats["command_malformed"] == 1
        assert target.driver.core.stats["not_voter"] == 2
        await trio.sleep(1.0)
        assert agreed(nodes) is leader and leader.driver.core.term == term
        nursery.cancel_scope.cancel()


async def test_the_file_store_keeps_term_and_vote(tmp_path):
    path = tmp_path / "election.json"
    store = FileElectionStore(path)
    await store.save("c1", PersistentState(4, "peer-a"))
    await store.save("c2", PersistentState(1, None))
    again = FileElectionStore(path)
    assert again.load("c1") == PersistentState(4, "peer-a")
    assert again.load("c2") == PersistentState(1, None)
    assert again.load("c3") is None
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_an_election_file_of_before_term_proofs_is_read_and_a_damaged_one_refused(tmp_path):
    path = tmp_path / "election.json"
    path.write_text(
        '{"c1": {"term": 4, "voted_for": "peer-a"}, "c2": {"term": 1, "voted_for": null}}'
    )
    again = FileElectionStore(path)
    assert again.load("c1") == PersistentState(4, "peer-a")
    assert again.load("c2") == PersistentState(1, None)
    for damaged in (
        "{",
        "[]",
        '{"c1": 5}',
        '{"c1": {"term": "4"}}',
        '{"c1": {"term": -1}}',
        '{"c1": {"term": 1, "voted_for": 7}}',
        '{"c1": {}}',
    ):
        path.write_text(damaged)
        with pytest.raises(ElectionFileError) as info:
            FileElectionStore(path)
        assert isinstance(info.value, ValueError)  # the daemon's one-line refusal to start
        assert str(path) in str(info.value) and "\n" not in str(info.value)


async def test_a_vote_leaves_only_once_it_is_persisted(autojump_clock):
    """The driver carries out a Persist before the Send after it: a slow disk delays the vote."""

    class SlowStore(MemoryElectionStore):
        def __init__(self) -> None:
            super().__init__()
            self.gate = trio.Event()

        async def save(self, cluster, state):
            await self.gate.wait()
            await super().save(cluster, state)

    hub = FaultyNetwork(seed=1, latency_s=0.005)
    voter_ident, candidate_ident, third = identities(3)
    voters = frozenset(i.peer_id for i in (voter_ident, candidate_ident, third))
    candidate = hub.add_node(candidate_ident.peer_id)
    replies: list[tuple[float, wire.ElectionMessage]] = []

    async def on_election(sender: str, payload: bytes) -> bytes:
        message = wire.decode_election(payload)
        if isinstance(message, wire.VoteReply):  # (the voter's own pre-votes are not)
            replies.append((trio.current_time(), message))
        return b""

    candidate.set_request_handler(wire.ELECTION_PROTOCOL, on_election)
    store = SlowStore()
    net = hub.add_node(voter_ident.peer_id)
    router = ElectionRouter(net, FenceKeeper(MemoryFenceStore(), lambda c: voters))
    driver = ElectionDriver(router, CLUSTER, voters, store, ident=voter_ident, rng=random.Random(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        await trio.sleep(1.0)  # past the boot window in which it votes for no one
        request = wire.encode(wire.VoteRequest(CLUSTER, 1, pre=False))
        await candidate.request(voter_ident.peer_id, wire.ELECTION_PROTOCOL, request)
        await trio.sleep(2.0)
        assert replies == [] and store.writes == 0
        opened = trio.current_time()
        store.gate.set()
        await trio.sleep(0.1)
        assert store.states[CLUSTER] == PersistentState(1, candidate_ident.peer_id)
        [(_, vote)] = replies
        assert msgspec.structs.replace(vote, proof=None) == wire.VoteReply(CLUSTER, 1, True, False)
        assert vote_ok(voter_ident.peer_id, CLUSTER, 1, candidate_ident.peer_id, vote.proof)
        assert replies[0][0] >= opened
        nursery.cancel_scope.cancel()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(payload=st.binary(max_size=200) | msgpack_values(msgpack_scalars()).map(codec.encode))
def test_random_payloads_are_counted_never_raised(payload):
    async def main() -> None:
        hub = FaultyNetwork(seed=1)
        net = hub.add_node("a")
        router = ElectionRouter(net, FenceKeeper(MemoryFenceStore(), lambda c: frozenset()))
        assert await router._on_election("b", payload) == b""
        answer = codec.decode(await router._on_command("b", payload))
        assert answer["refused"] is not None
        assert sum(router.stats.values()) >= 1

    trio.run(main, clock=trio.testing.MockClock(autojump_threshold=0))


async def test_one_router_serves_several_clusters(autojump_clock):
    """A node in two clusters: one router, one driver per cluster, each elects apart."""
    hub = FaultyNetwork(seed=2, latency_s=0.005)
    idents = identities(4)
    ids = [i.peer_id for i in idents]
    clusters = {"c1": frozenset(ids[:3]), "c2": frozenset(ids[1:])}
    routers = {}
    by_id = {ident.peer_id: ident for ident in idents}
    for ident in idents:
        net = hub.add_node(ident.peer_id)
        fence = FenceKeeper(MemoryFenceStore(), lambda cluster: clusters.get(cluster, frozenset()))
        routers[ident.peer_id] = ElectionRouter(net, fence)
    drivers: dict[str, list[ElectionDriver]] = {"c1": [], "c2": []}
    async with trio.open_nursery() as nursery:
        for name, voters in clusters.items():
            for peer in sorted(voters):
                driver = ElectionDriver(
                    routers[peer],
                    name,
                    voters,
                    MemoryElectionStore(),
                    ident=by_id[peer],
                    rng=random.Random(f"{name} {peer}"),
                )
                drivers[name].append(driver)
                await nursery.start(driver.run)
        await trio.sleep(3.0)
        for name, group in drivers.items():
            leaders = {d.core.leader for d in group}
            assert len(leaders) == 1 and None not in leaders, name
            assert sum(d.is_coordinator() for d in group) == 1
        assert set(routers[ids[1]].drivers) == {"c1", "c2"}
        # a message for a cluster the node is not in is counted, not delivered
        outsider = hub.add_node("outsider")
        heartbeat = wire.encode(wire.Heartbeat("c9", 1, 1))
        await outsider.request(ids[0], wire.ELECTION_PROTOCOL, heartbeat)
        assert routers[ids[0]].stats["election_unknown_cluster"] == 1
        nursery.cancel_scope.cancel()


async def test_voters_change_one_at_a_time_while_running(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery, size=3)
        leader = await wait_agreed(nodes)
        # a fourth voter joins: everyone learns of it, then it starts
        fourth_ident = identities(4)[3]
        voters = frozenset({*nodes[0].voters, fourth_ident.peer_id})
        for node in nodes:
            node.voters = voters
            node.driver.set_voters(voters)
        fourth = Node(hub, fourth_ident, voters)
        await nursery.start(fourth.run)
        everyone = [*nodes, fourth]
        assert await wait_agreed(everyone) is leader
        # the coordinator is removed: it steps down and the other three elect one of them
        rest = [n for n in everyone if n is not leader]
        without = voters - {leader.peer_id}
        for node in everyone:
            node.voters = without
            node.driver.set_voters(without)
        assert leader.driver.core.role is Role.FOLLOWER
        new = await wait_agreed(rest)
        assert new is not leader
        nursery.cancel_scope.cancel()


async def test_commands_reach_workers_whose_fences_know_the_voters(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery)
        leader = await wait_agreed(nodes)
        worker_net = hub.add_node("worker")
        accepted: list[wire.Command] = []
        fence = FenceKeeper(MemoryFenceStore(), lambda cluster: nodes[0].voters)
        ElectionRouter(worker_net, fence, on_command=accepted.append)
        command = leader.driver.sign_next_command("assign", b"layers 0-4")
        assert await leader.driver.send_command(command, to=["worker"]) == {"worker": None}
        assert accepted == [command] and fence.highest(CLUSTER) == leader.driver.core.term
        assert await leader.driver.send_command(command, to=["worker"]) == {
            "worker": "replayed_seq"
        }
        nursery.cancel_scope.cancel()


async def test_a_vote_counts_only_with_its_voters_signature(autojump_clock):
    """Granted votes that are unsigned, signed by another key or for another candidate are
    dropped and counted: a candidate elected by them would have no proof of its term."""
    hub = FaultyNetwork(seed=1, latency_s=0.005)
    a, b, c = identities(3)
    voters = frozenset(i.peer_id for i in (a, b, c))
    net = hub.add_node(a.peer_id)
    router = ElectionRouter(net, FenceKeeper(MemoryFenceStore(), lambda cl: voters))
    driver = ElectionDriver(router, CLUSTER, voters, MemoryElectionStore(), ident=a)
    b_net = hub.add_node(b.peer_id)
    async with trio.open_nursery() as nursery:
        await nursery.start(driver.run)
        for proof in (
            None,
            sign_vote(c, CLUSTER, 1, a.peer_id),  # c's key, sent by b
            sign_vote(b, CLUSTER, 1, c.peer_id),  # b's vote for c
            sign_vote(b, CLUSTER, 2, a.peer_id),  # for another term
            b"\x00" * 64,
        ):
            reply = wire.VoteReply(CLUSTER, 1, True, pre=False, proof=proof)
            await b_net.request(a.peer_id, wire.ELECTION_PROTOCOL, wire.encode(reply))
        assert router.stats["election_unsigned_vote"] == 1
        assert router.stats["election_bad_vote_signature"] == 4
        assert driver.stats["received"] == 0
        good = wire.VoteReply(CLUSTER, 1, True, False, sign_vote(b, CLUSTER, 1, a.peer_id))
        await b_net.request(a.peer_id, wire.ELECTION_PROTOCOL, wire.encode(good))
        await trio.sleep(0.01)
        assert driver.stats["received"] == 1
        nursery.cancel_scope.cancel()


async def test_commands_carry_the_terms_proof_until_the_member_has_it(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, nodes = await cluster(nursery)
        leader = await wait_agreed(nodes)
        term = leader.driver.core.term
        proof = leader.driver.term_proof()
        assert proof is not None and (proof.cluster, proof.term, proof.candidate) == (
            CLUSTER,
            term,
            leader.peer_id,
        )
        assert len({v.voter for v in proof.votes}) >= 2 and leader.peer_id in {
            v.voter for v in proof.votes
        }
        assert all(vote_ok(v.voter, CLUSTER, term, leader.peer_id, v.sig) for v in proof.votes)
        follower = next(n for n in nodes if n is not leader)
        assert follower.driver.term_proof() is None
        worker_net = hub.add_node("worker")
        got: list[wire.Command] = []
        fence = FenceKeeper(MemoryFenceStore(), lambda cl: nodes[0].voters)
        worker = ElectionRouter(worker_net, fence, on_command=got.append)
        for body in (b"one", b"two"):
            command = leader.driver.sign_next_command("assign", body)
            assert command.proof == leader.driver.term_proof()
            assert await leader.driver.send_command(command, to=["worker"]) == {"worker": None}
        assert [c.proof is not None for c in got] == [True, False]  # the member has it
        assert fence.proofs_checked == 1
        # the member lost its fence (a store in memory, restarted): asked, the proof again
        worker.fence = FenceKeeper(MemoryFenceStore(), lambda cl: nodes[0].voters)
        command = leader.driver.sign_next_command("assign", b"three")
        assert await leader.driver.send_command(command, to=["worker"]) == {"worker": None}
        assert leader.driver.stats["proof_resent"] == 1 and got[-1].proof is not None
        nursery.cancel_scope.cancel()


async def test_a_coordinator_whose_proof_falls_short_after_a_voter_change_steps_down(
    autojump_clock,
):
    """A cluster of one proves its terms with its own vote; a second voter makes that one
    vote of two, short of a majority: it steps down and the two elect one with both votes."""
    hub = FaultyNetwork(seed=3, latency_s=0.005)
    first, second = identities(2)
    async with trio.open_nursery() as nursery:
        a = Node(hub, first, frozenset({first.peer_id}))
        await nursery.start(a.run)
        assert await wait_agreed([a]) is a
        assert [v.voter for v in a.driver.term_proof().votes] == [a.peer_id]
        both = frozenset({first.peer_id, second.peer_id})
        a.voters = both
        a.driver.set_voters(both)
        assert a.driver.core.role is Role.FOLLOWER
        assert a.driver.stats["proof_short"] == 1
        b = Node(hub, second, both)
        await nursery.start(b.run)
        leader = await wait_agreed([a, b], limit_s=5.0)
        assert {v.voter for v in leader.driver.term_proof().votes} == both
        nursery.cancel_scope.cancel()
