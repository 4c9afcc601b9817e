"""Anti-entropy's per-round cost in one replica, by registry size: one table.

A sync round, served or started, asks the replica for its bucket digests, lists the entries
of the buckets that differ (a page at a time) and plans what to pull and push from a peer's
listing. Under a fill flood (an attacker writing up to its quota) every replica holds
thousands of entries and one honest write changes a single bucket, so what a round costs
should follow the buckets asked for, not the registry's size. This times, at each size:

- `apply 1`: one new entry applied (the write that makes the digests stale);
- `digests`: `Replica.digests()` right after that write (the first call after a change);
- `list 1b` / `list 16b`: `sync.listing` of one bucket / of all 16 buckets of the kind
  (a first page: at most `MAX_LISTING` summaries, 1 MiB);
- `plan 1b`: `sync.plan` of a peer's listing of one bucket (equal to ours: nothing to do
  but compare, the common case).

Each is the median of `--repeat` runs, in milliseconds. The replica has no store (a fake one
hands the entries to `Replica.load`, as a restart reads sqlite), so this is CPU time only.

usage: python bench/registry_sync.py [--sizes 1000 4500 20000] [--repeat 20]
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this folder would come first on the path and `bench/registry.py` would
# shadow the `registry` package.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

import argparse  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterable  # noqa: E402
from typing import Any  # noqa: E402

import trio  # noqa: E402

from p2p.identity import NodeIdentity  # noqa: E402
from registry import sync  # noqa: E402
from registry.entry import Entry, sign_entry  # noqa: E402
from registry.hlc import HybridClock  # noqa: E402
from registry.replica import Limits, Replica  # noqa: E402

KIND = "components"


class _Store:
    """Just enough of `RegistryStore` for `Replica.load` and `Replica.apply`."""

    bad_rows = 0

    def __init__(self, entries: list[Entry]) -> None:
        self._entries = entries

    async def load_all(self) -> list[Entry]:
        return list(self._entries)

    async def apply(self, entries: Iterable[Entry]) -> None:
        pass


def _entries(ident: NodeIdentity, clock: HybridClock, count: int) -> list[Entry]:
    """`count` entries, written in an order unrelated to their keys' (as a registry's keys
    are written): a replica holds them in that order, which sorting them does not get for
    free."""
    names = list(range(count))
    random.Random(1).shuffle(names)
    out = []
    for i in names:
        ts = clock.now()
        value = {"name": f"c{i}", "version": "1"}
        out.append(
            sign_entry(
                ident, kind=KIND, key=f"k{i:06d}", value=value, ts=ts, created=ts,
                owner=ident.peer_id,
            )
        )  # fmt: skip
    return out


def _median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def _time(fn: Callable[[], Any], repeat: int) -> float:
    samples = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return _median_ms(samples)


async def _measure(size: int, signed: list[Entry], ident: NodeIdentity, repeat: int) -> list[float]:
    limits = Limits(author_max_entries=1_000_000, author_max_bytes=1 << 32)
    replica = Replica(ident, store=_Store(signed[:size]), limits=limits)  # type: ignore[arg-type]
    await replica.load()
    assert len(replica.entries) == size
    one = [(KIND, 0)]
    every = [(KIND, b) for b in range(sync.BUCKETS)]

    applied, cold = [], []
    for i in range(repeat):
        ts = replica.clock.now()
        entry = sign_entry(
            ident, kind=KIND, key=f"new{i}", value={"name": "n", "version": "1"}, ts=ts,
            created=ts, owner=ident.peer_id,
        )  # fmt: skip
        start = time.perf_counter()
        assert await replica.apply([entry])
        applied.append(time.perf_counter() - start)
        start = time.perf_counter()
        replica.digests()
        cold.append(time.perf_counter() - start)
    theirs = sync.listing(replica.entries, one)
    return [
        _median_ms(applied),
        _median_ms(cold),
        _time(lambda: sync.listing(replica.entries, one), repeat),
        _time(lambda: sync.listing(replica.entries, every), repeat),
        _time(lambda: sync.plan(replica.entries, theirs), repeat),
    ]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 4500, 20000])
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    ident = NodeIdentity.generate()
    signed = _entries(ident, HybridClock(), max(args.sizes))
    columns = ["entries", "apply 1", "digests", "list 1b", "list 16b", "plan 1b"]
    print(" ".join(f"{c:>9}" for c in columns) + "   (median ms)")
    for size in args.sizes:
        row = await _measure(size, signed, ident, args.repeat)
        print(f"{size:>9} " + " ".join(f"{v:>9.3f}" for v in row), flush=True)


if __name__ == "__main__":
    trio.run(main)
