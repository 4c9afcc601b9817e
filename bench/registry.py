"""Registry replication benchmark on the in-memory network: 50, 200 and 1,000 nodes, one table.

Each node runs the real code: a `NodeIdentity`, a `Replica` (no store) and a `Replicator`
(gossip of new entries plus anti-entropy with one random peer per `sync_interval_s`) on the
in-memory network (`p2p.testing.memnet`) with message loss, in trio's virtual time. Nodes
bootstrap by a chain of dials and one DHT refresh each; then a stream of writes (`--rate` per
second, each a new key, from random nodes) runs, and the simulation goes on until every
replica holds every write.
Each size runs once per `--settings` pair (sync_interval_s/sync_timeout_s): by default the
Replicator's defaults, 1 s / 0.5 s.

Columns: convergence time after a write (virtual seconds from the write until every replica
holds it), p50, p99 and max; bytes sent per node per second from the hub's byte counter
while busy (the write stream and 5 s after it) with the gossip share of them, and while idle
(10 s once converged: anti-entropy alone); the wall-clock seconds each simulation took,
bootstrap included. Target: p99 <= 3 s at 200 nodes with 10% loss.

usage: python bench/registry.py [--sizes 50 200 1000] [--loss 0.1] [--writes 100]
       [--writes-large 100] [--rate 10] [--settings 1/0.5 0.5/0.5] [--fanout 6] [--seed 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This file is named like the `registry` package: run as a script, its folder would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import time  # noqa: E402
from collections import Counter  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import trio  # noqa: E402
import trio.testing  # noqa: E402

from p2p.identity import NodeIdentity  # noqa: E402
from p2p.testing.memnet import GOSSIP_FANOUT, MemoryNetwork  # noqa: E402
from registry.hlc import HybridClock  # noqa: E402
from registry.replica import Replica  # noqa: E402
from registry.replication import ReplicationSettings, Replicator  # noqa: E402

LARGE = 1000  # from this size on, --writes-large applies
MAINTENANCE_S = 3600.0  # one refresh at start (the bootstrap), none while measuring
BUSY_TAIL_S = 5.0  # the busy window runs this long past the last write
SETTLE_LIMIT_S = 120.0  # virtual seconds to wait for convergence after the last write
IDLE_S = 10.0  # the idle window, once converged


@dataclass
class Result:
    nodes: int
    settings: str
    writes: int
    p50: float
    p99: float
    worst: float
    busy_bytes: float  # per node per second while writing
    gossip_share: float
    idle_bytes: float  # per node per second once converged, anti-entropy only
    wall_s: float
    unconverged: int


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Arrivals:
    """Per key: when it was written, and how many replicas hold it since when."""

    def __init__(self) -> None:
        self.written: dict[str, float] = {}
        self.holders: Counter[str] = Counter()
        self.last: dict[str, float] = {}

    def watch(self, replica: Replica) -> None:
        inner = replica.apply
        held: set[str] = set()

        async def apply(entries, source="local"):  # type: ignore[no-untyped-def]
            changed = await inner(entries, source)
            for entry in changed:
                if entry.key in self.written and entry.key not in held:
                    held.add(entry.key)
                    self.holders[entry.key] += 1
                    self.last[entry.key] = trio.current_time()
            return changed

        replica.apply = apply  # type: ignore[method-assign]

    def times(self, replicas: int) -> list[float]:
        return [
            self.last[key] - at for key, at in self.written.items() if self.holders[key] == replicas
        ]


async def simulate(
    size: int, writes: int, settings: ReplicationSettings, args: argparse.Namespace
) -> tuple[Arrivals, float, float, float]:
    """One network: (arrivals, busy bytes/node/s, gossip share, idle bytes/node/s)."""
    hub = MemoryNetwork(seed=args.seed, fanout=args.fanout)
    rng = random.Random(args.seed)
    arrivals = Arrivals()
    replicators: list[Replicator] = []
    async with trio.open_nursery() as nursery:
        for index in range(size):
            ident = NodeIdentity.generate()
            node = hub.add_node(ident.peer_id)
            replica = Replica(ident, clock=HybridClock(now_ms=lambda: int(hub.now() * 1000)))
            arrivals.watch(replica)
            replicator = Replicator(node, replica, settings, rng=random.Random(rng.random()))
            if index:
                await node.connect(replicators[-1].net.peer_id)
            await replicator.start()
            nursery.start_soon(replicator.run_anti_entropy)
            nursery.start_soon(node.run_maintenance, MAINTENANCE_S)
            replicators.append(replicator)
        await trio.sleep(10)  # the bootstrap refreshes finish
        hub.loss = args.loss

        # busy: the write stream and BUSY_TAIL_S after it
        start, sent, gossip = trio.current_time(), hub.bytes_sent, hub.gossip_bytes
        for i in range(writes):
            key = f"w-{i}"
            arrivals.written[key] = trio.current_time()
            value = {"name": f"model-{i}", "version": "1"}
            await rng.choice(replicators).write("components", key, value)
            await trio.sleep(1 / args.rate)
        await trio.sleep(BUSY_TAIL_S)
        busy_s = trio.current_time() - start
        sent, gossip = hub.bytes_sent - sent, hub.gossip_bytes - gossip
        deadline = trio.current_time() + SETTLE_LIMIT_S
        while trio.current_time() < deadline:
            if all(arrivals.holders[key] == size for key in arrivals.written):
                break
            await trio.sleep(0.5)
        # idle: a converged registry, anti-entropy only
        idle = hub.bytes_sent
        await trio.sleep(IDLE_S)
        idle = hub.bytes_sent - idle
        nursery.cancel_scope.cancel()
    return arrivals, sent / size / busy_s, gossip / max(sent, 1), idle / size / IDLE_S


def run_one(size: int, label: str, args: argparse.Namespace) -> Result:
    interval, timeout = (float(x) for x in label.split("/"))
    settings = ReplicationSettings(
        network_id="bench", sync_interval_s=interval, sync_timeout_s=timeout
    )
    writes = args.writes_large if size >= LARGE else args.writes
    started = time.perf_counter()
    arrivals, busy, share, idle = trio.run(
        simulate, size, writes, settings, args, clock=trio.testing.MockClock(autojump_threshold=0)
    )
    wall = time.perf_counter() - started
    times = arrivals.times(size) or [math.nan]
    return Result(
        nodes=size,
        settings=label,
        writes=writes,
        p50=pct(times, 0.5),
        p99=pct(times, 0.99),
        worst=max(times),
        busy_bytes=busy,
        gossip_share=share,
        idle_bytes=idle,
        wall_s=wall,
        unconverged=writes - len(arrivals.times(size)),
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 200, 1000])
    parser.add_argument("--loss", type=float, default=0.10)
    parser.add_argument("--writes", type=int, default=100, help="writes per run")
    parser.add_argument(
        "--writes-large", type=int, default=100, help=f"writes per run from {LARGE} nodes on"
    )
    parser.add_argument("--rate", type=float, default=10.0, help="writes per virtual second")
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["1/0.5"],
        help="Replicator settings to compare, as sync_interval_s/sync_timeout_s",
    )
    parser.add_argument("--fanout", type=int, default=GOSSIP_FANOUT)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    rows = []
    for size in args.sizes:
        for label in args.settings:
            print(f"simulating {size} nodes, {label} ...", file=sys.stderr, flush=True)
            rows.append(run_one(size, label, args))
    header = (
        f"{'nodes':>5} | {'sync s/timeout s':>16} | {'writes':>6} | {'conv p50':>8} | "
        f"{'conv p99':>8} | {'conv max':>8} | {'B/node/s busy':>13} | {'gossip':>6} | "
        f"{'B/node/s idle':>13} | {'wall':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.nodes:>5} | {r.settings:>16} | {r.writes:>6} | {r.p50:>6.2f} s | "
            f"{r.p99:>6.2f} s | {r.worst:>6.2f} s | {r.busy_bytes:>13,.0f} | "
            f"{r.gossip_share:>6.0%} | {r.idle_bytes:>13,.0f} | {r.wall_s:>5.1f} s"
            + (f"  ({r.unconverged} writes never converged)" if r.unconverged else "")
        )
    print(
        f"notes: {args.loss:.0%} loss, 5 ms links, gossip fanout {args.fanout}, "
        f"{args.rate:g} writes/s (each a new key) from random nodes; {LARGE}+ nodes: "
        f"{args.writes_large} writes. conv: virtual seconds from a write until every replica "
        f"holds it. busy: bytes/node/s over the writes and {BUSY_TAIL_S:g} s after, gossip its "
        f"share; idle: {IDLE_S:g} s once converged. Target: p99 <= 3 s at 200 nodes."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
