"""A paid generation through whole daemons settled on a real dev chain: the contracts deployed
on an in-process eth-tester chain served over HTTP (tests/daemon/payments/escrow_env.py), each
daemon's Escrow transacting with its own payout key, on the real clock (the chain client waits
on its worker thread, which trio's virtual clock would jump over).

A requester and three shard servers (split 2+2+2, chained): exactly the unpaid tokens; every
provider stores its receipts and a voucher whose cumulative amount is what they add up to, and
is paid exactly that minus the 1 % fee in tUSD; the job's `paid` on chain is their sum."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import trio

from contracts.chain.client import ChainClient
from contracts.eip712 import Receipt, SignedReceipt
from contracts.receipts import find_equivocation
from daemon.node import IN_PROCESS, Daemon
from daemon.payments.escrow import Escrow
from daemon.payments.job_spec import JobSpec
from daemon.payments.jobs import create_job
from tests.daemon.harness import FAST, MemoryCluster, RunningDaemon, memory_addr
from tests.daemon.payments.escrow_env import FEE_BPS, MIN_STAKE, Env, deployed_chain
from tests.daemon.payments.test_paid_shards import GENERATE, LAYERS, NEW_TOKENS, PROMPT, tiny

__all__ = ["tiny"]  # the module's fixture, shared

PRICES = [3, 5, 7]
GAS_WEI = 10**18


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with deployed_chain(accounts=3) as running:
        yield running


class ChainCluster(MemoryCluster):
    """Whole daemons, each with an Escrow on the dev chain for its own payout key."""

    def __init__(self, root: Path, nursery: trio.Nursery, env: Env) -> None:
        super().__init__(root, nursery)
        self.env = env

    def escrow(self, home: Path, config, ident) -> Escrow:
        client = self.env.stack.enter_context(
            ChainClient(self.env.chain.url, "0x" + ident.payout_key.hex())
        )
        return Escrow(client, self.env.record.as_json())

    async def _launch(self, home: Path, bootstrap: list[str]) -> RunningDaemon:
        home.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 - before the daemon runs
        parts = replace(IN_PROCESS, detect_resources=self.detect_resources, escrow=self.escrow)
        daemon = Daemon(home, self.config(bootstrap), network=self._network, parts=parts)
        self._launched += 1
        running = RunningDaemon(daemon, self.hub.node(daemon.ident.peer_id), "")
        running.addr = memory_addr(self._launched, daemon.ident.peer_id)
        await self.nursery.start(self._run, running)
        return running


async def fund(env: Env, daemon: RunningDaemon, tusd: int) -> None:
    """Gas from a dev account, and tUSD from the faucet, for a daemon's payout address."""
    address = daemon.daemon.escrow.address
    await env.escrow(0).send_gas(address, GAS_WEI)
    await daemon.daemon.escrow.mint(tusd)


async def test_a_paid_generation_settles_exactly_on_the_dev_chain(tmp_path, tiny, env):
    model_dir, expected = tiny
    async with trio.open_nursery() as nursery:
        net = ChainCluster(tmp_path, nursery, env)
        for price in [0, *PRICES]:
            net.settings = {**FAST, "market": {"price_per_unit": price, "settle_threshold": 10**9}}
            bootstrap = [net.daemons[-1].addr] if net.daemons else []
            await net.add(tmp_path / f"node{len(net.daemons)}", bootstrap)
        await net.wait_for(net.all_found, 60, "all daemons to find each other", poll_s=0.2)
        requester, *servers = net.daemons
        for server in servers:  # providers: registered and staked with their payout keys
            await fund(env, server, MIN_STAKE)
            escrow = server.daemon.escrow
            await escrow.register(server.peer_id)
            await escrow.stake(MIN_STAKE)
            assert await escrow.is_active()
        deposit = 10**7
        await fund(env, requester, deposit)
        book = requester.daemon.paid.book
        spec = JobSpec(name="paid", deposit=deposit, max_price_per_unit=10, deadline_s=3600)
        job = await create_job(book, requester.daemon.escrow, spec)
        rows = [
            {"peer_id": d.peer_id, "start": 2 * i, "end": 2 * i + 2} for i, d in enumerate(servers)
        ]
        result = await requester.call(
            "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": rows}
        )
        assert all(r["ok"] for r in result["results"]), result

        async def announced() -> bool:
            listed = await requester.call("block_list", {"model": "tiny"})
            return len(listed["announced"].get("tiny", [])) == 3

        await net.wait_for(announced, 30, "every shard announced", poll_s=0.2)
        before = {s.peer_id: await s.daemon.escrow.token_balance() for s in servers}
        fee_recipient = await env.escrow(0).token_balance(env.fee_recipient)
        result = await requester.call("generate", {**GENERATE, "job_id": job.job_id.hex()})
        assert result["tokens"] == expected
        assert [h["peer_id"] for h in result["route"]] == [d.peer_id for d in servers]

        async def settled() -> bool:
            return all(not s.daemon.paid.store.unsettled() for s in servers)

        await net.wait_for(settled, 60, "every provider to settle", poll_s=0.2)
        tokens = len(PROMPT) + NEW_TOKENS
        total = fees = 0
        for server, price in zip(servers, PRICES, strict=True):
            owed = (LAYERS // 3) * tokens * price
            account = server.daemon.paid.store.account(
                job.job_id, server.daemon.paid.provider.address
            )
            assert account.signed == account.acknowledged == account.settled == owed
            fee = owed * FEE_BPS // 10_000
            paid = await server.daemon.escrow.token_balance() - before[server.peer_id]
            assert paid == owed - fee, (server.peer_id, paid, owed, fee)
            assert await server.daemon.escrow.paid(job.job_id, server.daemon.escrow.address) == owed
            total, fees = total + owed, fees + fee
        on_chain = await requester.daemon.escrow.job(job.job_id)
        assert on_chain.paid == total == result["payment"]["acknowledged"]
        assert await env.escrow(0).token_balance(env.fee_recipient) - fee_recipient == fees
        # the job book recorded every provider's acknowledged amount
        acked = book.acknowledged(job.job_id)
        assert sorted(a.cumulative for a in acked.values()) == sorted(
            (LAYERS // 3) * tokens * p for p in PRICES
        )
        # a provider that signs a second output for a step it receipted is slashed through the
        # requester's report (what a replayed step with another output triggers)
        cheat = servers[0]
        domain = cheat.daemon.escrow.domain
        signed = cheat.daemon.paid.store.receipts(job.job_id)[0]
        fields = {f: getattr(signed.receipt, f) for f in Receipt.__struct_fields__}
        other = Receipt(**{**fields, "output_hash": bytes([7] * 32)})
        twice = SignedReceipt(other, cheat.daemon.paid.provider.signer.sign(domain, other))
        proof = find_equivocation(domain, signed, twice)
        assert proof is not None
        await requester.daemon.paid.requester._report(proof)  # noqa: SLF001 - the wiring's
        assert (await cheat.daemon.escrow.stake_info()).slashed
        nursery.cancel_scope.cancel()
