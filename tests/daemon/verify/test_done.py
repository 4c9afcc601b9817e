"""Issue 20's "Done means" on the in-memory network (CPU, float32): at a 2 % check rate every
cheating mode is caught and its provider excluded; the steps until detection, measured over
seeded runs, match `daemon.verify.detection`; honest providers are never flagged across
10,000 checked steps."""

from __future__ import annotations

import math
import statistics

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.shards.client import generate  # noqa: E402
from daemon.verify import detection  # noqa: E402
from daemon.verify.cheat import MODES, Cheat  # noqa: E402
from daemon.verify.compare import tolerance  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import (  # noqa: E402
    HONEST_A,
    HONEST_B,
    build,
    close,
    model,
    verifier,
)

cluster, model_dir = memory_cluster.cluster, memory_cluster.model_dir
FRACTION = {"corrupt": 0.5}  # the other modes cheat on every step
FLAT_2 = {"rate": 0.02, "probation_rate": 0.02}


async def until_caught(remote, prompt: list[int], max_new: int) -> bool:
    """Generate until the first failover (True) or `max_new` tokens (False)."""
    await remote.open()
    try:
        async for _ in generate(remote, prompt, max_new):
            if remote.recoveries:
                return True
        return bool(remote.recoveries)
    finally:
        await close(remote)


@pytest.mark.parametrize("mode", MODES)
async def test_every_mode_is_caught_and_excluded_at_a_2_percent_rate(cluster, model_dir, mode):
    cheat = await build(cluster, model_dir, mode, fraction=FRACTION.get(mode, 1.0), seed=11)
    v = verifier(seed=11, **FLAT_2)
    for generation in range(40):
        if v.reputation.state("cheat", v.clock()) == "excluded":
            break
        remote = model(cluster, v.generation(), max_length=512)
        await until_caught(remote, [1 + generation, 2, 3], 400)
    assert v.reputation.state("cheat", v.clock()) == "excluded", v.counters
    assert v.reputation.records["cheat"].total_failures == v.config.exclude_after
    assert all(d.failed in ([], ["cheat"]) for d in v.verdicts)
    for peer in HONEST_A + HONEST_B:
        assert peer not in v.reputation.records or not v.reputation.records[peer].total_failures
    # excluded: the next route avoids it although it is the fastest
    remote = model(cluster, v.generation())
    await remote.open()
    assert remote.route[0]["peer_id"] != "cheat"
    await close(remote)
    assert cheat.cheated > 0


async def steps_to_detection(cluster, mode: str, seeds: range, **config) -> list[int]:
    """Per seed, the cheater's steps on the route up to and including the one caught."""
    measured = []
    for seed in seeds:
        cheat = Cheat(cluster.servers["cheat"], mode, fraction=FRACTION.get(mode, 1.0), seed=seed)
        cheat.install()
        v = verifier(seed=seed, **config)
        remote = model(cluster, v.generation(), max_length=512)
        assert await until_caught(remote, [seed % 250 + 1, 7], 500), seed
        measured.append(cheat.steps_through(remote.recoveries))
        cluster.servers["cheat"].forward = cheat.honest
    return measured


@pytest.mark.parametrize(
    ("mode", "config"),
    [
        ("skip", FLAT_2),
        ("corrupt", {"rate": 0.02, "probation_rate": 0.10, "graduate_after": 20}),
        ("corrupt", {**FLAT_2, "audit_history": True}),
    ],
    ids=["skip-flat-2%", "corrupt-half-default-probation", "corrupt-half-flat-2%-audited"],
)
async def test_steps_to_detection_match_the_expectation(cluster, model_dir, mode, config):
    await build(cluster, model_dir, None)
    await cluster.add("cheat", model_dir, 0, 3)
    measured = await steps_to_detection(cluster, mode, range(40), **config)
    q = FRACTION.get(mode, 1.0)
    expected = detection.expected_steps_with_probation(
        config["rate"], config["probation_rate"], config.get("graduate_after", 20), q
    )
    if config.get("audit_history"):  # a check also catches the earlier cheats
        expected = detection.expected_steps_audited(config["rate"], q)
    elif config["rate"] == config["probation_rate"]:
        assert expected == pytest.approx(detection.expected_steps(config["rate"], q))
    # the mean of 40 runs, within 4 standard errors (the draws are seeded: this is fixed).
    # The standard deviation is the sample's, or at least the distribution's where it is
    # known: a geometric one with a mean of 50 has 49.5, and 40 seeded draws (these seeds
    # gave a sample mean of 26) can show half that
    sd = statistics.pstdev(measured)
    r, rq = config["rate"], config["rate"] * q
    if config.get("audit_history"):  # a geometric wait for a cheat, then one for a check
        sd = max(sd, math.sqrt((1 - q) / q**2 + (1 - r) / r**2))
    elif config["rate"] == config["probation_rate"]:
        sd = max(sd, math.sqrt(1 - rq) / rq)
    mean = statistics.fmean(measured)
    if config.get("audit_history"):  # far sooner than checking the step alone (1/(r q))
        assert mean < 0.75 * detection.expected_steps(config["rate"], q), mean
    assert abs(mean - expected) <= 4 * max(sd, 1.0) / math.sqrt(len(measured)), (
        mean,
        expected,
        measured,
    )


async def test_honest_providers_are_never_flagged_across_10000_checked_steps(cluster, model_dir):
    await build(cluster, model_dir, None)
    v = verifier(seed=3, rate=1.0, probation_rate=1.0)

    async def one(i: int) -> None:  # concurrent generations: the servers batch their steps
        remote = model(cluster, v.generation(), max_length=64, fast="")
        await remote.open()
        async for _ in generate(remote, [i % 250 + 1, 5, 7, 9], 24):
            pass
        await close(remote)
        assert not remote.recoveries

    while v.counters["checks_pass"] < 10_000:
        async with trio.open_nursery() as nursery:
            for i in range(32):
                nursery.start_soon(one, i)
    assert v.counters["checks_pass"] >= 10_000
    assert not v.counters["checks_fail"] and not v.counters["checks_unresolved"]
    assert all(not d.failed for d in v.verdicts)
    # checks that catch up several positions in one pass (or share a batch) differ in the
    # last bits, those of one position alone are exact; both far within the bound
    assert v.counters["compare_close"] > 0 and v.counters["compare_exact"] > 0
    assert 0 < v.spread_max < tolerance(torch.float32) / 10
