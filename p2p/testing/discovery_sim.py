"""A simulation of discovery at scale on the in-memory network (issue 19, "Finding nodes at
internet scale"), shared by tests/p2p/test_discovery_scale.py and bench/discovery_sim.py.

N nodes with k-bucket routing tables (K = 20, as py-libp2p's), each joined through one random
earlier node, each publishing its signed record and running `refresh_forever` as the daemon
does, on trio's virtual clock. `simulate` measures:
- the rounds of every iterative lookup the run made (puts, walks, gets), against log2 N;
- how long until every node's `find()` lists every node (against the record's validity);
- the work each node did: records looked up and walks, per node per virtual minute, until
  then and over `steady_s` after (when every node must still list every node);
- after `kills` nodes are stopped (their connections refused, as a killed process's are)
  and `cutoffs` are cut off (a partition: their connections stay open but silent), how
  long until no live node lists them any more.

One process runs every node, so a record's signature checked by one simulated node is not
checked again by the others (`shared_signature_checks`: the check is a pure function of the
bytes; every node still runs its whole validator). Without it, 1,000 nodes spend most of
the run in Ed25519.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from p2p import codec
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.identity import NodeIdentity
from p2p.testing.kademlia import K
from p2p.testing.memnet import MemoryNetwork, MemoryNode

SETTINGS = DiscoverySettings(network_id="sim", record_validity_s=90, publish_interval_s=30)
MAINTENANCE_S = 60.0  # each node's own Kademlia refresh (a self and a random lookup)


@contextlib.contextmanager
def shared_signature_checks() -> Iterator[None]:
    """Within: an envelope whose signature was checked once passes without a second check."""
    real = codec.verify_envelope
    passed: set[tuple[str, bytes, bytes]] = set()

    def verify(env: codec.Envelope) -> codec.Envelope:
        token = (env.sender, env.signature, env.signing_bytes())
        if token not in passed:
            real(env)
            passed.add(token)
        return env

    codec.verify_envelope = verify  # type: ignore[assignment]
    try:
        yield
    finally:
        codec.verify_envelope = real  # type: ignore[assignment]


@dataclass
class SimNode:
    peer_id: str
    node: MemoryNode
    directory: ResourceDirectory
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


@dataclass
class SimResult:
    nodes: int
    lookup_rounds: Counter[int]
    known_max: int  # the largest routing table
    all_found_s: float  # virtual seconds until every node listed every node
    lookups_per_node_min: float  # record look-ups per node per virtual minute, until all found
    walks_per_node_min: float
    steady_lookups_per_node_min: float  # the same over `steady_s` after all were found
    steady_walks_per_node_min: float
    gone_s: dict[str, float]  # "stopped" / "cut off" -> slowest victim's seconds
    wall_s: float
    messages: int

    @property
    def rounds_mean(self) -> float:
        total = sum(self.lookup_rounds.values())
        return sum(r * n for r, n in self.lookup_rounds.items()) / max(1, total)

    @property
    def rounds_max(self) -> int:
        return max(self.lookup_rounds, default=0)


async def _run(sim: SimNode) -> None:
    with sim.scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sim.directory.run)
            nursery.start_soon(sim.node.run_maintenance, MAINTENANCE_S)
            nursery.start_soon(sim.directory.refresh_forever)


def _all_listed(sims: list[SimNode]) -> bool:
    ids = [sim.peer_id for sim in sims]
    return all(all(sim.directory.lists(p) for p in ids) for sim in sims)


async def simulate(
    count: int,
    *,
    seed: int = 1,
    kills: int = 2,
    cutoffs: int = 2,
    settings: DiscoverySettings = SETTINGS,
    limit_s: float | None = None,
    poll_s: float = 5.0,
    steady_s: float = 30.0,
) -> SimResult:
    """Run the simulation (under a MockClock with autojump); raises AssertionError when the
    nodes do not all find each other within `limit_s` (default: the record's validity)."""
    wall = time.perf_counter()
    limit_s = settings.record_validity_s if limit_s is None else limit_s
    hub = MemoryNetwork(seed=seed, bucket_size=K)
    rng = random.Random(seed)
    sims: list[SimNode] = []
    async with trio.open_nursery() as nursery:
        started = trio.current_time()
        for index in range(count):
            ident = NodeIdentity.generate()
            node = hub.add_node(ident.peer_id)
            directory = ResourceDirectory(
                node,
                ident,
                settings,
                describe=lambda i=index: ([f"/memory/{i}"], {"cpu": {"cores": 1 + i % 64}}),
            )
            node.set_validator(directory.validator)
            if sims:
                await node.connect(rng.choice(sims).peer_id)
            sim = SimNode(ident.peer_id, node, directory)
            nursery.start_soon(_run, sim)
            sims.append(sim)
        while not _all_listed(sims):
            if trio.current_time() - started > limit_s:
                missing = sum(not a.directory.lists(b.peer_id) for a in sims for b in sims)
                a, b = next((a, b) for a in sims for b in sims if not a.directory.lists(b.peer_id))
                d = a.directory
                why = (
                    f"e.g. {b.peer_id[:12]} at {a.peer_id[:12]}: "
                    f"met {b.peer_id in d.walker.met}, walks {d.walker.walks}, "
                    f"known {b.peer_id in a.node.known_peers()}, held {b.peer_id in d._cache}, "
                    f"gone {b.peer_id in d.liveness.lost()}, retry {d._retry_at.get(b.peer_id)}"
                )
                raise AssertionError(
                    f"{count} nodes: {missing} of {count * count} listings missing "
                    f"after {limit_s} virtual seconds ({why})"
                )
            await trio.sleep(poll_s)  # virtual time (autojump clock)
        all_found_s = trio.current_time() - started
        minutes = all_found_s / 60
        lookups = sum(sim.directory.lookups for sim in sims)
        walks = sum(sim.directory.walker.walks for sim in sims)
        await trio.sleep(steady_s)  # virtual time: the work of keeping what was found
        steady_lookups = sum(sim.directory.lookups for sim in sims) - lookups
        steady_walks = sum(sim.directory.walker.walks for sim in sims) - walks
        assert _all_listed(sims), "a node stopped listing a live node"

        victims = rng.sample(sims, kills + cutoffs)
        stopped, cut = victims[:kills], victims[kills:]
        for sim in stopped:  # a stopped daemon: its connections are refused at once
            sim.scope.cancel()
            hub.remove_node(sim.peer_id, refuse=True)
        hub.partition([{sim.peer_id} for sim in cut])  # each alone, its links silent
        survivors = [sim for sim in sims if sim not in victims]
        went = trio.current_time()
        gone_at: dict[str, float] = {}
        while len(gone_at) < len(victims) and trio.current_time() - went <= 60:
            await trio.sleep(0.25)  # virtual time (autojump clock)
            for sim in victims:
                if sim.peer_id not in gone_at and not any(
                    s.directory.lists(sim.peer_id) for s in survivors
                ):
                    gone_at[sim.peer_id] = trio.current_time() - went
        gone_s = {
            "stopped": max((gone_at.get(s.peer_id, math.inf) for s in stopped), default=0.0),
            "cut off": max((gone_at.get(s.peer_id, math.inf) for s in cut), default=0.0),
        }
        nursery.cancel_scope.cancel()
    return SimResult(
        nodes=count,
        lookup_rounds=Counter(hub.lookup_rounds),
        known_max=max(len(sim.node.known_peers()) for sim in sims),
        all_found_s=all_found_s,
        lookups_per_node_min=lookups / count / max(minutes, 1e-9),
        walks_per_node_min=walks / count / max(minutes, 1e-9),
        steady_lookups_per_node_min=steady_lookups / count / (steady_s / 60),
        steady_walks_per_node_min=steady_walks / count / (steady_s / 60),
        gone_s=gone_s,
        wall_s=time.perf_counter() - wall,
        messages=hub.messages_sent,
    )
