"""A SWIM cluster on the in-memory network, in trio's virtual time: the real core and driver
per member, crashes, pauses and partitions (shared by tests/scheduler/test_swim_sim.py and
bench/swim.py)."""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

import trio

from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork, MemoryNode
from scheduler.swim import State, StateChanged, Swim, SwimSettings
from scheduler.swim_driver import SwimDriver, verify

CLUSTER = "sim"
_IDENTITIES: list[NodeIdentity] = []


def deterministic_identity(index: int) -> NodeIdentity:
    """The same keys in every run, so a seed replays a run."""
    seed = hashlib.sha256(f"swim test node {index}".encode()).digest()
    return NodeIdentity(node_seed=seed, payout_key=hashlib.sha256(seed).digest())


def identities(count: int) -> list[NodeIdentity]:
    while len(_IDENTITIES) < count:
        _IDENTITIES.append(deterministic_identity(len(_IDENTITIES)))
    return _IDENTITIES[:count]


@dataclass
class SimMember:
    ident: NodeIdentity
    node: MemoryNode
    driver: SwimDriver
    core: Swim
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    @property
    def peer_id(self) -> str:
        return self.ident.peer_id


@dataclass
class SimCluster:
    hub: MemoryNetwork
    nursery: trio.Nursery
    members: list[SimMember]
    # (virtual time, observer, change) for every state change any member saw
    changes: list[tuple[float, str, StateChanged]] = field(default_factory=list)

    @property
    def peers(self) -> list[str]:
        return [m.peer_id for m in self.members]

    def _start(self, member: SimMember) -> None:
        member.scope = trio.CancelScope()

        def record(change: StateChanged, by: str = member.peer_id) -> None:
            self.changes.append((trio.current_time(), by, change))

        async def run() -> None:
            with member.scope:
                await member.driver.run(member.core, record)

        self.nursery.start_soon(run)

    def crash(self, member: SimMember) -> None:
        member.scope.cancel()
        self.hub.remove_node(member.peer_id)

    def pause(self, member: SimMember) -> None:
        """As SIGSTOP: it neither answers nor sends, and its timers stand still."""
        member.scope.cancel()
        others = {m.peer_id for m in self.members if m is not member}
        self.hub.partition([{member.peer_id}, others])

    def resume(self, member: SimMember) -> None:
        self.hub.heal()
        self._start(member)

    def declared(self, peer: str, state: State, since: float = 0.0) -> dict[str, float]:
        """When each member first saw `peer` in `state` at or after `since`."""
        out: dict[str, float] = {}
        for when, by, change in self.changes:
            if when >= since and change.peer_id == peer and change.state == state:
                out.setdefault(by, when)
        return out

    def views(self, peer: str, observers: list[SimMember]) -> set[State | None]:
        return {m.core.state_of(peer) for m in observers}


async def start_cluster(
    nursery: trio.Nursery,
    count: int,
    *,
    settings: SwimSettings | None = None,
    seed: int = 0,
    loss: float = 0.0,
    jitter_s: float = 0.0,
    latency_s: float = 0.005,
) -> SimCluster:
    hub = MemoryNetwork(seed=seed, latency_s=latency_s, jitter_s=jitter_s, loss=loss)
    idents = identities(count)
    peers = [i.peer_id for i in idents]
    settings = settings or SwimSettings()
    members = []
    for index, ident in enumerate(idents):
        node = hub.add_node(ident.peer_id)
        core = Swim(
            ident.peer_id,
            CLUSTER,
            settings,
            sign=ident.sign,
            verify=verify,
            incarnation=1,
            now=trio.current_time(),
            members=peers,
            rng=random.Random(seed * 1000 + index),
        )
        members.append(SimMember(ident, node, SwimDriver(node), core))
    cluster = SimCluster(hub, nursery, members)
    for member in members:
        cluster._start(member)
    return cluster
