"""Registry replication across real daemons: how long until a write is visible on all of them.

Starts N daemons on loopback (default 4, chained bootstrap), writes entries one at a time on
a random daemon, and for each write polls every daemon (one thread each) until it holds the
entry. Prints one table: p50 / p95 / p99 / max of "visible on all", and the RPC write latency.
Target: p99 <= 2 s with 4 daemons.

usage: python bench/registry_daemons.py [--daemons 4] [--writes 100]
"""

from __future__ import annotations

import sys
from pathlib import Path

# This folder holds bench/registry.py, named like the `registry` package: don't shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import random  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from daemon.api.client import RPCCallError  # noqa: E402
from daemon.devnet import DaemonProcess, Devnet  # noqa: E402


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def wait_visible(daemon: DaemonProcess, key: str, started: float, out: list[float]) -> None:
    client = daemon.client(timeout=10)
    deadline = started + 30
    while time.perf_counter() < deadline:
        try:
            client.call("registry_get", {"kind": "components", "key": key})
            out.append(time.perf_counter() - started)
            return
        except RPCCallError:
            time.sleep(0.002)
    out.append(float("inf"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--daemons", type=int, default=4)
    parser.add_argument("--writes", type=int, default=100)
    args = parser.parse_args()
    rng = random.Random(1)
    visible_all: list[float] = []
    write_ms: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="gridmesh-bench-") as tmp,
        Devnet(args.daemons, root=Path(tmp)) as net,
    ):
        net.wait_all_found(60)
        time.sleep(1)  # let start-up traffic settle before timing
        for i in range(args.writes):
            writer = rng.choice(net.daemons)
            key = f"bench-{i}"
            seen: list[float] = []
            started = time.perf_counter()
            writer.call(
                "registry_put",
                {"kind": "components", "key": key, "value": {"name": key, "version": "1"}},
            )
            write_ms.append((time.perf_counter() - started) * 1000)
            threads = [
                threading.Thread(target=wait_visible, args=(d, key, started, seen))
                for d in net.daemons
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            visible_all.append(max(seen))
    header = (
        f"{'daemons':>7} | {'writes':>6} | {'write p50':>9} | {'all p50':>8} | {'all p95':>8} | "
        f"{'all p99':>8} | {'all max':>8}"
    )
    print(header)
    print("-" * len(header))
    print(
        f"{args.daemons:>7} | {args.writes:>6} | {pct(write_ms, 0.5):>6.1f} ms | "
        f"{pct(visible_all, 0.5) * 1000:>5.0f} ms | {pct(visible_all, 0.95) * 1000:>5.0f} ms | "
        f"{pct(visible_all, 0.99) * 1000:>5.0f} ms | {max(visible_all) * 1000:>5.0f} ms"
    )
    print("target: a write on one of 4 daemons is visible on all within 2 s p99")
    return 0


if __name__ == "__main__":
    sys.exit(main())
