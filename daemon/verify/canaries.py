"""Canaries: steps whose correct output the requester already holds.

Every check where two providers agreed leaves a step (a range's inputs up to a position, and
its output) that is known good; sent again to a provider as an ordinary session, a different
answer is a failed check with no replica needed. The store keeps the newest few per range,
within a byte budget.

What a provider can see: a session like any other, whose inputs it may have seen before (a
provider that remembers every input it served could spot repeats; real traffic repeats too,
e.g. shared system prompts, and canaries drawn from other requesters' ranges would hide
better, which needs canaries shared between requesters: not done).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from daemon.verify.replica import Replay


@dataclass(frozen=True)
class Canary:
    replay: Replay
    output: torch.Tensor

    @property
    def nbytes(self) -> int:
        tensors = [self.replay.x, self.output]
        if self.replay.prefix is not None:
            tensors.append(self.replay.prefix)
        return sum(t.numel() * t.element_size() for t in tensors)


class CanaryStore:
    """Known-good steps per (model, start, end), newest last, bounded in count and bytes."""

    def __init__(self, per_range: int = 16, max_bytes: int = 64 << 20) -> None:
        self.per_range = per_range
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._ranges: OrderedDict[tuple[str, int, int], list[Canary]] = OrderedDict()

    def add(self, canary: Canary) -> None:
        if canary.nbytes > self.max_bytes:
            return
        key = (canary.replay.model_id, canary.replay.start, canary.replay.end)
        kept = self._ranges.setdefault(key, [])
        self._ranges.move_to_end(key)
        kept.append(canary)
        self.nbytes += canary.nbytes
        while len(kept) > self.per_range:
            self.nbytes -= kept.pop(0).nbytes
        while self.nbytes > self.max_bytes:  # the least recently added range loses first
            oldest = next(iter(self._ranges))
            dropped = self._ranges[oldest]
            self.nbytes -= dropped.pop(0).nbytes
            if not dropped:
                del self._ranges[oldest]

    def get(self, model_id: str, start: int, end: int) -> list[Canary]:
        return list(self._ranges.get((model_id, start, end), ()))

    def __len__(self) -> int:
        return sum(len(v) for v in self._ranges.values())
