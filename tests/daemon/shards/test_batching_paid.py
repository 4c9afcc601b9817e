"""Paid sessions in a batch (whole daemons, tests/daemon/payments/test_paid_shards.py's
fake escrow): each of 4 concurrent paid generations gets every step's receipt of its own
rows, so each pays each provider exactly what it signed, and the tokens are free work's."""

from __future__ import annotations

import pytest
import trio

from tests.daemon.payments.test_paid_shards import (
    GENERATE,
    NEW_TOKENS,
    PROMPT,
    address,
    cluster,
    create_job,
    deploy,
    settled,
    tiny,
)

JOBS = [bytes([0x21 + i] * 32) for i in range(4)]
COMPUTE_S = 0.002
tiny = tiny  # the fixture, taken by name


@pytest.fixture(autouse=True)
def _slow_inline(monkeypatch):
    """`trio.to_thread` inline, each call `COMPUTE_S` of virtual time (so that steps of
    concurrent generations overlap, as real compute makes them)."""

    async def run_sync(fn, *args, **_):
        await trio.sleep(COMPUTE_S)
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)


@pytest.mark.parametrize("relay", [False, True], ids=["chained", "relayed"])
async def test_paid_generations_batched_together_each_pay_what_they_signed(
    autojump_clock, tmp_path, tiny, relay
):
    model_dir, expected = tiny
    prices = [3, 5]
    async with trio.open_nursery() as nursery:
        net = await cluster(nursery, tmp_path, prices)
        requester, *servers = net.daemons
        await deploy(net, model_dir, [(servers[0], 0, 3), (servers[1], 3, 6)])
        for job in JOBS:
            create_job(net, requester, job)
        results: dict[bytes, dict] = {}

        async def paid(job: bytes) -> None:
            params = {**GENERATE, "job_id": job.hex(), "relay": relay, "client": job.hex()[:8]}
            results[job] = await requester.call("generate", params)

        async with trio.open_nursery() as generations:
            for job in JOBS:
                generations.start_soon(paid, job)
        shard_servers = [d.daemon.shards.server for d in servers]
        # batched: through chains of 2 hops, as 2 micro-batches of 2 (pipelining)
        assert all(max(s.batching.batch_sizes) == len(JOBS) // 2 for s in shard_servers)
        await settled(net, servers)
        tokens = len(PROMPT) + NEW_TOKENS
        for job, result in results.items():
            assert result["tokens"] == expected
            payment = result["payment"]
            assert payment["receipts_refused"] == [] and payment["vouchers_refused"] == []
            total = 0
            for server, price in zip(servers, prices, strict=True):
                account = server.daemon.paid.store.account(job, address(server))
                owed = 3 * tokens * price  # 3 layers per server
                assert account.receipts == 1 + NEW_TOKENS
                assert account.signed == account.acknowledged == account.settled == owed
                total += owed
            assert payment["acknowledged"] == total
        nursery.cancel_scope.cancel()
