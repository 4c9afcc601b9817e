"""The cluster runtime (daemon.cluster.runtime) on the in-memory network in virtual time, with
a membership registry faked in memory: election and failover, workers told of the
coordinator, fenced commands and their handlers, voter and member changes, bad input."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import pytest
import trio

from daemon.cluster.runtime import (
    ANNOUNCE,
    ClusterRuntime,
    NotCoordinatorError,
    RegistryMembership,
    RuntimeSettings,
)
from daemon.settings import ConfigError, parse
from p2p import codec
from p2p.identity import NodeIdentity
from p2p.testing.hub import MemoryNetwork
from registry.replica import Replica
from scheduler import election_wire as wire
from scheduler import swim_wire
from scheduler.election import ElectionSettings
from scheduler.election_driver import MemoryElectionStore
from scheduler.fencing import MemoryFenceStore, sign_command
from scheduler.swim_driver import SWIM_PROTOCOL
from scheduler.swim_state import SwimSettings

C = "lab"


@dataclass(frozen=True)
class FakeMember:
    peer_id: str
    voter: bool


@dataclass
class FakeView:
    name: str
    members: dict[str, FakeMember]

    @property
    def voters(self) -> frozenset[str]:
        return frozenset(p for p, m in self.members.items() if m.voter)


@dataclass
class FakeMembership:
    """The shape of registry.clusters, shared by every node (one registry, in sync)."""

    clusters: dict[str, dict[str, bool]] = field(default_factory=dict)  # name -> peer -> voter
    changes: int = 0

    def set(self, cluster: str, peer: str, voter: bool | None) -> None:
        members = self.clusters.setdefault(cluster, {})
        if voter is None:
            members.pop(peer, None)
        else:
            members[peer] = voter
        self.changes += 1

    def version(self) -> int:
        return self.changes

    def clusters_of(self, peer_id: str) -> list[str]:
        return sorted(n for n, members in self.clusters.items() if peer_id in members)

    def view(self, name: str) -> FakeView | None:
        members = self.clusters.get(name)
        if members is None:
            return None
        return FakeView(name, {p: FakeMember(p, v) for p, v in members.items()})


def identities(count: int, tag: bytes = b"runtime") -> list[NodeIdentity]:
    return [
        NodeIdentity(hashlib.sha256(tag + b" %d" % i).digest(), bytes(31) + b"\x01")
        for i in range(count)
    ]


class Node:
    def __init__(self, hub: MemoryNetwork, ident: NodeIdentity, membership: FakeMembership):
        self.hub = hub
        self.ident = ident
        self.membership = membership
        self.election_store = MemoryElectionStore()
        self.fence_store = MemoryFenceStore()
        self.received: list[tuple[str, str, dict]] = []
        self.dead: list[tuple[str, str]] = []
        self.scope = trio.CancelScope()
        self.runtime: ClusterRuntime | None = None

    @property
    def peer_id(self) -> str:
        return self.ident.peer_id

    async def run(self, task_status=trio.TASK_STATUS_IGNORED) -> None:
        net = self.hub.add_node(self.peer_id)
        self.runtime = ClusterRuntime(
            self.ident,
            net,
            self.membership,
            election_store=self.election_store,
            fence_store=self.fence_store,
            settings=RuntimeSettings(watch_interval_s=0.1),
        )

        async def handler(cluster: str, coordinator: str, body: dict) -> None:
            self.received.append((cluster, coordinator, body))

        self.runtime.on_command("assign", handler)
        self.runtime.on_member_dead(lambda cluster, peer: self.dead.append((cluster, peer)))
        self.scope = trio.CancelScope()
        with self.scope:
            await self.runtime.run(task_status=task_status)

    def kill(self) -> None:
        self.hub.remove_node(self.peer_id, refuse=True)
        self.scope.cancel()


async def start(nursery, voters: int, workers: int = 0, outsiders: int = 0):
    hub = MemoryNetwork(seed=3, latency_s=0.002)
    membership = FakeMembership()
    idents = identities(voters + workers + outsiders)
    nodes = [Node(hub, ident, membership) for ident in idents]
    for i, node in enumerate(nodes[: voters + workers]):
        membership.set(C, node.peer_id, i < voters)
    for node in nodes:
        await nursery.start(node.run)
    return hub, membership, nodes


def agreed(nodes: list[Node]) -> Node | None:
    """The one coordinator every node knows, with the same term; None if there is none."""
    leaders = [n for n in nodes if n.runtime.is_coordinator(C)]
    if len(leaders) != 1:
        return None
    known = {n.runtime.coordinator(C) for n in nodes}
    return leaders[0] if known == {leaders[0].runtime.coordinator(C)} else None


async def wait_agreed(nodes: list[Node], limit_s: float = 3.0) -> Node:
    deadline = trio.current_time() + limit_s
    while trio.current_time() < deadline:
        if (leader := agreed(nodes)) is not None:
            return leader
        await trio.sleep(0.01)
    raise AssertionError(f"no coordinator known to all within {limit_s} s")


async def test_five_voters_elect_one_known_to_all_and_fail_over_within_3s(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, membership, nodes = await start(nursery, 5)
        leader = await wait_agreed(nodes, 5.0)
        peer, term = leader.runtime.coordinator(C)
        assert peer == leader.peer_id and term >= 1
        # the term and vote are in each voter's election store, the term in its fence
        for node in nodes:
            assert node.election_store.states[C].term == term
            assert node.runtime.fence.highest(C) == term
        leader.kill()
        killed = trio.current_time()
        rest = [n for n in nodes if n is not leader]
        new = await wait_agreed(rest, 3.0)
        assert trio.current_time() - killed < 3.0
        assert new.runtime.coordinator(C)[1] > term
        # SWIM declares the killed member dead everywhere within 5 s, and says so
        deadline = killed + 5.0
        while not all((C, leader.peer_id) in n.dead for n in rest):
            assert trio.current_time() < deadline, "the dead member was not declared in 5 s"
            await trio.sleep(0.05)
        for node in rest:
            assert node.runtime.member_states(C)[leader.peer_id] == "dead"
            assert node.runtime.describe(C)["members"][leader.peer_id] == "dead"
        nursery.cancel_scope.cancel()


async def test_workers_learn_the_coordinator_and_commands_reach_their_handlers(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, membership, nodes = await start(nursery, 3, workers=2)
        voters, workers = nodes[:3], nodes[3:]
        leader = await wait_agreed(voters, 5.0)
        # workers get no heartbeats: the coordinator tells them with a fenced command
        await wait_agreed(nodes, 3.0)
        for worker in workers:
            assert worker.runtime.election_driver(C) is None
            assert not worker.runtime.describe(C)["voter"]
        results = await leader.runtime.command(C, "assign", {"layers": [0, 4]})
        assert results == {n.peer_id: None for n in nodes if n is not leader}
        # the coordinator itself, named in `to`, goes through its own fence and handler
        results = await leader.runtime.command(
            C, "assign", {"layers": [4, 8]}, to=[leader.peer_id, workers[0].peer_id]
        )
        assert results == {leader.peer_id: None, workers[0].peer_id: None}
        await trio.sleep(0.1)
        for node in nodes:
            if node is not leader:
                assert (C, leader.peer_id, {"layers": [0, 4]}) in node.received
        assert leader.received == [(C, leader.peer_id, {"layers": [4, 8]})]
        assert workers[0].received[-1] == (C, leader.peer_id, {"layers": [4, 8]})
        # the coordinator dies: workers stop naming it once SWIM declares it dead, then
        # learn the new one
        leader.kill()
        rest = [n for n in nodes if n is not leader]
        new = await wait_agreed(rest, 6.0)
        assert new is not leader
        # a follower may not command
        follower = next(n for n in rest[:2] if n is not new)
        with pytest.raises(NotCoordinatorError):
            await follower.runtime.command(C, "assign", {})
        with pytest.raises(NotCoordinatorError):
            await workers[0].runtime.command(C, "assign", {})
        with pytest.raises(ValueError, match="at most"):
            await new.runtime.command(C, "assign", {"x": "y" * wire.MAX_COMMAND_BODY})
        with pytest.raises(ValueError, match="runtime's own"):
            new.runtime.on_command(ANNOUNCE, follower.runtime.on_command)  # type: ignore[arg-type]
        nursery.cancel_scope.cancel()


async def test_voter_and_member_changes_follow_the_registry(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, membership, nodes = await start(nursery, 3, outsiders=2)
        voters, (late, outsider) = nodes[:3], nodes[3:]
        leader = await wait_agreed(voters, 5.0)
        assert late.runtime.clusters() == [] and late.runtime.member_states(C) == {}
        assert late.runtime.coordinator(C) == (None, 0)
        # two voters join at once: each core takes them one at a time
        membership.set(C, late.peer_id, True)
        membership.set(C, outsider.peer_id, True)
        await trio.sleep(0.5)
        assert late.runtime.clusters() == [C]
        for node in voters:
            assert node.runtime.election_driver(C).core.voters == frozenset(
                n.peer_id for n in nodes
            )
        everyone = await wait_agreed(nodes, 3.0)
        assert everyone is leader  # a healthy coordinator is not deposed by joiners
        # the coordinator is demoted to worker: it steps down, another is elected
        membership.set(C, leader.peer_id, False)
        await trio.sleep(0.3)
        assert leader.runtime.election_driver(C) is None
        assert not leader.runtime.is_coordinator(C)
        new = await wait_agreed(nodes, 3.0)
        assert new is not leader
        # a member removed from the registry stops running the cluster
        gone = next(n for n in (late, outsider) if n is not new)
        membership.set(C, gone.peer_id, None)
        await trio.sleep(0.3)
        assert gone.runtime.clusters() == []
        assert gone.peer_id not in new.runtime.member_states(C)
        assert await wait_agreed([n for n in nodes if n is not gone], 3.0) is new
        nursery.cancel_scope.cancel()


async def test_clusters_beyond_the_limit_are_left_out_and_counted(autojump_clock):
    hub = MemoryNetwork(seed=1, latency_s=0.002)
    membership = FakeMembership()
    (ident,) = identities(1, b"limit")
    for i in range(5):
        membership.set(f"c{i}", ident.peer_id, True)
    runtime = ClusterRuntime(
        ident,
        hub.add_node(ident.peer_id),
        membership,
        election_store=MemoryElectionStore(),
        fence_store=MemoryFenceStore(),
        settings=RuntimeSettings(max_clusters=3),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        assert runtime.clusters() == ["c0", "c1", "c2"]
        assert runtime.stats["clusters_over_limit"] == 2
        await trio.sleep(2.0)  # a cluster of one elects itself
        assert runtime.is_coordinator("c0")
        snap = runtime.snapshot()
        assert snap["clusters"]["c0"]["coordinating"]
        assert snap["clusters"]["c0"]["elections_won"] == 1
        assert snap["clusters"]["c0"]["members"] == {"alive": 1, "suspect": 0, "dead": 0}
        nursery.cancel_scope.cancel()


async def test_bad_commands_and_messages_are_refused_and_counted(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, membership, nodes = await start(nursery, 3, workers=1, outsiders=1)
        worker, outsider = nodes[3], nodes[4]
        leader = await wait_agreed(nodes[:4], 5.0)
        term = leader.runtime.coordinator(C)[1]
        net = hub.node(outsider.peer_id)
        targets = [n for n in nodes[:4] if n is not leader]

        async def send(cmd: wire.Command) -> set[str | None]:
            out = set()
            for node in targets:
                raw = await net.request(node.peer_id, wire.COMMAND_PROTOCOL, wire.encode(cmd))
                out.add(codec.decode(raw)["refused"])
            return out

        # signed by a non-member (not a voter), a worker (not a voter), forged in the
        # coordinator's name, from a stale term, replayed
        assert await send(sign_command(outsider.ident, C, term, 99, "assign", b"\x80")) == {
            "not_voter"
        }
        assert await send(sign_command(worker.ident, C, term, 99, "assign", b"\x80")) == {
            "not_voter"
        }
        forged = sign_command(outsider.ident, C, term, 99, "assign", b"\x80")
        forged = wire.Command(C, term, 99, "assign", b"\x80", leader.peer_id, forged.sig)
        assert await send(forged) == {"bad_signature"}
        good = leader.runtime.election_driver(C).sign_next_command("assign", codec.encode({}))
        assert set(
            (
                await leader.runtime.election_driver(C).send_command(
                    good, [n.peer_id for n in targets]
                )
            ).values()
        ) == {None}
        assert await send(good) == {"replayed_seq"}
        old = sign_command(leader.ident, C, term - 1, 1, "assign", b"\x80")  # term >= 1
        assert await send(old) == {"stale_term"}
        # a body that is not a map, and an action nobody handles: accepted by the fence (the
        # coordinator signed them) but not handed to any handler, and counted
        driver = leader.runtime.election_driver(C)
        for action, body in (("assign", b"\xc1"), ("assign", codec.encode([1])), ("x", b"")):
            await driver.send_command(driver.sign_next_command(action, body), [worker.peer_id])
        assert worker.runtime.stats["command_malformed_body"] == 2
        assert worker.runtime.stats["command_unhandled"] == 1
        # garbage, votes and probes from a non-member
        for protocol in (wire.COMMAND_PROTOCOL, wire.ELECTION_PROTOCOL, SWIM_PROTOCOL):
            await net.request(leader.peer_id, protocol, b"\x00garbage")
        vote = wire.VoteRequest(C, term + 5, pre=False)
        await net.request(leader.peer_id, wire.ELECTION_PROTOCOL, wire.encode(vote))
        me = swim_wire.Me(1, outsider.ident.sign(swim_wire.claim_bytes(C, 0, outsider.peer_id, 1)))
        ping = swim_wire.Ping(1, C, 1, me, [], leader.peer_id)
        assert await net.request(leader.peer_id, SWIM_PROTOCOL, swim_wire.encode(ping)) == b""
        await trio.sleep(0.2)
        snap = leader.runtime.snapshot()
        refused = snap["messages_refused"]
        assert refused[("election", "not_voter")] >= 1  # the outsider's vote request
        assert refused[("swim", "non_member")] >= 1  # its probe
        assert any(p == "command" for p, _ in refused)
        assert any(p == "election" and r != "not_voter" for p, r in refused)
        worker_snap = worker.runtime.snapshot()["commands_refused"]
        assert worker_snap["not_voter"] >= 2 and worker_snap["bad_signature"] == 1
        assert worker_snap["replayed_seq"] == 1 and worker_snap["stale_term"] == 1
        # nobody was deposed, and the term did not move for the outsider's vote
        assert await wait_agreed(nodes[:4], 1.0) is leader
        assert leader.runtime.coordinator(C)[1] == term
        nursery.cancel_scope.cancel()


async def test_a_voter_that_claims_a_term_by_heartbeat_cannot_command_in_it(autojump_clock):
    """Heartbeats are unsigned, so a hostile voter can make another voter follow it in a term
    it never won (a disruption the election has always allowed); the fence, though, learns a
    term's coordinator only from a proof: its commands in that term are refused, every
    voter's fence knew the real coordinator from its announcement, and the cluster elects
    a real one whose commands every member takes."""
    async with trio.open_nursery() as nursery:
        hub, membership, nodes = await start(nursery, 3, workers=1)
        leader = await wait_agreed(nodes, 5.0)
        term = leader.runtime.coordinator(C)[1]

        def announced() -> bool:
            return all(
                n.runtime.fence.state(C).coordinator == leader.peer_id
                for n in nodes
                if n is not leader
            )

        deadline = trio.current_time() + 2.0
        while not announced():  # voters too: the announcement proves the term to them
            assert trio.current_time() < deadline, "not every member was told of the term"
            await trio.sleep(0.01)
        hostile, target = [n for n in nodes[:3] if n is not leader]
        net = hub.node(hostile.peer_id)
        claim = wire.Heartbeat(C, term + 1, 1)
        await net.request(target.peer_id, wire.ELECTION_PROTOCOL, wire.encode(claim))
        await trio.sleep(0.01)
        assert target.runtime.election_driver(C).core.leader == hostile.peer_id
        assert target.runtime.fence.state(C).term == term + 1
        assert target.runtime.fence.state(C).coordinator is None  # not from a heartbeat
        assert target.runtime.coordinator(C) == (None, term + 1)  # nor named by the runtime
        for node in (target, nodes[3]):
            order = sign_command(hostile.ident, C, term + 1, 1, "assign", codec.encode({}))
            raw = await net.request(node.peer_id, wire.COMMAND_PROTOCOL, wire.encode(order))
            assert codec.decode(raw)["refused"] == "no_term_proof"
            assert node.received == []
            assert node.runtime.snapshot()["commands_refused"]["no_term_proof"] == 1
        # the cluster gets a real coordinator again, and its commands reach every member
        new = await wait_agreed(nodes, 5.0)
        assert new.runtime.coordinator(C)[1] >= term + 2  # term + 1 is nobody's
        results = await new.runtime.command(C, "assign", {"n": 1})
        assert set(results.values()) == {None}
        nursery.cancel_scope.cancel()


async def test_a_cluster_name_longer_than_the_wire_allows_is_left_out(autojump_clock):
    hub = MemoryNetwork(seed=1, latency_s=0.002)
    membership = FakeMembership()
    (ident,) = identities(1, b"long")
    membership.set("x" * 65, ident.peer_id, True)
    membership.set("ok", ident.peer_id, True)
    runtime = ClusterRuntime(
        ident,
        hub.add_node(ident.peer_id),
        membership,
        election_store=MemoryElectionStore(),
        fence_store=MemoryFenceStore(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        assert runtime.clusters() == ["ok"]
        assert runtime.stats["cluster_name_too_long"] == 1
        nursery.cancel_scope.cancel()


def test_cluster_config_keys_build_the_cores_settings_and_rules_are_checked():
    config = parse(
        {"cluster": {"probe_interval_s": 0.5, "lease_s": 0.4, "step_down_s": 4, "max_clusters": 4}}
    )
    assert config.swim() == SwimSettings(probe_interval_s=0.5)
    assert config.election() == ElectionSettings(lease_s=0.4, step_down_s=4.0)
    assert config.cluster.max_clusters == 4
    # the defaults are the cores' own
    assert parse({}).swim() == SwimSettings() and parse({}).election() == ElectionSettings()
    for raw, message in [
        ({"probe_timeout_s": 0.3}, "cluster.probe_timeout_s must be below probe_interval_s"),
        ({"lease_s": 0.6}, "cluster.lease_s must be below election_timeout_min_s"),
        ({"election_timeout_max_s": 0.5}, "cluster.election_timeout_min_s must be below"),
        ({"max_clock_rate_error": 1.5}, "cluster.max_clock_rate_error must be in"),
        ({"indirect_checks": 17}, "cluster.indirect_checks must be <= 16"),
        ({"max_clusters": 0}, "cluster.max_clusters must be >= 1"),
        ({"heartbeat_s": 0.0}, "cluster.heartbeat_s must be positive"),
        ({"step_down_s": 0.3}, "cluster.step_down_s must be at least lease_s"),
    ]:
        with pytest.raises(ConfigError, match=message):
            parse({"cluster": raw}, "node.toml")


async def test_the_registry_version_moves_only_with_clusters_and_members():
    (ident,) = identities(1, b"registry")
    replica = Replica(ident)
    membership = RegistryMembership(replica)
    first = membership.version()
    await replica.put("components", "llama", {"name": "llama", "version": "1"})
    assert membership.version() == first  # another kind: nothing to re-read
    await replica.put("clusters", C, {"name": C, "admins": [ident.peer_id]})
    second = membership.version()
    assert second != first and membership.version() == second
    member = {"cluster_id": C, "peer_id": ident.peer_id, "roles": ["admin"]}
    await replica.put("members", f"{C}/{ident.peer_id}", member)
    third = membership.version()
    assert third != second
    assert membership.clusters_of(ident.peer_id) == [C]
    assert membership.view(C).voters == frozenset({ident.peer_id})
    await replica.put("members", f"{C}/{ident.peer_id}", {**member, "roles": ["worker"]})
    assert membership.version() != third  # rewritten: a new version of the entry


class FailingStore(MemoryElectionStore):
    """A disk that cannot take a vote while `broken`."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True

    async def save(self, cluster, state) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        await super().save(cluster, state)


