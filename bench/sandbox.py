"""Sandbox benchmark: what a policy call through the pool costs.

A no-op policy (its eval returns its input) runs in the sandbox with this machine's layers
(printed first). Measured: one caller, calls one after another (p50, p99, mean); then
`--concurrency` callers against `--workers` warm workers of the policy (calls/s in total and
per core, the cores being those this process may run on). Also a call with a 64 KiB input,
and the first call of a new policy (its load into a spare worker). Target: a no-op call
<= 0.5 ms p50 (issue 18).

usage: python bench/sandbox.py [--calls 5000] [--workers N] [--concurrency N] [--layers L,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from daemon.sandbox import SandboxConfig, SandboxPool, load_package  # noqa: E402

NOOP = """class AIOSv1PolicyRule:
    def __init__(self, rule_id, settings, parameters):
        pass

    def eval(self, parameters, input_data, context):
        return input_data

    def management(self, action, data):
        return None
"""


def make_noop(folder: Path, name: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "function.py").write_text(NOOP)
    (folder / "manifest.json").write_text(f'{{"name": "{name}"}}')
    return folder


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def bench(args: argparse.Namespace) -> None:
    cores = len(os.sched_getaffinity(0))
    workers = args.workers or cores
    layers = tuple(x for x in args.layers.split(",") if x) if args.layers is not None else None
    with tempfile.TemporaryDirectory() as tmp:
        noop = load_package(make_noop(Path(tmp) / "noop", "noop"))
        other = load_package(make_noop(Path(tmp) / "other", "other"))
        config = SandboxConfig(
            spare_workers=1,
            workers_per_policy=workers,
            max_workers=workers + 2,
            # --layers "": none, and the opt-in that runs an untrusted policy without them
            **({"layers": layers, "run_unisolated": not layers} if layers is not None else {}),
        )
        async with SandboxPool(config) as pool:
            for name, state in pool.layers.items():
                print(f"# {name:13} {state}")
            await pool.call(noop, "eval", {"input_data": 0})  # load it
            sequential: list[float] = []
            for index in range(args.calls):
                start = time.perf_counter()
                await pool.call(noop, "eval", {"input_data": index})
                sequential.append(time.perf_counter() - start)
            big_input = b"x" * 65536
            big: list[float] = []
            for _ in range(max(100, args.calls // 10)):
                start = time.perf_counter()
                await pool.call(noop, "eval", {"input_data": big_input})
                big.append(time.perf_counter() - start)
            await trio.sleep(0.5)  # let the spare refill start
            start = time.perf_counter()
            await pool.call(other, "eval", {"input_data": 0})
            first_call = time.perf_counter() - start

            done = 0

            async def caller(deadline: float) -> None:
                nonlocal done
                while time.perf_counter() < deadline:
                    await pool.call(noop, "eval", {"input_data": 1})
                    done += 1

            # warm the concurrent workers, then measure
            async with trio.open_nursery() as nursery:
                for _ in range(args.concurrency or 2 * workers):
                    nursery.start_soon(caller, time.perf_counter() + 0.5)
            done = 0
            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(args.concurrency or 2 * workers):
                    nursery.start_soon(caller, start + args.seconds)
            elapsed = time.perf_counter() - start
            counters = pool.counters.snapshot()
    rate = done / elapsed
    print(f"# cores available: {cores}; workers for the policy: {workers}")
    print("| measurement | p50 ms | p99 ms | mean ms | calls/s | calls/s per core |")
    print("|---|---|---|---|---|---|")
    seq_rate = len(sequential) / sum(sequential)
    print(
        f"| no-op call, one caller ({len(sequential)} calls) | {ms(percentile(sequential, 0.5))} "
        f"| {ms(percentile(sequential, 0.99))} | {ms(statistics.fmean(sequential))} "
        f"| {seq_rate:.0f} | - |"
    )
    print(
        f"| 64 KiB input ({len(big)} calls) | {ms(percentile(big, 0.5))} "
        f"| {ms(percentile(big, 0.99))} | {ms(statistics.fmean(big))} | - | - |"
    )
    print(
        f"| no-op, {args.concurrency or 2 * workers} callers, {args.seconds:g} s | - | - | - "
        f"| {rate:.0f} | {rate / cores:.0f} |"
    )
    print(f"| first call of a new policy (load into a spare) | {ms(first_call)} | - | - | - | - |")
    print(f"# counters: {counters}")
    target = percentile(sequential, 0.5) <= 0.0005
    print(f"# target no-op p50 <= 0.5 ms: {'met' if target else 'NOT met'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=5000)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--workers", type=int, default=0, help="default: the cores")
    parser.add_argument("--concurrency", type=int, default=0, help="default: 2 x workers")
    parser.add_argument(
        "--layers", default=None, help="layers to try, comma-separated (default: all)"
    )
    trio.run(bench, parser.parse_args())


if __name__ == "__main__":
    main()
