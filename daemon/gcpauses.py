"""Garbage-collector pauses: measured, and kept short by freezing what start-up built.

CPython's full (generation 2) collection walks every object the collector tracks, and a
daemon tracks a few hundred thousand from its imports alone (torch, py-libp2p, web3): each
full collection stops the event loop, and every request it is serving, for 50-150 ms on a
small machine. Work that allocates (a flood of messages, a burst of requests) makes full
collections more frequent, so they were a large part of the honest p99 that
`bench/abuse.py` measures.

`freeze()` moves every object alive at that moment into the permanent generation
(`gc.freeze`), which collections skip: called once start-up is done and again after a model
is loaded, it leaves full collections only what was made since. (What is garbage at that
moment would never be collected, so it collects first: one pause, at a moment of our
choosing, instead of one every few seconds under load.)

`GcPauses` times every collection through `gc.callbacks`. The callback runs wherever an
allocation triggers a collection, in any thread, possibly while that thread holds a lock, so
it takes none (it only updates plain counters); the metrics collector reads them at scrape.
"""

from __future__ import annotations

import bisect
import gc
import logging
import time
from typing import Any

log = logging.getLogger(__name__)

# upper bounds of the histogram's buckets, in seconds (+Inf is implied)
BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
GENERATIONS = (0, 1, 2)


class GcPauses:
    """How long each garbage collection stopped this process, per generation."""

    def __init__(self) -> None:
        self.counts = {g: [0] * (len(BUCKETS) + 1) for g in GENERATIONS}
        self.sums = dict.fromkeys(GENERATIONS, 0.0)
        self.max_s = 0.0
        self.frozen = 0  # objects moved to the permanent generation by the last freeze
        self._started = 0.0
        self._installed = False

    def install(self) -> None:
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True

    def uninstall(self) -> None:
        if self._installed:
            gc.callbacks.remove(self._on_gc)
            self._installed = False

    def _on_gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
            return
        took = time.perf_counter() - self._started
        generation = min(max(int(info.get("generation", 2)), 0), 2)
        self.counts[generation][bisect.bisect_left(BUCKETS, took)] += 1
        self.sums[generation] += took
        self.max_s = max(self.max_s, took)

    def freeze(self, why: str) -> None:
        """Collect, then freeze what is left (see the module's docstring)."""
        started = time.perf_counter()
        gc.collect()
        before = gc.get_freeze_count()
        gc.freeze()
        self.frozen = gc.get_freeze_count() - before
        log.debug(
            "froze %d objects after %s (collected first in %.0f ms)",
            self.frozen,
            why,
            (time.perf_counter() - started) * 1000,
        )

    def snapshot(self) -> dict[str, Any]:
        """Per generation: cumulative bucket counts ({upper bound: count}, "+Inf" last) and
        the sum; the longest pause; how many objects are frozen."""
        generations: dict[str, Any] = {}
        for generation, counts in self.counts.items():
            buckets: dict[str, int] = {}
            running = 0
            for bound, count in zip((*map(str, BUCKETS), "+Inf"), counts, strict=True):
                running += count
                buckets[bound] = running
            generations[str(generation)] = {"buckets": buckets, "sum": self.sums[generation]}
        return {
            "generations": generations,
            "max_s": self.max_s,
            "frozen": gc.get_freeze_count(),
        }
