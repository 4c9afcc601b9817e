"""Expected steps until a cheating provider fails a check.

A provider that cheats on a fraction `q` of its steps (every cheat visible to a comparison)
is checked on each step with probability `r`, independently: a step is caught with
probability r*q, so the steps until the first catch are geometric, mean 1 / (r q).

With probation (`daemon.verify.policy`): a new provider is checked at `r_p` until it has
passed `g` checks, then at `r`. Let E_k be the expected steps to detection after k passes.
Checks come every 1/r_p steps on average; each catches with probability q, else it is a
pass: E_k = 1/r_p + (1 - q) E_{k+1} for k < g, and E_g = 1 / (r q).
"""

from __future__ import annotations


def expected_steps(rate: float, cheat_fraction: float) -> float:
    """Mean steps to the first failed check at a flat check rate."""
    if rate <= 0 or cheat_fraction <= 0:
        return float("inf")
    return 1.0 / (rate * cheat_fraction)


def expected_steps_with_probation(
    rate: float, probation_rate: float, graduate_after: int, cheat_fraction: float, passes: int = 0
) -> float:
    """Mean steps to the first failed check of a provider that has passed `passes` checks."""
    if cheat_fraction <= 0:
        return float("inf")
    expected = expected_steps(rate, cheat_fraction)
    for _ in range(max(0, graduate_after - passes)):
        if probation_rate <= 0:
            return float("inf")
        expected = 1.0 / probation_rate + (1.0 - cheat_fraction) * expected
    return expected


def detection_probability(rate: float, cheat_fraction: float, steps: int) -> float:
    """The chance that a flat-rate cheater is caught within `steps` steps."""
    return 1.0 - (1.0 - rate * cheat_fraction) ** steps


def expected_steps_audited(rate: float, cheat_fraction: float) -> float:
    """The same with `audit_history` (a hop that is not the last): a check catches any cheat
    at or before it. The first cheat comes after 1/q steps on average, and from that step
    on each step is checked with probability r: 1/q + 1/r - 1."""
    if rate <= 0 or cheat_fraction <= 0:
        return float("inf")
    return 1.0 / cheat_fraction + 1.0 / rate - 1.0
