"""Discovery at scale on the in-memory network (issue 19, "Finding nodes at internet scale").

    .venv/bin/python bench/discovery_sim.py [--nodes 1000] [--seed 1] [--quiet]

N nodes with k-bucket routing tables (K = 20, as py-libp2p's), each joined through one random
earlier node, each publishing its signed record and running `refresh_forever` as the daemon
does, on trio's virtual clock (`p2p.testing.discovery_sim` holds the nodes' set-up and the
result). Then 2 nodes are stopped (their connections refused, as a killed process's are)
and 2 cut off (a partition: their connections stay open but silent). One table: lookup
rounds against log2 N, the virtual seconds until every node listed every node (against the
record's 90 s validity), each node's work, and the seconds until no live node listed the
stopped and the cut-off ones (against 10 s). A line of progress goes out as it runs (wall
and virtual time, the phase, how far it got), so that a run cut short still tells something.

One process runs every node, so what one simulated node proved of a record's bytes is not
proved again by each of the others: a signature once (`shared_signature_checks`), a record's
decoding and signature once (`shared_record_checks`; every node still checks its freshness
at its own time). Nothing else is shared: each node runs its own validator on every value.
`--nodes 200` takes about a minute of CPU; `--nodes 1000` about fifteen, on a loaded 2-core
machine.
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, bench/ comes first on the path and bench/p2p.py would shadow the package
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import contextlib  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402

import trio  # noqa: E402
import trio.testing  # noqa: E402

from p2p import records  # noqa: E402
from p2p.discovery import DiscoverySettings, ResourceDirectory  # noqa: E402
from p2p.identity import NodeIdentity  # noqa: E402
from p2p.testing.discovery_sim import (  # noqa: E402
    MAINTENANCE_S,
    SETTINGS,
    SimNode,
    SimResult,
    shared_signature_checks,
)
from p2p.testing.kademlia import K  # noqa: E402
from p2p.testing.memnet import MemoryNetwork  # noqa: E402

Say = Callable[[str], None]


@contextlib.contextmanager
def shared_record_checks() -> Iterator[None]:
    """Within: a record's bytes that passed `records.validate_record` once under a key pass
    again without being decoded and verified anew; their freshness (future, stale) is still
    checked against each caller's `now`. Refusals are never cached."""
    real = records.validate_record
    passed: dict[tuple[str, bytes, str, float], records.ResourceRecord] = {}

    def validate(
        key: str,
        value: bytes,
        *,
        now: float,
        network_id: str,
        max_skew: float = records.DEFAULT_MAX_SKEW_S,
    ) -> records.ResourceRecord:
        token = (key, value, network_id, max_skew)
        record = passed.get(token)
        if record is None:
            record = real(key, value, now=now, network_id=network_id, max_skew=max_skew)
            passed[token] = record
        elif record.issued_at > now + max_skew:
            raise records.RecordError("future", "issued in the future")
        elif record.expires_at < now:
            raise records.RecordError("stale", f"expired {now - record.expires_at:.1f} s ago")
        return record

    records.validate_record = validate  # type: ignore[assignment]
    try:
        yield
    finally:
        records.validate_record = real  # type: ignore[assignment]


async def _run(sim: SimNode) -> None:
    with sim.scope:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sim.directory.run)
            nursery.start_soon(sim.node.run_maintenance, MAINTENANCE_S)
            nursery.start_soon(sim.directory.refresh_forever)


def _unlisted(sims: list[SimNode]) -> int:
    """How many (node, node) pairs are not listed, the node itself included."""
    ids = [sim.peer_id for sim in sims]
    return sum(not sim.directory.lists(p) for sim in sims for p in ids)


