"""The metrics of settlements (fed by a real Provider against a fake escrow), of registry
replication (fed by whole daemons' replicators on the in-memory network) and of
generations, with their bounded labels."""

from __future__ import annotations

import pytest

from contracts.chain.errors import ChainError
from daemon.metrics import MAX_KIND_SERIES, Metrics
from tests.daemon.harness import inline_threads, memory_cluster
from tests.daemon.payments.paid_fakes import FakeEscrow
from tests.daemon.payments.test_provider import (
    JOB,
    ME,
    PAYER,
    admit,
    funded,
    make,
    offer,
    run_steps,
    signed_voucher,
)


def value(metrics: Metrics, name: str, **labels: str) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


async def test_settlements_are_counted_with_their_amounts(autojump_clock, tmp_path):
    ledger = funded()
    provider = make(tmp_path, ledger)
    metrics = Metrics()
    provider.on_settle = metrics.settlement
    paid = await admit(provider)
    await run_steps(provider, paid, 3)
    await offer(provider, signed_voucher(20, 1))
    assert await provider.settle(JOB)
    assert value(metrics, "gridmesh_settlements_total", outcome="settled") == 1
    assert value(metrics, "gridmesh_settled_amount_total") == 20
    # the chain down for good: a failure, nothing settled
    await offer(provider, signed_voucher(25, 2))
    ledger.fail_next = [ChainError("down")] * 3
    assert not await provider.settle(JOB)
    assert value(metrics, "gridmesh_settlements_total", outcome="failed") == 1
    assert value(metrics, "gridmesh_settled_amount_total") == 20
    # someone settled our voucher first: counted as already settled, with what it added
    await offer(provider, signed_voucher(30, 3))
    await FakeEscrow(ledger, PAYER).settle(signed_voucher(30, 3))
    assert await provider.settle(JOB)
    assert value(metrics, "gridmesh_settlements_total", outcome="already") == 1
    assert value(metrics, "gridmesh_settled_amount_total") == 30
    assert ledger.paid[(JOB, ME.address)] == 30


def test_labels_are_bounded():
    metrics = Metrics()
    for i in range(MAX_KIND_SERIES + 5):
        metrics.registry_replicated("gossip", "applied", f"Kind {i}!", 2)
    metrics.registry_replicated("carrier pigeon", "eaten", "blocks", 1)
    text = metrics.render().decode()
    kinds = {
        line.split('kind="')[1].split('"')[0]
        for line in text.splitlines()
        if line.startswith("gridmesh_registry_entries_total{")
    }
    assert len(kinds) == MAX_KIND_SERIES + 1 and "other" in kinds and "kind_0" in kinds
    entries = "gridmesh_registry_entries_total"
    assert value(metrics, entries, via="gossip", stage="applied", kind="other") == 10
    assert value(metrics, entries, via="other", stage="other", kind="other") == 1  # at the cap
    metrics.generation_ended("done", 2)
    metrics.generation_ended("exploded", 0)
    metrics.settlement("weird", -5)
    assert value(metrics, "gridmesh_generations_total", outcome="other") == 1
    assert value(metrics, "gridmesh_generation_failovers_total") == 2
    assert value(metrics, "gridmesh_settlements_total", outcome="other") == 1
    assert value(metrics, "gridmesh_settled_amount_total") == 0


async def test_replication_is_counted_per_kind_and_way(autojump_clock, tmp_path, monkeypatch):
    """A write on one daemon arrives at the other by gossip (received, applied); a daemon
    that joins later gets it by anti-entropy (pulled or pushed); rounds are counted, no failures."""
    inline_threads(monkeypatch)
    value_ = {"name": "llama", "version": "1"}
    async with memory_cluster(tmp_path, 2) as net:
        a, b = net.daemons
        await a.call("registry_put", {"kind": "components", "key": "llama", "value": value_})

        async def gossiped() -> bool:
            labels = {"via": "gossip", "stage": "applied", "kind": "components"}
            return b.metric("gridmesh_registry_entries_total", **labels) >= 1

        await net.wait_for(gossiped, 10, "the write to arrive by gossip")
        assert (
            b.metric(
                "gridmesh_registry_entries_total", via="gossip", stage="received", kind="components"
            )
            >= 1
        )
        late = await net.add(tmp_path / "late", [a.addr])

        async def synced() -> float:  # it pulls it, or a peer pushes it in a round
            return sum(
                late.metric(
                    "gridmesh_registry_entries_total", via=via, stage="applied", kind="components"
                )
                for via in ("sync_pull", "sync_push")
            )

        await net.wait_for(synced, 30, "the late daemon to get the write by anti-entropy")
        assert late.metric("gridmesh_registry_entries_total", via="gossip") == 0
        rounds = [d.metric("gridmesh_registry_sync_rounds_total") for d in (a, b, late)]
        assert sum(rounds) >= 1, rounds
        assert a.metric("gridmesh_registry_sync_failures_total") == 0
        events = a.metric("gridmesh_registry_replication_events_total", event="gossip_sent")
        assert events >= 1


def test_the_replication_collector_reads_the_stats_at_scrape_time():
    name = "gridmesh_registry_sync_rounds_total"
    metrics = Metrics()
    stats = {"sync_rounds": 3, "sync_failed": 1, "gossip_refused": 4}
    metrics.watch_replication(lambda: stats)
    assert value(metrics, name) == 3
    stats["sync_rounds"] = 5
    assert value(metrics, name) == 5
    assert value(metrics, "gridmesh_registry_sync_failures_total") == 1
    assert value(metrics, "gridmesh_registry_replication_events_total", event="gossip_refused") == 4


async def test_a_paid_generation_is_settled_in_the_metrics(autojump_clock, tmp_path, monkeypatch):
    """Whole daemons with an in-memory escrow (tests/daemon/payments/test_paid_shards.py's
    cluster): the provider's settlement is counted with its amount by the daemon's wiring,
    and the requester's record marks the generation paid."""
    pytest.importorskip("torch")
    import trio

    from daemon.shards.model import make_tiny
    from tests.daemon.payments.test_paid_shards import (
        GENERATE,
        JOB,
        PROMPT,
        cluster,
        create_job,
        deploy,
        settled,
    )

    inline_threads(monkeypatch)
    model_dir = make_tiny(tmp_path / "tiny", layers=4, seed=7)
    async with trio.open_nursery() as nursery:
        net = await cluster(nursery, tmp_path / "net", [3])
        requester, server = net.daemons
        await deploy(net, model_dir, [(server, 0, 4)])
        create_job(net, requester)
        result = await requester.call("generate", {**GENERATE, "job_id": JOB.hex()})
        await settled(net, [server])
        owed = 4 * (len(PROMPT) + len(result["tokens"])) * 3  # layers x tokens x price
        assert server.metric("gridmesh_settlements_total", outcome="settled") >= 1
        assert server.metric("gridmesh_settlements_total", outcome="failed") == 0
        assert server.metric("gridmesh_settled_amount_total") == owed
        (gen,) = (await requester.call("generation_list"))["generations"]
        assert gen["paid"] is True and gen["state"] == "done"
        nursery.cancel_scope.cancel()
