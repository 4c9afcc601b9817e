"""Spot checks by redundancy on the in-memory network: 3 honest providers of a range and one
that cheats in each mode; a step found wrong is recomputed on an honest route before its
token is used, so the tokens are those of the whole model; a replica that lies loses the
tie-break to the third one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.verify.cheat import MODES  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import HONEST_A, build, model, tokens, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chained", [True, False], ids=["chained", "relayed"])
async def test_every_cheat_is_caught_and_the_tokens_stay_exact(
    cluster, model_dir, reference, mode, chained
):
    prompt, expected = reference
    cheat = await build(cluster, model_dir, mode)
    v = verifier(rate=1.0, probation_rate=1.0)
    remote = model(cluster, v.generation(), chained=chained)
    assert await tokens(remote, prompt, 24) == expected
    # the cheater was on the route, failed the first step it was checked on, and was
    # routed around for the rest of the generation
    assert cheat.cheated >= 1
    assert remote.recoveries[0]["peer_id"] == "cheat"
    assert remote.recoveries[0]["reason"].startswith("failed a check")
    assert "cheat" in remote.failed
    failed = [d for d in v.verdicts if d.failed]
    assert failed and all(d.failed == ["cheat"] for d in failed)
    records = v.reputation.records
    assert all(records[p].total_failures == 0 for p in HONEST_A if p in records)
    assert any(p in records for p in HONEST_A)  # an honest replica did check


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_a_lying_replica_loses_the_tie_break(cluster, model_dir, reference, seed):
    prompt, expected = reference
    cheat = await build(cluster, model_dir, "corrupt")
    v = verifier(seed, rate=1.0, probation_rate=1.0)
    # a hop's checker is drawn once per generation (1 in 3 is the cheater): generations until
    # it was drawn (and lost) twice; the draws are seeded, but a replica slow to answer on a
    # loaded machine is passed over, which shifts them, so the bound is generous (a run that
    # needs more than 40 has odds of about 3e-6)
    for _ in range(40):
        if v.reputation.state("cheat", v.clock()) == "excluded":
            break
        remote = model(cluster, v.generation(), fast="a1")  # an honest route: a1, then b*
        assert await tokens(remote, prompt, 24) == expected
        assert remote.last_route[0]["peer_id"] == "a1" and not remote.recoveries
    # the cheater was drawn as a checker of a1's steps: the third replica sided with a1
    lost = [d for d in v.verdicts if d.failed == ["cheat"]]
    assert lost and all(d.peer == "a1" and d.outcome == "pass" for d in lost)
    assert cheat.cheated >= len(lost)  # (its catch-up passes cheat too, unseen)
    # two failed checks exclude it: it is drawn as a checker no more (a generation that
    # speculates may have several of a hop's checks on it at once: each lie counts)
    assert len(lost) >= v.config.exclude_after
    assert len(lost) == v.reputation.records["cheat"].total_failures
    assert v.reputation.state("cheat", v.clock()) == "excluded"
    assert v.reputation.records["a1"].total_failures == 0


async def test_a_fraction_of_steps_is_checked(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(seed=7, rate=0.25, probation_rate=0.25)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 24) == expected
    checks = v.counters["checks_pass"]
    # 25 steps x 2 hops at 25 %: 12.5 expected; all passed, none failed
    assert 3 <= checks <= 25 and not v.counters["checks_fail"]
    assert v.counters["compare_exact"] + v.counters["compare_close"] == checks


async def test_without_a_replica_no_verdict_is_drawn(cluster, model_dir, reference):
    prompt, expected = reference
    await cluster.add("a1", model_dir, 0, 3)
    await cluster.add("b1", model_dir, 3, 6)
    v = verifier(rate=1.0, probation_rate=1.0)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 6) == expected[:6]
    assert v.counters["checks_skipped"] == 14 and not v.verdicts and not remote.recoveries


async def test_auditing_earlier_positions_flags_no_honest_provider(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(seed=5, rate=0.5, probation_rate=0.5, audit_history=True)
    for _ in range(2):
        remote = model(cluster, v.generation(), fast="a1")
        assert await tokens(remote, prompt, 24) == expected
        assert not remote.recoveries
    assert v.counters["checks_pass"] > 20 and not v.counters["checks_fail"]
    # the canaries kept are the steps' own rows, not the audited history
    assert all(c.output.shape[1] == c.replay.x.shape[1] for c in v.canaries.get("tiny", 0, 3))
