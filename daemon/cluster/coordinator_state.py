"""The coordinator's decisions that need no network: where a deployment falls short of its
copies (healing, scaling up), which servers can go without falling short (scaling down),
and when the load the servers announce asks for one copy more or one fewer (scaling).

Coverage is counted per layer over the live members' announced ranges: routing finds a path
through any contiguous ranges (scheduler.routing), so copies need not be whole chains.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Annotated

from msgspec import Meta


@dataclass(frozen=True)
class Served:
    """A range a member serves (announced) or was assigned (pending its announcement)."""

    peer_id: str
    start: int
    end: int
    ms_per_layer: float | None = None
    queue_length: int | None = None
    utilisation: float | None = None
    pending: bool = False


def coverage(num_layers: int, served: Iterable[Served]) -> list[int]:
    """How many ranges hold each layer."""
    counts = [0] * num_layers
    for s in served:
        for layer in range(max(s.start, 0), min(s.end, num_layers)):
            counts[layer] += 1
    return counts


def shortfalls(num_layers: int, served: Iterable[Served], target: int) -> list[tuple[int, int]]:
    """The maximal runs of layers [start, end) held fewer than `target` times."""
    counts = coverage(num_layers, served)
    runs: list[tuple[int, int]] = []
    start = None
    for layer, count in enumerate([*counts, target]):
        if count < target and start is None:
            start = layer
        elif count >= target and start is not None:
            runs.append((start, layer))
            start = None
    return runs


def surplus(
    num_layers: int, served: Sequence[Served], target: int, worst_first: Sequence[str]
) -> list[Served]:
    """Servers that can go while every layer stays held `target` times, taken greedily in
    the order of `worst_first` (peer ids; the others after them). Pending ranges stay."""
    rank = {peer: i for i, peer in enumerate(worst_first)}
    kept = list(served)
    gone: list[Served] = []
    for s in sorted(
        (s for s in served if not s.pending),
        key=lambda s: (rank.get(s.peer_id, len(rank)), s.peer_id, s.start, s.end),
    ):
        rest = [k for k in kept if k is not s]
        counts = coverage(num_layers, rest)
        if all(counts[layer] >= target for layer in range(max(s.start, 0), min(s.end, num_layers))):
            kept = rest
            gone.append(s)
    return gone


@dataclass(frozen=True)
class CoordinatorSettings:
    """How the coordinator acts (`[cluster]` keys)."""

    reconcile_interval_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 2.0
    assign_timeout_s: Annotated[float, Meta(gt=0.0, le=3600.0)] = 120.0
    failed_cooldown_s: Annotated[float, Meta(ge=0.0, le=86400.0)] = 300.0
    forward_timeout_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 30.0
    # a new coordinator waits this long for the members' tables (a frozen one holds it up)
    adopt_timeout_s: Annotated[float, Meta(gt=0.0, le=600.0)] = 2.0


@dataclass(frozen=True)
class ScalingSettings:
    """When the load servers announce moves a deployment's copies (`[cluster]` keys)."""

    # busy: mean utilisation at least this, or mean queue length at least `up_queue`
    up_utilisation: Annotated[float, Meta(gt=0.0, le=1.0)] = 0.75
    up_queue: Annotated[float, Meta(gt=0.0, le=1e6)] = 2.0
    # idle: mean utilisation at most this and nothing queued
    down_utilisation: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.1
    # for this long before a copy is added or removed (and after each change)
    up_after_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 30.0
    down_after_s: Annotated[float, Meta(gt=0.0, le=86400.0)] = 120.0


@dataclass(frozen=True)
class Load:
    utilisation: float
    queue: float
    servers: int

    def describe(self) -> str:
        return (
            f"mean utilisation {self.utilisation:.2f}, mean queue {self.queue:.1f} "
            f"over {self.servers} server(s)"
        )


def load_of(served: Iterable[Served]) -> Load | None:
    """The mean load the (announced, not pending) servers report; None if none reports."""
    reports = [s for s in served if not s.pending and s.utilisation is not None]
    if not reports:
        return None
    util = sum(s.utilisation or 0.0 for s in reports) / len(reports)
    queue = sum(s.queue_length or 0 for s in reports) / len(reports)
    return Load(util, queue, len(reports))


class Scaler:
    """One deployment's scaling: a copy more after `up_after_s` of load above the threshold,
    one fewer after `down_after_s` idle; never outside [minimum, maximum]. `observe` returns
    the new target and the reason, or None to keep it."""

    def __init__(self, settings: ScalingSettings | None = None) -> None:
        self.settings = settings or ScalingSettings()
        self._busy_since: float | None = None
        self._idle_since: float | None = None

    def observe(
        self, now: float, load: Load | None, target: int, minimum: int, maximum: int
    ) -> tuple[int, str] | None:
        if target < minimum:
            return minimum, f"below the minimum of {minimum} instance(s)"
        if target > maximum:
            return maximum, f"above the maximum of {maximum} instance(s)"
        s = self.settings
        if load is None:
            self._busy_since = self._idle_since = None
            return None
        busy = load.utilisation >= s.up_utilisation or load.queue >= s.up_queue
        idle = load.utilisation <= s.down_utilisation and load.queue == 0
        if not busy:
            self._busy_since = None
        elif self._busy_since is None:
            self._busy_since = now
        if not idle:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = now
        busy_s = 0.0 if self._busy_since is None else now - self._busy_since
        idle_s = 0.0 if self._idle_since is None else now - self._idle_since
        if busy and target < maximum and busy_s >= s.up_after_s:
            self._busy_since = None
            return target + 1, (
                f"busy for {busy_s:g} s ({load.describe()}; thresholds: utilisation "
                f"{s.up_utilisation:g} or queue {s.up_queue:g})"
            )
        if idle and target > minimum and idle_s >= s.down_after_s:
            self._idle_since = None
            return target - 1, (
                f"idle for {idle_s:g} s ({load.describe()}; threshold: utilisation "
                f"{s.down_utilisation:g}, nothing queued)"
            )
        return None
