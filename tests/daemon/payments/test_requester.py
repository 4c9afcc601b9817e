"""The requester's side of paid work (daemon.payments.requester): receipts checked against
the bytes sent and received, acknowledged, vouchers sent to the provider that stores them;
refused receipts acknowledge nothing; a restart continues nonces from the job book."""

from __future__ import annotations

import time

import pytest
import trio

from contracts.eip712 import (
    Receipt,
    SignedReceipt,
    Signer,
    decode_signed_receipt,
    encode_signed_receipt,
)
from daemon.payments.jobs import JobBook, PaidJob
from daemon.payments.provider import Provider
from daemon.payments.requester import PaymentError, Requester
from daemon.payments.store import STORE_FILE, PaymentStore
from tests.daemon.harness import inline_threads
from tests.daemon.payments.paid_fakes import DOMAIN, FakeEscrow, Ledger

PAYER = Signer(bytes([1] * 32))
PROVIDER = Signer(bytes([2] * 32))
OTHER = Signer(bytes([3] * 32))
JOB = bytes([7] * 32)
PRICE = 5


class Net:
    """Voucher requests from the requester to providers, in memory."""

    def __init__(self) -> None:
        self.providers: dict[str, Provider] = {}
        self.sent = 0

    async def send(self, peer_id: str, payload: bytes) -> bytes:
        self.sent += 1
        return await self.providers[peer_id].on_voucher("requester", payload)

    async def payout_of(self, peer_id: str) -> bytes | None:
        provider = self.providers.get(peer_id)
        return provider.address if provider else None


def setup(tmp_path, *, deposit: int = 1000, max_price: int = 10):
    ledger = Ledger()
    ledger.deposit(JOB, PAYER, deposit, max_price, time.time() + 3600)
    book = JobBook(tmp_path / "jobs.db")
    book.add(PaidJob(JOB, max_price, deposit, int(time.time()) + 3600, time.time()))
    net = Net()
    provider = Provider(
        FakeEscrow(ledger, PROVIDER),
        PROVIDER,
        PaymentStore(tmp_path / STORE_FILE),
        price_per_unit=PRICE,
        settle_threshold=10**9,
    )
    net.providers["peerA"] = provider
    requester = Requester(DOMAIN, PAYER, book, send=net.send, payout_of=net.payout_of)
    return ledger, book, net, provider, requester


async def provider_session(provider: Provider, session: str = "s1"):
    return await provider.admit(JOB, session_id=session, model_id="tiny", start=0, end=2)


async def test_only_jobs_in_the_book_are_paid_work(tmp_path):
    *_, requester = setup(tmp_path)
    with pytest.raises(PaymentError) as err:
        await requester.generation(bytes(32))
    assert err.value.code == "unknown_job"


async def test_receipts_are_acknowledged_and_vouched_to_the_provider(tmp_path):
    ledger, book, net, provider, requester = setup(tmp_path)
    paid = await requester.generation(JOB)
    async with paid.running():
        session = await provider_session(provider)
        assert await paid.opened("peerA", "s1", "tiny", 0, 2) is None
        for i in range(3):
            given, got = bytes([i]) * 8, bytes([i + 1]) * 8
            receipt = await provider.sign(session, given, got, tokens=2)
            assert paid.check("peerA", "s1", receipt, given, got) is None
            await trio.testing.wait_all_tasks_blocked()
    assert paid.acknowledged == 3 * 2 * 2 * PRICE  # 3 steps x 2 layers x 2 tokens x 5
    account = provider.store.account(JOB, PROVIDER.address)
    assert account.acknowledged == account.signed == 60
    assert book.acknowledged(JOB)[provider.state()["address"]].cumulative == 60
    assert 1 <= net.sent <= 3 and account.voucher.voucher.nonce == net.sent


async def test_bad_receipts_are_refused_and_never_acknowledged(tmp_path):
    ledger, book, net, provider, requester = setup(tmp_path, max_price=PRICE)
    paid = await requester.generation(JOB)
    session = await provider_session(provider)
    assert await paid.opened("peerA", "s1", "tiny", 0, 2) is None
    given, got = b"in" * 4, b"out" * 4

    def resigned(raw: bytes, signer: Signer = PROVIDER, **changes) -> bytes:
        r = decode_signed_receipt(raw).receipt
        fields = {f: getattr(r, f) for f in Receipt.__struct_fields__}
        receipt = Receipt(**{**fields, **changes})
        return encode_signed_receipt(SignedReceipt(receipt, signer.sign(DOMAIN, receipt)))

    good = await provider.sign(session, given, got, tokens=1)
    forged = decode_signed_receipt(good)
    bad_sig = encode_signed_receipt(
        SignedReceipt(forged.receipt, OTHER.sign(DOMAIN, forged.receipt))
    )
    cases = {
        "bad_signature": bad_sig,
        "broken_chain": resigned(good, prev_receipt=bytes([1] * 32)),
        "price_over_max": resigned(good, price_per_unit=PRICE + 1),
        "output_mismatch": resigned(good, output_hash=bytes(32)),
        "input_mismatch": resigned(good, input_hash=bytes(32)),
        "wrong_work": resigned(good, layer_end=3),
        "malformed": b"\x93garbage",
    }
    for reason, raw in cases.items():
        why = paid.check("peerA", "s1", raw, given, got)
        assert why is not None and reason in why, (reason, why)
    assert "without a receipt" in paid.check("peerA", "s1", None, given, got)
    assert "not opened as paid" in paid.check("peerA", "other", good, given, got)
    assert paid.acknowledged == 0 and paid.state.acknowledger.acknowledged(PROVIDER.address) == 0
    assert len(paid.refused) == 9
    assert paid.check("peerA", "s1", good, given, got) is None  # the real one still goes
    assert paid.acknowledged == 2 * PRICE


