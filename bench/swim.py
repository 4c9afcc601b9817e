"""SWIM failure detection benchmark on the in-memory network, in trio's virtual time.

Every member runs the real core (`scheduler.swim`) and driver (`scheduler.swim_driver`) on
`p2p.testing.memnet` (5 ms links, `--loss`, `--jitter`). For each cluster size:
- quiet: once every member's piggyback queue is empty (the start-up announcements spread),
  the messages sent per member per second over `--quiet` virtual seconds (a request and its
  response count as two messages, as the hub counts them) and the bytes per member per second;
- dead: `--trials` runs, each a fresh cluster that settles, then one random member crashes;
  the time until each survivor declares it dead (every observer: p50, p99) and until the last
  one does (per trial: p50, p99, max), and `false`: deaths of members that did not crash,
  declared by anyone in any trial (should be 0). Target: the last within 5 s at up to 100
  members.
The wall-clock seconds each size took are printed too.

usage: python bench/swim.py [--sizes 5 20 100] [--trials 10] [--trials-large 4]
       [--loss 0.0] [--jitter 0.0] [--quiet 10] [--seed 1]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import trio  # noqa: E402
import trio.testing  # noqa: E402

from scheduler.swim import State  # noqa: E402
from tests.scheduler.swim_sim import SimCluster, start_cluster  # noqa: E402

SETTLE_S = 3.0
LIMIT_S = 15.0


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def _wait_quiet(sim: SimCluster, limit_s: float = 30.0) -> float:
    start = trio.current_time()
    while any(m.core.queued for m in sim.members):
        if trio.current_time() - start > limit_s:
            break
        await trio.sleep(0.1)
    return trio.current_time() - start


async def _quiet(count: int, args: argparse.Namespace) -> tuple[float, float, float]:
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(
            nursery, count, seed=args.seed, loss=args.loss, jitter_s=args.jitter
        )
        spread = await _wait_quiet(sim)
        sent, sent_bytes = sim.hub.messages_sent, sim.hub.bytes_sent
        await trio.sleep(args.quiet)
        per = count * args.quiet
        nursery.cancel_scope.cancel()
    return spread, (sim.hub.messages_sent - sent) / per, (sim.hub.bytes_sent - sent_bytes) / per


async def _trial(count: int, seed: int, args: argparse.Namespace) -> tuple[list[float], float, int]:
    async with trio.open_nursery() as nursery:
        sim = await start_cluster(nursery, count, seed=seed, loss=args.loss, jitter_s=args.jitter)
        await trio.sleep(SETTLE_S)
        victim = random.Random(seed).choice(sim.members)
        sim.crash(victim)
        crashed_at = trio.current_time()
        while trio.current_time() - crashed_at < LIMIT_S:
            if len(sim.declared(victim.peer_id, State.DEAD)) == count - 1:
                break
            await trio.sleep(0.05)
        nursery.cancel_scope.cancel()
    times = [t - crashed_at for t in sim.declared(victim.peer_id, State.DEAD).values()]
    last = max(times) if len(times) == count - 1 else float("inf")
    false = [c for _, _, c in sim.changes if c.state == State.DEAD and c.peer_id != victim.peer_id]
    return times, last, len(false)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5, 20, 100])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--trials-large", type=int, default=4, help="trials at 100+ members")
    parser.add_argument("--loss", type=float, default=0.0)
    parser.add_argument("--jitter", type=float, default=0.0)
    parser.add_argument("--quiet", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    print(
        f"SWIM, virtual time, 5 ms links, loss {args.loss:.0%}, jitter {args.jitter * 1000:.0f} ms"
    )
    header = (
        f"{'members':>7} | {'spread s':>8} | {'msg/member/s':>12} | {'B/member/s':>10} | "
        f"{'dead p50':>8} | {'dead p99':>8} | {'all p50':>7} | {'all p99':>7} | "
        f"{'all max':>7} | {'false':>5} | {'trials':>6} | {'wall s':>6}"
    )
    print(header)
    print("-" * len(header))
    for count in args.sizes:
        started = time.perf_counter()
        clock = trio.testing.MockClock(autojump_threshold=0)
        spread, rate, byte_rate = trio.run(_quiet, count, args, clock=clock)
        trials = args.trials_large if count >= 100 else args.trials
        every: list[float] = []
        lasts: list[float] = []
        false_deaths = 0
        for trial in range(trials):
            clock = trio.testing.MockClock(autojump_threshold=0)
            seed = args.seed * 1000 + trial
            times, last, false = trio.run(_trial, count, seed, args, clock=clock)
            every.extend(times)
            lasts.append(last)
            false_deaths += false
        print(
            f"{count:>7} | {spread:>8.1f} | {rate:>12.1f} | {byte_rate:>10.0f} | "
            f"{statistics.median(every):>8.2f} | {_pct(every, 0.99):>8.2f} | "
            f"{statistics.median(lasts):>7.2f} | {_pct(lasts, 0.99):>7.2f} | "
            f"{max(lasts):>7.2f} | {false_deaths:>5} | {trials:>6} | "
            f"{time.perf_counter() - started:>6.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
