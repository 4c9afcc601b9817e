"""Hybrid logical clocks: timestamps that follow wall time but never go backwards.

A timestamp is (wall_ms, counter). `now()` is for local writes; `observe()` folds in a remote
timestamp so that our next write orders after everything we have seen. Remote timestamps too
far in the future are refused: otherwise one peer with a bad clock could push every later
write of the network into its future.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

MAX_COUNTER = 0xFFFF_FFFF
DEFAULT_MAX_DRIFT_MS = 60_000


class ClockError(ValueError):
    pass


class Timestamp(NamedTuple):
    wall_ms: int
    counter: int

    def __str__(self) -> str:
        return f"{self.wall_ms}.{self.counter}"


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class HybridClock:
    def __init__(
        self,
        now_ms: Callable[[], int] = wall_clock_ms,
        max_drift_ms: int = DEFAULT_MAX_DRIFT_MS,
    ) -> None:
        self._now_ms = now_ms
        self._max_drift_ms = max_drift_ms
        self._last = Timestamp(0, 0)

    def now_ms(self) -> int:
        """Wall-clock milliseconds, without ticking the logical clock."""
        return self._now_ms()

    @property
    def last(self) -> Timestamp:
        return self._last

    def now(self) -> Timestamp:
        wall = self._now_ms()
        if wall > self._last.wall_ms:
            self._last = Timestamp(wall, 0)
        else:
            self._last = Timestamp(self._last.wall_ms, self._last.counter + 1)
        return self._last

    def check(self, remote: Timestamp) -> None:
        """Raise ClockError if `remote` is malformed or too far ahead of our wall clock."""
        if not (0 <= remote.wall_ms < 1 << 53 and 0 <= remote.counter <= MAX_COUNTER):
            raise ClockError(f"timestamp {remote} is out of range")
        ahead = remote.wall_ms - self._now_ms()
        if ahead > self._max_drift_ms:
            raise ClockError(f"timestamp is {ahead / 1000:.1f} s in the future")

    def observe(self, remote: Timestamp) -> None:
        self.check(remote)
        self.advance(remote)

    def advance(self, seen: Timestamp) -> None:
        """Order later writes after `seen` (already trusted, e.g. loaded from our own store)."""
        if seen > self._last:
            self._last = seen
