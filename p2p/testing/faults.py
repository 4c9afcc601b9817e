"""Faults the in-memory network's hub does not model on its own, for nemesis tests.

- `FaultyNetwork`: a `MemoryNetwork` whose links can also be cut in one direction only
  (`block(src, dst)`: src's messages to dst vanish, dst's to src still arrive) and slowed
  per direction (`slow(src, dst, extra_s)`). With nothing blocked or slowed it behaves exactly
  as `MemoryNetwork` (its symmetric `partition`, loss, latency and jitter are unchanged).
- `SkewedClock`: one node's monotonic clock, running at `rate` times real (virtual) time from
  an `offset`, as a node whose oscillator drifts and that booted at another moment would see
  it. Code under test reads it with `now()` and turns its own deadlines back into trio's time
  with `trio_time()` to sleep until them.
"""

from __future__ import annotations

import trio

from p2p.testing.hub import MemoryNetwork


class FaultyNetwork(MemoryNetwork):
    """`MemoryNetwork` plus one-way cuts and per-direction delays."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self._blocked: set[tuple[str, str]] = set()
        self._slow: dict[tuple[str, str], float] = {}

    def block(self, src: str, dst: str) -> None:
        """Messages from `src` to `dst` vanish (the other direction is untouched)."""
        self._blocked.add((src, dst))

    def slow(self, src: str, dst: str, extra_s: float) -> None:
        """Messages from `src` to `dst` take `extra_s` longer."""
        if extra_s < 0:
            raise ValueError("extra_s must be >= 0")
        self._slow[(src, dst)] = extra_s

    def clear_faults(self) -> None:
        """Remove every one-way cut and delay (not the symmetric partition: see `heal`)."""
        self._blocked.clear()
        self._slow.clear()

    def reachable(self, src: str, dst: str) -> bool:
        return (src, dst) not in self._blocked and super().reachable(src, dst)

    def _send(self, src: str, dst: str, size: int) -> float | None:
        delay = super()._send(src, dst, size)
        if delay is None or not self._slow:
            return delay
        return delay + self._slow.get((src, dst), 0.0)


class SkewedClock:
    """A node's monotonic clock: `offset + rate * trio.current_time()`."""

    def __init__(self, rate: float = 1.0, offset: float = 0.0) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.rate = rate
        self.offset = offset

    def now(self) -> float:
        return self.offset + self.rate * trio.current_time()

    def trio_time(self, local: float) -> float:
        """The trio time at which this clock shows `local` (or a hair later: never earlier,
        whatever the rounding)."""
        return (local - self.offset) / self.rate * (1 + 1e-12) + 1e-9
