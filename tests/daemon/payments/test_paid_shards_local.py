"""Receipts over the local socket (p2p.localsock), as daemons on one host use it: two shard
servers chained over Unix sockets (the first pushes to the second over one too), paid: every
step's receipt reaches the client with the activations, passes its checks in route order and
is vouched to its provider; the tokens are those of free work."""

from __future__ import annotations

import time

import pytest
import trio

torch = pytest.importorskip("torch")

from contracts.eip712 import Signer  # noqa: E402
from daemon.payments.jobs import JobBook, PaidJob  # noqa: E402
from daemon.payments.provider import Provider  # noqa: E402
from daemon.payments.requester import Requester  # noqa: E402
from daemon.payments.store import STORE_FILE, PaymentStore  # noqa: E402
from daemon.shards import SHARD_PROTOCOL  # noqa: E402
from daemon.shards.client import RemoteModel  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from p2p import localsock  # noqa: E402
from p2p.identity import NodeIdentity  # noqa: E402
from scheduler.routing import Server  # noqa: E402
from tests.daemon.payments.paid_fakes import DOMAIN, FakeEscrow, Ledger  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.shards.memory_cluster import LAYERS, collect  # noqa: E402

model_dir, reference = memory_cluster.model_dir, memory_cluster.reference
JOB = bytes([5] * 32)
PRICE = 2

pytestmark = pytest.mark.skipif(localsock.HOST_ID is None, reason="no local sockets here")


class Dialer:
    def __init__(self, ident: NodeIdentity) -> None:
        self.ident = ident

    async def open_stream(self, peer_id: str, protocol: str):
        return await localsock.dial(self.ident, peer_id, protocol)


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "relayed"])
async def test_receipts_travel_over_the_local_socket(tmp_path, model_dir, reference, chained):
    prompt, expected = reference
    client_ident = NodeIdentity.generate()
    idents = [NodeIdentity.generate() for _ in range(2)]
    payer = Signer(client_ident.payout_key)
    ledger = Ledger()
    ledger.deposit(JOB, payer, 10**9, PRICE, time.time() + 600)
    providers, servers = {}, []
    for i, ident in enumerate(idents):
        signer = Signer(ident.payout_key)
        provider = Provider(
            FakeEscrow(ledger, signer),
            signer,
            PaymentStore(tmp_path / f"{i}-{STORE_FILE}"),
            price_per_unit=PRICE,
            settle_threshold=10**9,
        )
        providers[ident.peer_id] = provider
        server = ShardServer(opener=Dialer(ident), payments=provider)
        half = LAYERS // 2
        await server.load("tiny", model_dir, i * half, (i + 1) * half)
        servers.append(server)

    async def send(peer_id: str, payload: bytes) -> bytes:
        return await providers[peer_id].on_voucher(client_ident.peer_id, payload)

    async def payout_of(peer_id: str) -> bytes | None:
        return providers[peer_id].address

    book = JobBook(tmp_path / "jobs.db")
    book.add(PaidJob(JOB, PRICE, 10**9, int(time.time()) + 600, time.time()))
    requester = Requester(DOMAIN, payer, book, send=send, payout_of=payout_of)

    async def announced() -> list[Server]:
        half = LAYERS // 2
        return [
            Server(ident.peer_id, i * half, (i + 1) * half, ms_per_layer=1.0, rtt_ms=1.0)
            for i, ident in enumerate(idents)
        ]

    async with trio.open_nursery() as nursery:
        for ident, server in zip(idents, servers, strict=True):
            listener = localsock.Listener(ident, {SHARD_PROTOCOL: server.handle_stream})
            await nursery.start(listener.serve)
        paid = await requester.generation(JOB)
        model = RemoteModel(
            Dialer(client_ident),
            announced,
            model_id="tiny",
            num_layers=LAYERS,
            max_length=64,
            chained=chained,
            payments=paid,
        )
        async with paid.running():
            await model.open()
            assert await collect(model, prompt, 8) == expected[:8]
            assert model.chained == chained and not model.recoveries
            await model.close()
        nursery.cancel_scope.cancel()
    assert paid.refused == [] and paid.state.refusals == []
    steps = 1 + 8
    for provider in providers.values():
        account = provider.store.account(JOB, provider.address)
        assert account.receipts == steps
        owed = (LAYERS // 2) * (len(prompt) + 8) * PRICE
        assert account.signed == account.acknowledged == owed
    assert paid.acknowledged == 2 * owed
