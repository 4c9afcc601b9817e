"""The money view and the feed's `money` event (the earnings plot's points) with a chain:
whole in-memory daemons whose escrow is the in-memory fake of tests/daemon/payments (with a
wallet: balance and stake), a paid generation settled; the provider's dashboard shows its
receipts, the voucher it holds, what was settled, its balance and stake; the requester's
shows the paid job."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import trio

from contracts.eip712 import Signer
from daemon.payments.escrow import StakeInfo
from tests.daemon.dashboard.http_client import events, feed, login, make_server, request
from tests.daemon.harness import inline_threads
from tests.daemon.payments.paid_fakes import FakeEscrow, Ledger

STAKE = 500
GAS = 10**18


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


class WalletEscrow(FakeEscrow):
    """The fake escrow with what `wallet` and `earnings` read of an account."""

    network, chain_id = "devnet", 31337
    escrow = SimpleNamespace(address="0x" + "ab" * 20)
    token = SimpleNamespace(address="0x" + "cd" * 20)

    async def token_balance(self) -> int:
        return self.ledger.balances.get(self.address, 0)

    async def gas_balance(self) -> int:
        return GAS

    async def stake_info(self) -> StakeInfo:
        return StakeInfo(True, "", STAKE, 0, 0, True, False, 100)


async def test_receipts_vouchers_settlements_balance_and_stake(autojump_clock, tmp_path, nursery):
    pytest.importorskip("torch")
    from daemon.shards.model import make_tiny
    from tests.daemon.payments.test_paid_shards import (
        GENERATE,
        JOB,
        PROMPT,
        PaidCluster,
        create_job,
        deploy,
        settled,
    )

    class WalletCluster(PaidCluster):
        def escrow(self, home: Path, config: Any, ident: Any) -> FakeEscrow | None:
            return WalletEscrow(self.ledger, Signer(ident.payout_key))

    model_dir = make_tiny(tmp_path / "tiny", layers=4, seed=7)
    async with trio.open_nursery() as daemons:
        net = WalletCluster(tmp_path / "net", daemons, Ledger())
        requester = await net.add_priced(0)
        provider = await net.add_priced(3)
        await net.wait_for(net.all_found, 60, "both daemons to find each other")
        await deploy(net, model_dir, [(provider, 0, 4)])
        create_job(net, requester)
        result = await requester.call("generate", {**GENERATE, "job_id": JOB.hex()})
        await settled(net, [provider])
        owed = 4 * (len(PROMPT) + len(result["tokens"])) * 3  # layers x tokens x price

        server = make_server(provider.daemon, [])
        cookie = await login(provider, server, nursery)
        money = (await request(nursery, server, "/dashboard/api/money", cookie=cookie)).json()
        (row,) = money["earnings"]["jobs"]  # what app.js's earnings table reads
        assert row["job_id"] == "0x" + JOB.hex() and row["receipts"] >= 1
        assert row["signed"] == row["acknowledged"] == row["settled"] == owed
        assert row["pending"] == 0 and row["nonce"] >= 1  # the voucher that paid it
        wallet = money["wallet"]
        assert wallet["balance"] > 0 and wallet["gas_balance"] == GAS
        assert wallet["stake"]["stake"] == STAKE and wallet["stake"]["active"] is True
        assert money["earnings"]["balance"] == wallet["balance"]
        # the earnings plot's points: the payment store's history, ending at the totals
        history = money["earnings"]["history"]
        assert history and history[-1]["signed"] == history[-1]["settled"] == owed
        assert history[-1]["pending"] == 0

        # the feed's first `money` event: one point of the earnings plot, with the totals
        client, conn, reply = await feed(nursery, server, cookie)
        await events(client, conn, reply, 4)
        point = dict(reply.events)["money"]
        assert point["settled"] == point["acknowledged"] == point["signed"] == owed
        assert point["pending"] == 0 and point["jobs"] == 1 and point["stake"] == STAKE
        assert point["balance"] == wallet["balance"] and point["chain_error"] is None
        await client.aclose()
        again = (await request(nursery, server, "/dashboard/api/money", cookie=cookie)).json()
        assert again["history"] == [point]  # a page opened later plots it too

        # the requester's view: the paid job it created, with its deposit
        asked = make_server(requester.daemon, [])
        cookie = await login(requester, asked, nursery)
        mine = (await request(nursery, asked, "/dashboard/api/money", cookie=cookie)).json()
        (job,) = mine["jobs"]
        assert job["job_id"] == "0x" + JOB.hex() and job["deposit"] > 0
        jobs = (await request(nursery, asked, "/dashboard/api/jobs", cookie=cookie)).json()
        assert jobs["paid_jobs"] == mine["jobs"] and jobs["generations"][0]["paid"] is True
        daemons.cancel_scope.cancel()