async def test_a_peer_without_a_payout_address_cannot_be_paid(tmp_path):
    *_, requester = setup(tmp_path)
    paid = await requester.generation(JOB)
    assert "payout" in await paid.opened("stranger", "s1", "tiny", 0, 2)


async def test_a_restarted_requester_continues_the_nonces(tmp_path):
    ledger, book, net, provider, requester = setup(tmp_path)
    paid = await requester.generation(JOB)
    session = await provider_session(provider)
    async with paid.running():
        assert await paid.opened("peerA", "s1", "tiny", 0, 2) is None
        receipt = await provider.sign(session, b"a", b"b", tokens=1)
        assert paid.check("peerA", "s1", receipt, b"a", b"b") is None
    assert provider.store.account(JOB, PROVIDER.address).voucher.voucher.nonce == 1
    # a new requester (the node restarted) on the same job book
    again = Requester(DOMAIN, PAYER, book, send=net.send, payout_of=net.payout_of)
    paid = await again.generation(JOB)
    assert paid.state.budget.accepted == 10
    session = await provider_session(provider, "s2")
    async with paid.running():
        assert await paid.opened("peerA", "s2", "tiny", 0, 2) is None
        receipt = await provider.sign(session, b"c", b"d", tokens=1)
        assert paid.check("peerA", "s2", receipt, b"c", b"d") is None
    voucher = provider.store.account(JOB, PROVIDER.address).voucher.voucher
    assert (voucher.nonce, voucher.cumulative_amount) == (2, 20)  # taken: not a stale nonce
    assert paid.state.refusals == []


async def test_two_outputs_signed_for_one_step_are_reported(tmp_path):
    ledger, book, net, provider, _ = setup(tmp_path)
    reports = []

    async def report(proof):
        reports.append(proof)

    requester = Requester(
        DOMAIN, PAYER, book, send=net.send, payout_of=net.payout_of, report=report
    )
    paid = await requester.generation(JOB)
    session = await provider_session(provider)
    async with paid.running():
        assert await paid.opened("peerA", "s1", "tiny", 0, 2) is None
        first = await provider.sign(session, b"a", b"b", tokens=1)
        assert paid.check("peerA", "s1", first, b"a", b"b") is None
        # the same step again, with another output, signed by the provider
        r = decode_signed_receipt(first).receipt
        fields = {f: getattr(r, f) for f in Receipt.__struct_fields__}
        other = Receipt(**{**fields, "output_hash": bytes([9] * 32)})
        twice = encode_signed_receipt(SignedReceipt(other, PROVIDER.sign(DOMAIN, other)))
        why = paid.check("peerA", "s1", twice, b"a", b"b")
        assert why is not None and "step_replayed" in why and "equivocation" in why
    assert len(reports) == 1 and requester.reported == reports
    proof = reports[0]
    assert proof.provider == PROVIDER.address
    assert {proof.a.receipt.output_hash, proof.b.receipt.output_hash} == {
        r.output_hash,
        bytes([9] * 32),
    }


async def test_a_voucher_in_flight_when_the_generation_ends_is_waited_for(
    autojump_clock, tmp_path, monkeypatch
):
    """The generation ends while its provider's last voucher is on its way: leaving
    `running()` waits for that send instead of cancelling it."""
    inline_threads(monkeypatch)  # sqlite in a thread would let the virtual clock jump
    ledger, book, net, provider, requester = setup(tmp_path)
    send = net.send

    async def slow_send(peer_id: str, payload: bytes) -> bytes:
        await trio.sleep(1)  # virtual time: the network's latency
        return await send(peer_id, payload)

    requester._send = slow_send  # noqa: SLF001 - the network the requester was given
    paid = await requester.generation(JOB)
    session = await provider_session(provider)
    async with paid.running():
        assert await paid.opened("peerA", "s1", "tiny", 0, 2) is None
        for i in range(2):
            receipt = await provider.sign(session, bytes([i]), bytes([i + 1]), tokens=1)
            assert paid.check("peerA", "s1", receipt, bytes([i]), bytes([i + 1])) is None
            # the first voucher is delivered; the second is in flight when the generation ends
            await trio.sleep(2 if i == 0 else 0.5)  # virtual time (autojump clock)
    account = provider.store.account(JOB, PROVIDER.address)
    assert account.acknowledged == account.signed == 20
    assert account.voucher.voucher.nonce == 2 and net.sent == 2