async def test_a_cluster_whose_vote_cannot_be_stored_stops_alone_and_is_retried(autojump_clock):
    hub = MemoryNetwork(seed=1, latency_s=0.002)
    membership = FakeMembership()
    (ident,) = identities(1, b"disk")
    membership.set(C, ident.peer_id, True)
    store = FailingStore()
    runtime = ClusterRuntime(
        ident,
        hub.add_node(ident.peer_id),
        membership,
        election_store=store,
        fence_store=MemoryFenceStore(),
    )
    async with trio.open_nursery() as nursery:
        await nursery.start(runtime.run)
        await trio.sleep(3.0)  # its election timer fires: the term cannot be stored
        assert runtime.stats["cluster_failed"] >= 1
        assert runtime.clusters() == [] and not runtime.is_coordinator(C)
        store.broken = False  # the disk has room again: the retry runs the cluster
        await trio.sleep(10.0)
        assert runtime.clusters() == [C] and runtime.is_coordinator(C)
        assert store.states[C].term >= 1
        nursery.cancel_scope.cancel()


async def test_a_coordinator_declared_dead_is_not_named_while_no_other_is_known(autojump_clock):
    async with trio.open_nursery() as nursery:
        hub, membership, nodes = await start(nursery, 3, workers=1)
        leader = await wait_agreed(nodes, 5.0)
        term = leader.runtime.coordinator(C)[1]
        rest = [n for n in nodes if n is not leader]
        for node in rest:  # no election among the survivors for now
            if (driver := node.runtime.election_driver(C)) is not None:
                driver.freeze()
        leader.kill()
        await trio.sleep(4.0)
        for node in rest:
            assert node.runtime.member_states(C)[leader.peer_id] == "dead"
            assert node.runtime.coordinator(C) == (None, term)
        for node in rest:
            if (driver := node.runtime.election_driver(C)) is not None:
                driver.thaw()
        assert await wait_agreed(rest, 3.0) is not leader
        nursery.cancel_scope.cancel()
