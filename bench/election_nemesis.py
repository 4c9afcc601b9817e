"""The election's nemesis at full size: seeded random fault schedules against clusters of 3, 5
and 7 voters on the in-memory network, in virtual time (the schedule and its checks are in
tests/scheduler/nemesis.py; `make test` runs a few of them).

Each schedule: 8 s of mixed faults (partitions, one-way cuts, loss, delay, pauses past the
lease with a command sent on waking, crashes and restarts with state kept, clocks off by up
to ±5 % in rate and ±5 s in offset), then the faults stop; checked after every step: at most
one coordinator per term, no command accepted from a term lower than one seen, no two leases
at once; at the end: exactly one coordinator known to all within 3 s. Then 1 s settle, 3 s
quiet (messages counted), and the coordinator is killed: the failover is timed until every
other member knows a new one.

Columns: schedules run and failed; convergence after the faults stop, p50/p99/max; failover
after the coordinator is killed, p50/p99/max; election messages (heartbeats, votes and their
answers; commands not counted) per member per second in the quiet cluster; commands sent by
paused coordinators on waking, and command refusals as stale. All times are virtual seconds.
Failures are printed with their seed; `--replay SEED SIZE` runs one again and prints it.

usage: python bench/election_nemesis.py [--schedules 1000] [--sizes 3 5 7] [--seed 0]
       [--workers N] [--replay SEED SIZE]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402
from concurrent.futures import ProcessPoolExecutor  # noqa: E402

from tests.scheduler.nemesis import Result, describe, run_schedule  # noqa: E402


def _pct(values: list[float], q: float) -> float:
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]


def _one(job: tuple[int, int]) -> Result:
    return run_schedule(*job)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--schedules", type=int, default=1000, help="per cluster size")
    parser.add_argument("--sizes", type=int, nargs="+", default=[3, 5, 7])
    parser.add_argument("--seed", type=int, default=0, help="the first seed")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--replay", type=int, nargs=2, metavar=("SEED", "SIZE"))
    args = parser.parse_args()
    if args.replay:
        result = run_schedule(*args.replay)
        print(
            describe(result)
            if not result.ok
            else f"seed {args.replay[0]} size {args.replay[1]}: ok"
        )
        print(result)
        return 0 if result.ok else 1
    jobs = [
        (seed, size) for size in args.sizes for seed in range(args.seed, args.seed + args.schedules)
    ]
    started = time.monotonic()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as pool:
            results = list(pool.map(_one, jobs, chunksize=8))
    else:
        results = [_one(job) for job in jobs]
    wall = time.monotonic() - started
    header = (
        f"{'voters':>6} {'runs':>6} {'failed':>6} | {'converge p50':>12} {'p99':>6} {'max':>6} | "
        f"{'failover p50':>12} {'p99':>6} {'max':>6} | {'msgs/member/s':>13} | "
        f"{'zombies':>7} {'stale refused':>13}"
    )
    print(header)
    print("-" * len(header))
    failed_all: list[Result] = []
    for size in args.sizes:
        rs = [r for r in results if r.size == size]
        failed = [r for r in rs if not r.ok]
        failed_all.extend(failed)
        conv = [r.converge_s for r in rs if r.converge_s is not None]
        fail = [r.failover_s for r in rs if r.failover_s is not None]
        quiet = [r.quiet_msgs_per_member_s for r in rs if r.failover_s is not None]
        print(
            f"{size:>6} {len(rs):>6} {len(failed):>6} | {_pct(conv, 0.5):>12.3f} "
            f"{_pct(conv, 0.99):>6.3f} {max(conv, default=math.nan):>6.3f} | "
            f"{_pct(fail, 0.5):>12.3f} {_pct(fail, 0.99):>6.3f} "
            f"{max(fail, default=math.nan):>6.3f} | "
            f"{sum(quiet) / max(1, len(quiet)):>13.1f} | "
            f"{sum(r.zombies_sent for r in rs):>7} {sum(r.commands_refused_stale for r in rs):>13}"
        )
    print(f"\n{len(results)} schedules in {wall:.0f} s of wall time ({args.workers} workers)")
    for result in failed_all:
        print(describe(result))
    return 1 if failed_all else 0


if __name__ == "__main__":
    sys.exit(main())
