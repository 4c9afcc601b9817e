"""The requester's view of providers (sans-IO): probation, exclusion with back-off, the
routing tie-break by reputation, and the expected steps to detection."""

from __future__ import annotations

import random

import pytest

from daemon.verify import detection
from daemon.verify.policy import RANK_PENALTY_MS, Reputation, VerifyConfig
from daemon.verify.verifier import Verifier
from scheduler.routing import Server, find_route


def test_new_providers_start_on_probation_and_graduate():
    rep = Reputation(VerifyConfig(rate=0.02, probation_rate=0.1, graduate_after=3))
    assert rep.state("p", 0) == "probation" and rep.rate("p", 0) == 0.1
    for _ in range(3):
        rep.passed("p", 0)
    assert rep.state("p", 0) == "good" and rep.rate("p", 0) == 0.02


def test_failures_put_on_probation_then_exclude_with_doubling_back_off():
    cfg = VerifyConfig(graduate_after=1, exclude_after=2, failure_window_s=100, backoff_s=10)
    rep = Reputation(cfg)
    rep.passed("p", 0)
    assert rep.state("p", 0) == "good"
    assert rep.failed("p", 1) is False and rep.state("p", 1) == "probation"
    assert rep.failed("p", 200) is False  # the first failure left the window
    assert rep.failed("p", 201) is True and rep.state("p", 202) == "excluded"
    assert rep.excluded("p", 210.9) and not rep.excluded("p", 211)
    assert rep.state("p", 211) == "probation"  # back, on probation
    rep.failed("p", 212)
    assert rep.failed("p", 213) is True and rep.excluded("p", 232.9)  # 20 s the second time
    assert not rep.excluded("p", 233)
    assert rep.to_json(233)["p"]["exclusions"] == 2


def test_the_back_off_is_capped():
    rep = Reputation(VerifyConfig(exclude_after=1, backoff_s=10, max_backoff_s=25))
    for t in (0, 100, 200):
        rep.failed("p", t)
    assert rep.excluded("p", 224.9) and not rep.excluded("p", 225)


@pytest.mark.parametrize(
    "bad",
    [
        {"rate": 1.5},
        {"probation_rate": -0.1},
        {"exclude_after": 0},
        {"backoff_s": -1},
        {"backoff_s": 10, "max_backoff_s": 5},
    ],
)
def test_config_is_validated(bad):
    with pytest.raises(ValueError):
        VerifyConfig(**bad)


def test_checks_are_drawn_at_the_rate():
    rep = Reputation(VerifyConfig(rate=0.02, graduate_after=0), rng=random.Random(5))
    drawn = sum(rep.should_check("p", 0) for _ in range(100_000))
    assert 1800 <= drawn <= 2200


def test_routing_prefers_the_better_reputation_at_equal_latency():
    now = [0.0]
    v = Verifier(VerifyConfig(), clock=lambda: now[0])
    servers = [Server(p, 0, 4, ms_per_layer=1.0, rtt_ms=1.0) for p in ("a", "b", "c")]
    assert find_route(v.routable(servers), 4)[0].peer_id == "a"  # all equal: by peer id
    v.reputation.passed("c", 0)
    v.reputation.failed("a", 0)
    assert find_route(v.routable(servers), 4)[0].peer_id == "c"
    # a lower latency still wins over reputation
    faster = [*servers[:2], Server("c", 0, 4, ms_per_layer=1.0, rtt_ms=1.0 + 0.01)]
    assert find_route(v.routable(faster), 4)[0].peer_id == "b"
    assert RANK_PENALTY_MS < 0.01
    # an excluded provider is not routed at all
    v.reputation.failed("a", 1)
    assert {s.peer_id for s in v.routable(servers)} == {"b", "c"}
    now[0] = 1e6  # its back-off is over
    assert {s.peer_id for s in v.routable(servers)} == {"a", "b", "c"}


def test_the_verifier_reports_its_state():
    v = Verifier(VerifyConfig(rate=0.05), clock=lambda: 5.0)
    v.reputation.passed("a", 0)
    v.reputation.failed("b", 0)
    v.counters["checks_pass"] += 1
    state = v.to_json()
    assert state["config"]["rate"] == 0.05 and state["counters"] == {"checks_pass": 1}
    assert state["providers"]["a"]["state"] == "probation"
    assert state["providers"]["b"]["failures"] == 1 and state["canaries"] == 0


def test_expected_steps_to_detection():
    assert detection.expected_steps(0.02, 1.0) == pytest.approx(50)
    assert detection.expected_steps(0.02, 0.1) == pytest.approx(500)
    assert detection.expected_steps(0.0, 1.0) == float("inf")
    # graduating takes g checks at the probation rate before the flat rate applies
    e = detection.expected_steps_with_probation(0.02, 0.1, 0, 1.0)
    assert e == pytest.approx(50)
    assert detection.expected_steps_with_probation(0.02, 0.1, 5, 1.0) == pytest.approx(10)
    # q = 0.5, g = 1: 1/0.1 + 0.5 * 1/(0.02*0.5) = 10 + 50
    assert detection.expected_steps_with_probation(0.02, 0.1, 1, 0.5) == pytest.approx(60)
    assert detection.detection_probability(0.02, 1.0, 50) == pytest.approx(1 - 0.98**50)
    # auditing earlier positions: the first cheat (2 steps at q = 0.5), then a check
    assert detection.expected_steps_audited(0.02, 0.5) == pytest.approx(51)
    assert detection.expected_steps_audited(0.02, 1.0) == pytest.approx(50)
