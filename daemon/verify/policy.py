"""Which steps to check and what a failed check costs a provider: the requester's view of each
provider (sans-IO: the caller passes the clock and the random source).

A provider is *new* until it has passed `graduate_after` checks: new providers start on
probation and are checked at `probation_rate`. A failed check puts the provider (back) on
probation, with its passes reset; `exclude_after` failed checks within `failure_window_s`
exclude it from this requester's routes for a back-off that doubles with each exclusion
(`backoff_s` .. `max_backoff_s`); it comes back on probation.

The decision to check a step is drawn when the step starts, from a random source the provider
cannot see, one independent draw per (step, hop); the replica's work runs on another server,
beside the step: nothing the provider receives differs between a checked and an unchecked
step, and past draws say nothing about the next one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import msgspec

# the routing tie-break: each rank down the reputation order adds this much to a server's
# round trip (2 us survives the router's rounding of half round trips to whole microseconds),
# so reputation decides only between routes whose latencies are equal to within microseconds
RANK_PENALTY_MS = 0.002
MAX_PROVIDERS = 100_000  # records kept; the oldest idle ones go first


class VerifyConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How much the requester checks (validated: it may come from a config file)."""

    rate: float = 0.02
    """Fraction of steps of an established provider re-executed on a replica."""
    probation_rate: float = 0.10
    """The same for a provider on probation (new, or after a failed check)."""
    canary_rate: float = 0.0
    """Chance, per hop and step, that a canary is sent to a provider on probation."""
    audit_history: bool = False
    """A check of a hop (not the last) also compares the provider's outputs at every earlier
    position of the generation, which the replica computes in the same pass (a cheat on an
    unchecked step is then caught at the next check; its token was used already)."""
    speculate: bool = True
    """A free generation goes on while a step's checks run and rolls back to the step if
    one fails (its tokens are let out only once the checks passed); off: every checked step
    waits for its checks. Paid generations always wait (their receipts are held per step).
    On by default: where the replicas are other machines (bench/verify.py's default since
    session 16) a waiting generation misses its route's batch at every check, and in eight
    paired runs at 2 % speculating cost the requester 1.3-6.2 points less wall in six (0.4
    and 1.8 more in two; 10 %: 4.4-15.2 less in all five). In one process on 2 cores, where
    a replica's pass takes the route's cores, it gained nothing (sessions 14-15)."""
    gather_s: float = 0.0
    """How long a speculating generation's check waits for others before they go to their
    replicas together, to share a pass there (`daemon.verify.gather`; 0, the default: at
    once). It pays where checks are frequent (25 %: a quarter of the replicas' passes and
    half their CPU). At 2 % on idle replicas, 1 s halves the replicas' passes (0.5 a check)
    and cuts their CPU by 22-28 % (session 15, two runs), but the whole overhead moved
    within the bench's noise (CPU 9.4-11.3 % against 7.0-14.0 % speculating without it,
    three runs); and it holds the step's tokens back that much longer."""
    graduate_after: int = 20
    """Passed checks that end probation."""
    exclude_after: int = 2
    """Failed checks within `failure_window_s` that exclude a provider."""
    failure_window_s: float = 3600.0
    backoff_s: float = 600.0
    max_backoff_s: float = 86_400.0

    def __post_init__(self) -> None:
        for name in ("rate", "probation_rate", "canary_rate"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"verify.{name} must be within 0..1, got {value}")
        if not 0.0 <= self.gather_s <= 10.0:
            raise ValueError(f"verify.gather_s must be within 0..10, got {self.gather_s}")
        if not 0 <= self.graduate_after <= 1_000_000:
            raise ValueError("verify.graduate_after must be within 0..1000000")
        if not 1 <= self.exclude_after <= 1000:
            raise ValueError("verify.exclude_after must be within 1..1000")
        for name in ("failure_window_s", "backoff_s", "max_backoff_s"):
            if not 0.0 <= getattr(self, name) <= 365 * 86_400:
                raise ValueError(f"verify.{name} must be within 0..1 year")
        if self.max_backoff_s < self.backoff_s:
            raise ValueError("verify.max_backoff_s must be at least verify.backoff_s")


