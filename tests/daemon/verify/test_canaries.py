"""Canaries: steps verified earlier, sent again as ordinary sessions to providers on
probation; a wrong answer is a failed check without any replica."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.verify.canaries import Canary, CanaryStore  # noqa: E402
from daemon.verify.cheat import Cheat  # noqa: E402
from daemon.verify.replica import Replay  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import build, model, tokens, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)


async def test_a_canary_catches_a_cheater_that_no_replica_checks(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    # an honest generation whose checks leave verified steps behind
    assert await tokens(model(cluster, v.generation(), fast="a1"), prompt, 8) == expected[:8]
    assert len(v.canaries.get("tiny", 0, 3)) > 0
    cheat = Cheat(await cluster.add("cheat", model_dir, 0, 3), "noise").install()
    # now no replica re-runs anything: canaries only, to providers on probation (all here)
    v.config = v.reputation.config = type(v.config)(rate=0.0, probation_rate=0.0, canary_rate=1.0)
    remote = model(cluster, v.generation())  # through the cheater
    assert await tokens(remote, prompt, 24) == expected
    assert remote.recoveries[0]["peer_id"] == "cheat"
    assert [d.outcome for d in v.verdicts if d.failed] == ["canary-fail"]
    assert v.counters["checks_canary-fail"] == 1 and v.counters["canaries_sent"] >= 2
    assert cheat.cheated >= 1
    assert v.reputation.records["cheat"].total_failures == 1
    # honest providers answered their canaries right
    honest = [d for d in v.verdicts if d.outcome == "pass" and d.peer != "cheat"]
    assert honest and all(not d.failed for d in honest)


def _canary(start: int, values: int, n: int = 4) -> Canary:
    x = torch.zeros(1, 1, n)
    return Canary(Replay("m", start, start + 1, 8, None, x, False), torch.full((1, 1, n), values))


def test_the_store_keeps_the_newest_per_range_within_its_bytes():
    store = CanaryStore(per_range=2, max_bytes=3 * _canary(0, 0).nbytes)
    for i in range(3):
        store.add(_canary(0, i))
    assert [int(c.output[0, 0, 0]) for c in store.get("m", 0, 1)] == [1, 2]
    store.add(_canary(1, 9))
    store.add(_canary(2, 9))  # over the budget: the oldest range's oldest goes
    assert len(store) == 3 and store.nbytes <= store.max_bytes
    assert [int(c.output[0, 0, 0]) for c in store.get("m", 0, 1)] == [2]
    store.add(_canary(3, 9, n=10_000))  # larger than the whole budget: not kept
    assert store.get("m", 3, 4) == []


async def test_a_canary_asks_what_an_ordinary_client_asks(cluster, model_dir, reference):
    """A canary to a provider of a range that is not the last asks for every row, as an
    ordinary generation's client does there (a check's replica asks for one row alone: a
    request no ordinary client sends that range, which would tell a canary apart)."""
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    assert await tokens(model(cluster, v.generation(), fast="a1"), prompt, 8) == expected[:8]
    asked: list[bool] = []
    honest = cluster.servers["a2"].forward

    async def forward(session, position, x, last_only):
        asked.append(last_only)
        return await honest(session, position, x, last_only)

    cluster.servers["a2"].forward = forward
    v.config = v.reputation.config = type(v.config)(rate=0.0, probation_rate=0.0, canary_rate=1.0)
    remote = model(cluster, v.generation(), fast="a2")  # range A on a2, then range B
    assert await tokens(remote, prompt, 6) == expected[:6]
    assert v.counters["canaries_sent"] >= 2 and not v.counters["checks_canary-fail"]
    assert asked and not any(asked)  # (the route's own steps there ask for every row too)
