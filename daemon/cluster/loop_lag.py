"""How late this process's trio event loop runs its tasks (its lag), measured, not guessed.

A task asks to sleep `interval_s` and records how much later than that it woke: time the loop
spent on other work without yielding (a GIL-heavy model load, a long decode, a burst of
handshakes) or the whole process not running (SIGSTOP, an overloaded machine). Every timer of
the cluster cores (heartbeats, election timeouts, SWIM probes) is late by at least as much,
so a lag near an election timeout explains a lost lease or a new term.
"""

from __future__ import annotations

import bisect
import logging
import os
import time

import trio

log = logging.getLogger(__name__)

INTERVAL_S = 0.05
# upper bounds of the histogram's buckets, in seconds (+Inf is implied)
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LOG_ABOVE_S = 0.1  # a lag this long is logged (an operator sees it beside a new term)


class LoopLag:
    """The lags measured so far: a cumulative histogram, their sum and the latest."""

    def __init__(self, interval_s: float = INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.counts = [0] * (len(BUCKETS) + 1)  # per bucket, the last one +Inf
        self.count = 0
        self.sum_s = 0.0
        self.last_s = 0.0
        self.max_s = 0.0

    def observe(self, lag_s: float) -> None:
        lag_s = max(0.0, lag_s)
        self.counts[bisect.bisect_left(BUCKETS, lag_s)] += 1
        self.count += 1
        self.sum_s += lag_s
        self.last_s = lag_s
        self.max_s = max(self.max_s, lag_s)

    def snapshot(self) -> dict[str, object]:
        """Cumulative bucket counts ({upper bound: count}, "+Inf" last), sum, count, last."""
        buckets: dict[str, int] = {}
        running = 0
        for bound, count in zip((*map(str, BUCKETS), "+Inf"), self.counts, strict=True):
            running += count
            buckets[bound] = running
        return {"buckets": buckets, "sum": self.sum_s, "count": self.count, "last": self.last_s}

    async def run(self) -> None:
        """Measure until cancelled."""
        slow = slow_steps_from_env()
        if slow is not None:
            trio.lowlevel.add_instrument(slow)
        while True:
            asked = trio.current_time() + self.interval_s
            await trio.sleep(self.interval_s)
            lag = trio.current_time() - asked
            self.observe(lag)
            if lag > LOG_ABOVE_S:
                log.info("the event loop ran %.2f s late", lag)


class SlowSteps(trio.abc.Instrument):
    """Logs every task step that held the loop longer than `threshold_s`, with the task's
    name and the CPU the loop's thread spent in it: what a lag was spent on, and whether on
    work or on waiting (for a core taken by other processes, for the GIL held by another
    thread, or blocked in a call). Costs two clock reads per step; for diagnosis
    (GRIDMESH_SLOW_STEPS=seconds in the daemon's environment turns it on)."""

    def __init__(self, threshold_s: float) -> None:
        self.threshold_s = threshold_s
        self._started = time.perf_counter()
        self._cpu_started = time.thread_time()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._started = time.perf_counter()
        self._cpu_started = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        took = time.perf_counter() - self._started
        if took > self.threshold_s:
            cpu = time.thread_time() - self._cpu_started
            log.info(
                "task %s held the event loop for %.3f s (%.3f s of CPU; the rest waiting)",
                task.name,
                took,
                cpu,
            )


def slow_steps_from_env() -> SlowSteps | None:
    raw = os.environ.get("GRIDMESH_SLOW_STEPS", "")
    try:
        threshold = float(raw)
    except ValueError:
        return None
    return SlowSteps(threshold) if threshold > 0 else None