@dataclass
class ProviderRecord:
    """What this requester knows of one provider."""

    passes: int = 0  # checks passed (since its last failure)
    total_passes: int = 0
    failures: list[float] = field(default_factory=list)  # when checks failed, in the window
    total_failures: int = 0
    exclusions: int = 0
    excluded_until: float = 0.0
    last_seen: float = 0.0

    def on_probation(self, config: VerifyConfig) -> bool:
        return self.passes < config.graduate_after

    def score(self) -> float:
        """Higher is better: passes count, failures weigh much more."""
        return self.total_passes - 50.0 * self.total_failures - 100.0 * self.exclusions


class Reputation:
    """Per-provider records of one requester, and the decisions drawn from them."""

    def __init__(self, config: VerifyConfig | None = None, rng: random.Random | None = None):
        self.config = config or VerifyConfig()
        self.rng = rng or random.SystemRandom()
        self.records: dict[str, ProviderRecord] = {}

    def record(self, peer: str, now: float) -> ProviderRecord:
        rec = self.records.get(peer)
        if rec is None:
            if len(self.records) >= MAX_PROVIDERS:
                oldest = min(self.records, key=lambda p: self.records[p].last_seen)
                del self.records[oldest]
            rec = self.records[peer] = ProviderRecord()
        rec.last_seen = now
        return rec

    def rate(self, peer: str, now: float) -> float:
        """The chance that one step of `peer` is checked."""
        rec = self.record(peer, now)
        return self.config.probation_rate if rec.on_probation(self.config) else self.config.rate

    def should_check(self, peer: str, now: float) -> bool:
        return self.rng.random() < self.rate(peer, now)

    def should_canary(self, peer: str, now: float) -> bool:
        rec = self.record(peer, now)
        return rec.on_probation(self.config) and self.rng.random() < self.config.canary_rate

    def passed(self, peer: str, now: float) -> None:
        rec = self.record(peer, now)
        rec.passes += 1
        rec.total_passes += 1

    def failed(self, peer: str, now: float) -> bool:
        """Record a failed check; True if it excludes the provider now."""
        rec = self.record(peer, now)
        rec.passes = 0  # back on probation
        rec.total_failures += 1
        window = self.config.failure_window_s
        rec.failures = [t for t in rec.failures if now - t < window] + [now]
        if len(rec.failures) < self.config.exclude_after:
            return False
        backoff = min(self.config.max_backoff_s, self.config.backoff_s * 2**rec.exclusions)
        rec.exclusions += 1
        rec.excluded_until = now + backoff
        rec.failures = []
        return True

    def excluded(self, peer: str, now: float) -> bool:
        rec = self.records.get(peer)
        return rec is not None and now < rec.excluded_until

    def state(self, peer: str, now: float) -> str:
        """ "excluded", "probation" or "good"."""
        if self.excluded(peer, now):
            return "excluded"
        return "probation" if self.record(peer, now).on_probation(self.config) else "good"

    def ranks(self, peers: list[str], now: float) -> dict[str, int]:
        """0 for the best reputation, then 1, ...; equal scores share a rank (unknown peers
        score 0, as new ones)."""
        scores = {p: self.records[p].score() if p in self.records else 0.0 for p in peers}
        order = sorted(set(scores.values()), reverse=True)
        return {p: order.index(s) for p, s in scores.items()}

    def to_json(self, now: float) -> dict[str, dict[str, object]]:
        return {
            peer: {
                "state": self.state(peer, now),
                "passes": rec.total_passes,
                "failures": rec.total_failures,
                "exclusions": rec.exclusions,
                "excluded_for_s": max(0.0, round(rec.excluded_until - now, 3)),
            }
            for peer, rec in self.records.items()
        }
