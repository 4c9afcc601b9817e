"""Spot checks in a paid generation (the requester's real receipt checks and vouchers, fake
escrow): the cheater signed a receipt for the step found wrong, and no voucher ever
acknowledges it; every honest provider of the route is acknowledged all it signed."""

from __future__ import annotations

import time

import pytest

torch = pytest.importorskip("torch")

from contracts.eip712 import Signer  # noqa: E402
from daemon.payments.jobs import JobBook, PaidJob  # noqa: E402
from daemon.payments.provider import Provider  # noqa: E402
from daemon.payments.requester import Requester  # noqa: E402
from daemon.payments.store import STORE_FILE, PaymentStore  # noqa: E402
from daemon.verify.cheat import Cheat  # noqa: E402
from p2p.identity import NodeIdentity  # noqa: E402
from tests.daemon.payments.paid_fakes import DOMAIN, FakeEscrow, Ledger  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import model, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)
JOB = bytes([7] * 32)
PRICE = 2
RANGES = {"a1": (0, 3), "a2": (0, 3), "cheat": (0, 3), "b1": (3, 6), "b2": (3, 6)}


async def test_a_step_found_wrong_is_never_acknowledged(tmp_path, cluster, model_dir, reference):
    prompt, expected = reference
    payer = Signer(NodeIdentity.generate().payout_key)
    ledger = Ledger()
    ledger.deposit(JOB, payer, 10**9, PRICE, time.time() + 600)
    providers: dict[str, Provider] = {}
    for peer, (a, b) in RANGES.items():
        signer = Signer(NodeIdentity.generate().payout_key)
        providers[peer] = Provider(
            FakeEscrow(ledger, signer),
            signer,
            PaymentStore(tmp_path / f"{peer}-{STORE_FILE}"),
            price_per_unit=PRICE,
            settle_threshold=10**9,
        )
        await cluster.add(peer, model_dir, a, b, payments=providers[peer])
    cheat = Cheat(cluster.servers["cheat"], "corrupt").install()

    async def send(peer_id: str, payload: bytes) -> bytes:
        return await providers[peer_id].on_voucher("client", payload)

    async def payout_of(peer_id: str) -> bytes | None:
        return providers[peer_id].address

    book = JobBook(tmp_path / "jobs.db")
    book.add(PaidJob(JOB, PRICE, 10**9, int(time.time()) + 600, time.time()))
    requester = Requester(DOMAIN, payer, book, send=send, payout_of=payout_of)
    v = verifier(rate=1.0, probation_rate=1.0)
    v.payout_of = lambda peer: providers[peer].address.hex()
    paid = await requester.generation(JOB)
    checks = v.generation(paid)
    remote = model(cluster, checks, max_length=64, payments=checks.payments)
    async with paid.running():
        await remote.open()
        tokens = []
        async for token in memory_cluster.generate(remote, prompt, 6):
            tokens.append(token)
        await remote.close()
        checks.flush()
    assert tokens == expected[:6]
    assert remote.recoveries[0]["peer_id"] == "cheat" and cheat.cheated >= 1
    assert checks.payments.withheld == 1 and paid.refused == []
    # the cheater signed its (prompt) step's receipt; no voucher acknowledges it
    account = providers["cheat"].store.account(JOB, providers["cheat"].address)
    assert account is not None and account.signed > 0 and account.acknowledged == 0
    # the honest providers (route and replicas): all they signed is acknowledged
    acknowledged = 0
    for peer in RANGES:
        if peer == "cheat":
            continue
        account = providers[peer].store.account(JOB, providers[peer].address)
        if account is not None:
            assert account.acknowledged == account.signed, peer
            acknowledged += account.acknowledged
    assert acknowledged == paid.acknowledged > 0