async def simulate(
    count: int,
    *,
    seed: int = 1,
    kills: int = 2,
    cutoffs: int = 2,
    settings: DiscoverySettings = SETTINGS,
    poll_s: float = 5.0,
    steady_s: float = 30.0,
    say: Say = print,
) -> SimResult:
    """Run the simulation under a MockClock with autojump (see the module); `say` gets the
    progress lines. Raises AssertionError when the nodes do not all find each other within
    the record's validity, or a node stops listing a live one."""
    wall = time.perf_counter()
    hub = MemoryNetwork(seed=seed, bucket_size=K)
    rng = random.Random(seed)
    sims: list[SimNode] = []
    started = trio.current_time()

    def progress(phase: str, text: str) -> None:
        say(
            f"[{time.perf_counter() - wall:7.1f} s wall {trio.current_time() - started:6.1f} s "
            f"virtual] {phase}: {text}; {hub.messages_sent} messages, "
            f"{sum(sim.directory.lookups for sim in sims)} record look-ups, "
            f"{sum(hub.lookup_rounds.values())} DHT lookups"
        )

    async with trio.open_nursery() as nursery:
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
            if len(sims) % max(1, count // 10) == 0 and len(sims) < count:
                progress("joining", f"{len(sims)} of {count} nodes")
        progress("joined", f"{count} nodes")
        while unlisted := _unlisted(sims):
            progress("finding", f"{count * count - unlisted} of {count * count} listed")
            if trio.current_time() - started > settings.record_validity_s:
                raise AssertionError(
                    f"{count} nodes: {unlisted} of {count * count} listings missing after "
                    f"{settings.record_validity_s} virtual seconds"
                )
            await trio.sleep(poll_s)  # virtual time (autojump clock)
        all_found_s = trio.current_time() - started
        progress("finding", f"every node lists every node after {all_found_s:.0f} s")
        minutes = all_found_s / 60
        lookups = sum(sim.directory.lookups for sim in sims)
        walks = sum(sim.directory.walker.walks for sim in sims)
        await trio.sleep(steady_s)  # virtual time: the work of keeping what was found
        steady_lookups = sum(sim.directory.lookups for sim in sims) - lookups
        steady_walks = sum(sim.directory.walker.walks for sim in sims) - walks
        unlisted = _unlisted(sims)
        assert unlisted == 0, f"{unlisted} listings of live nodes lost after {steady_s} s"
        progress("steady", f"{steady_s:.0f} s more, every node still lists every node")

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
                    kind = "stopped" if sim in stopped else "cut off"
                    progress(
                        "gone", f"a {kind} node left every list after {gone_at[sim.peer_id]} s"
                    )
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


def p99(rounds: Counter[int]) -> int:
    total, cumulative = sum(rounds.values()), 0
    for value in sorted(rounds):
        cumulative += rounds[value]
        if cumulative >= 0.99 * total:
            return value
    return 0


def table(result: SimResult) -> str:
    n = result.nodes
    rows = [
        ("nodes", f"{n}", ""),
        ("lookups measured", f"{sum(result.lookup_rounds.values())}", "every iterative lookup"),
        ("lookup rounds mean", f"{result.rounds_mean:.2f}", f"log2 N = {math.log2(n):.1f}"),
        ("lookup rounds p99 / max", f"{p99(result.lookup_rounds)} / {result.rounds_max}", ""),
        ("largest routing table", f"{result.known_max}", "k-buckets, K = 20"),
        (
            "every node lists every node after",
            f"{result.all_found_s:.0f} s",
            f"record valid {SETTINGS.record_validity_s:.0f} s (virtual)",
        ),
        ("record look-ups per node per min", f"{result.lookups_per_node_min:.0f}", "until then"),
        ("DHT walks per node per min", f"{result.walks_per_node_min:.0f}", "until then"),
        (
            "record look-ups per node per min",
            f"{result.steady_lookups_per_node_min:.0f}",
            "the 30 s after (all still listed)",
        ),
        ("DHT walks per node per min", f"{result.steady_walks_per_node_min:.1f}", "the 30 s after"),
        ("stopped nodes gone from every list", f"{result.gone_s['stopped']:.2f} s", "<= 10 s"),
        ("cut-off nodes gone from every list", f"{result.gone_s['cut off']:.2f} s", "<= 10 s"),
        ("messages", f"{result.messages}", ""),
        ("CPU wall time", f"{result.wall_s:.0f} s", ""),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{name:<{width}}  {value:>12}  {note}" for name, value, note in rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--quiet", action="store_true", help="the table only")
    args = parser.parse_args()

    def say(line: str) -> None:
        if not args.quiet:
            print(line, flush=True)

    async def run() -> SimResult:
        with shared_signature_checks(), shared_record_checks():
            return await simulate(args.nodes, seed=args.seed, say=say)

    result = trio.run(run, clock=trio.testing.MockClock(autojump_threshold=0))
    print(table(result), flush=True)


if __name__ == "__main__":
    main()
