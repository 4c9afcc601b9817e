"""What a failed check costs a provider at the requester: the receipt of the step found wrong
is never acknowledged (the others are, in order), and past the threshold the provider is
left out of this requester's routes until its back-off ends."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.verify.verifier import DeferredPayments  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import build, model, tokens, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)


class Paid:
    """A paid generation's receipt side as the shard client sees it (free sessions here)."""

    job_id = None

    def __init__(self, refuse: str | None = None) -> None:
        self.acknowledged: list[tuple[str, str]] = []
        self.refuse = refuse

    async def opened(self, peer_id, session_id, model_id, start, end):
        return None

    def check(self, peer_id, session_id, receipt, given, got):
        if peer_id == self.refuse:
            return "receipt refused: test"
        self.acknowledged.append((peer_id, session_id))
        return None


async def test_the_wrong_step_is_not_acknowledged(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, "corrupt")
    v = verifier(rate=1.0, probation_rate=1.0)
    paid = Paid()
    checks = v.generation(paid)
    assert isinstance(checks.payments, DeferredPayments)
    remote = model(cluster, checks, payments=checks.payments)
    assert await tokens(remote, prompt, 8) == expected[:8]
    checks.flush()
    # the cheater's only step (the prompt, checked and wrong) was withheld; every other
    # step of every hop was acknowledged, once: 9 steps (the prompt and 8 tokens), the
    # second hop's prompt step twice (it computed it on the cheater's output, then again)
    assert checks.payments.withheld == 1
    peers = [p for p, _ in paid.acknowledged]
    assert "cheat" not in peers
    assert sum(p.startswith("b") for p in peers) == 10
    assert sum(p.startswith("a") for p in peers) == 9


async def test_a_refused_receipt_still_fails_the_hop(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=0.0, probation_rate=0.0)
    paid = Paid(refuse="a1")
    checks = v.generation(paid)
    remote = model(cluster, checks, payments=checks.payments, fast="a1")
    assert await tokens(remote, prompt, 4) == expected[:4]
    assert remote.recoveries[0]["peer_id"] == "a1"
    assert "receipt refused" in remote.recoveries[0]["reason"]


async def test_an_excluded_cheater_is_left_out_of_routes_until_its_back_off_ends(
    cluster, model_dir, reference
):
    prompt, expected = reference
    await build(cluster, model_dir, "skip")
    now = [0.0]
    v = verifier(rate=1.0, probation_rate=1.0, exclude_after=2, backoff_s=600)
    v.clock = lambda: now[0]
    generations = 0
    # each generation catches it and routes around it (the steps it ran while a check was
    # judged are checked too: it may fail twice in one generation)
    while v.reputation.state("cheat", now[0]) != "excluded":
        generations += 1
        assert generations <= 2
        remote = model(cluster, v.generation())
        assert await tokens(remote, prompt, 4) == expected[:4]
        assert remote.recoveries[0]["peer_id"] == "cheat"
    failures = v.reputation.records["cheat"].total_failures
    assert failures >= 2
    remote = model(cluster, v.generation())
    assert await tokens(remote, prompt, 4) == expected[:4]
    assert not remote.recoveries and remote.last_route[0]["peer_id"] != "cheat"
    now[0] = 600.0  # back, on probation: routed (it is fastest) and caught again
    remote = model(cluster, v.generation())
    assert await tokens(remote, prompt, 4) == expected[:4]
    assert remote.recoveries[0]["peer_id"] == "cheat"
    assert v.reputation.records["cheat"].total_failures > failures
