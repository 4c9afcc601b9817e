"""A simulation of discovery at scale on the in-memory network (issue 19, "Finding nodes at
internet scale"): the nodes' set-up and the result, for bench/discovery_sim.py (which drives
the run and prints progress).

N nodes with k-bucket routing tables (K = 20, as py-libp2p's), each joined through one random
earlier node, each publishing its signed record and running `refresh_forever` as the daemon
does, on trio's virtual clock. A run measures:
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
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import trio

from p2p import codec
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.testing.memnet import MemoryNode

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
