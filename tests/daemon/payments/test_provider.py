"""The provider's side of paid work (daemon.payments.provider) against a fake escrow: paid
session admission, receipts stored and verifiable, the voucher handler's checks, settlement
at the threshold, at session end and at start, bounded retries."""

from __future__ import annotations

import time

import pytest
import trio

from contracts.chain.errors import ChainError
from contracts.eip712 import SignedVoucher, Signer, Voucher, decode_signed_receipt
from contracts.receipts import Acknowledger, JobTerms, ReceiptVerifier, activation_hash
from daemon import settings
from daemon.payments import wire
from daemon.payments.provider import PaymentRefused, Provider
from daemon.payments.store import STORE_FILE, PaymentStore
from tests.daemon.payments.paid_fakes import DOMAIN, DownEscrow, FakeEscrow, Ledger, revert

PAYER = Signer(bytes([1] * 32))
ME = Signer(bytes([2] * 32))
JOB = bytes([7] * 32)
PRICE = 5


def make(tmp_path, ledger: Ledger, *, threshold: int = 10**9, escrow=None) -> Provider:
    store = PaymentStore(tmp_path / STORE_FILE)
    return Provider(
        escrow or FakeEscrow(ledger, ME),
        ME,
        store,
        price_per_unit=PRICE,
        settle_threshold=threshold,
    )


def funded(deposit: int = 10_000, max_price: int = 10, deadline_s: float = 3600) -> Ledger:
    ledger = Ledger()
    ledger.deposit(JOB, PAYER, deposit, max_price, time.time() + deadline_s)
    return ledger


async def admit(provider: Provider, job: bytes = JOB, session: str = "s1"):
    return await provider.admit(job, session_id=session, model_id="tiny", start=0, end=2)


async def run_steps(provider, paid, steps: int, session: str = "s1"):
    """Sign `steps` one-token steps; verify and acknowledge them as a requester would."""
    verifier = ReceiptVerifier(
        DOMAIN,
        JobTerms(JOB, 10_000, 10),
        provider=ME.address,
        session_id=session,
        model_id="tiny",
        layers=(0, 2),
    )
    accepted = []
    for i in range(steps):
        received, sent = bytes([i]) * 8, bytes([i + 1]) * 16
        raw = await provider.sign(paid, received, sent, tokens=1)
        accepted.append(
            verifier.check(
                decode_signed_receipt(raw),
                input_hash=activation_hash(received),
                output_hash=activation_hash(sent),
            )
        )
    return accepted


def test_settle_threshold_is_a_market_setting():
    assert settings.Config().market.settle_threshold == 1_000_000
    assert settings.parse({"market": {"settle_threshold": 0}}).market.settle_threshold == 0
    with pytest.raises(settings.ConfigError):
        settings.parse({"market": {"settle_threshold": -1}})


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"job": bytes(32)}, "unknown_job"),
        ({"refunded": True}, "job_refunded"),
        ({"deadline_s": -1}, "job_expired"),
        ({"spent": True}, "job_spent"),
        ({"max_price": PRICE - 1}, "price_over_max"),
    ],
)
async def test_a_paid_session_needs_a_live_funded_job_at_our_price(tmp_path, change, code):
    from dataclasses import replace

    ledger = funded(max_price=change.get("max_price", 10), deadline_s=change.get("deadline_s", 60))
    if change.get("refunded"):
        ledger.jobs[JOB] = replace(ledger.jobs[JOB], refunded=True)
    if change.get("spent"):
        ledger.jobs[JOB] = replace(ledger.jobs[JOB], paid=ledger.jobs[JOB].deposit)
    provider = make(tmp_path, ledger)
    with pytest.raises(PaymentRefused) as err:
        await admit(provider, change.get("job", JOB))
    assert err.value.code == code, err.value


async def test_a_paid_session_runs_only_for_the_jobs_payer(tmp_path):
    """Whoever learnt a job id cannot have providers work for it: the session's opener (its
    authenticated peer) must be the payer's, by its signed payout address."""
    payouts = {"payer-peer": PAYER.address, "mallory": ME.address}

    async def payout_of(peer_id: str) -> bytes | None:
        return payouts.get(peer_id)

    provider = Provider(
        FakeEscrow(funded(), ME),
        ME,
        PaymentStore(tmp_path / STORE_FILE),
        price_per_unit=PRICE,
        settle_threshold=10**9,
        payout_of=payout_of,
    )
    for opener, code in (("mallory", "not_payer"), ("stranger", "payer_unknown")):
        with pytest.raises(PaymentRefused) as err:
            await provider.admit(JOB, "s1", "tiny", 0, 2, opener=opener)
        assert err.value.code == code
    paid = await provider.admit(JOB, "s1", "tiny", 0, 2, opener="payer-peer")
    assert paid.job_id == JOB


async def test_no_chain_no_paid_session(tmp_path):
    provider = make(tmp_path, Ledger(), escrow=DownEscrow(Ledger(), ME))
    with pytest.raises(PaymentRefused) as err:
        await admit(provider)
    assert err.value.code == "chain_unavailable"


async def test_receipts_are_signed_stored_and_verify(tmp_path):
    provider = make(tmp_path, funded())
    paid = await admit(provider)
    accepted = await run_steps(provider, paid, 3)
    assert [a.amount for a in accepted] == [2 * PRICE] * 3  # 2 layers x 1 token x 5
    stored = provider.store.receipts(JOB)
    assert [s.receipt.step for s in stored] == [0, 1, 2]
    assert [DOMAIN.digest(s.receipt) for s in stored] == [a.digest for a in accepted]
    assert provider.store.account(JOB, ME.address).signed == 30


def signed_voucher(amount: int, nonce: int, *, job=JOB, payer=PAYER, provider=ME) -> SignedVoucher:
    v = Voucher(
        job_id=job,
        provider=provider.address,
        cumulative_amount=amount,
        receipts_root=bytes(32),
        nonce=nonce,
    )
    return SignedVoucher(v, payer.sign(DOMAIN, v))


async def offer(provider: Provider, signed: SignedVoucher):
    return wire.decode(await provider.on_voucher("requester", wire.offer(signed)))


async def test_vouchers_are_checked_stored_and_only_then_answered(tmp_path):
    provider = make(tmp_path, funded())
    paid = await admit(provider)
    accepted = await run_steps(provider, paid, 3)
    ack = Acknowledger(DOMAIN, JOB, PAYER)
    for a in accepted[:2]:
        ack.acknowledge(a)
    good = ack.voucher(ME.address)
    assert await offer(provider, good) == wire.Stored(cumulative="20", nonce=1)
    assert provider.store.account(JOB, ME.address).voucher == good  # durably, before the answer

    async def refused(signed: SignedVoucher) -> str:
        reply = await offer(provider, signed)
        assert isinstance(reply, wire.Refused), reply
        return reply.code

    assert await refused(signed_voucher(31, 2)) == "over_signed"  # receipts add up to 30
    assert await refused(good) == "stale_voucher"  # the same nonce again
    assert await refused(signed_voucher(25, 1)) == "stale_voucher"
    assert await refused(signed_voucher(10, 5)) == "stale_voucher"  # the amount went down
    assert await refused(signed_voucher(30, 2, payer=ME)) == "bad_signature"  # not the payer
    assert await refused(signed_voucher(30, 2, job=bytes(32))) == "unknown_job"  # another job
    assert await refused(signed_voucher(30, 2, provider=PAYER)) == "wrong_provider"
    # a voucher whose signature is over another job's voucher
    other = signed_voucher(30, 2, job=bytes([9] * 32))
    forged = SignedVoucher(signed_voucher(30, 2).voucher, other.signature)
    assert await refused(forged) == "bad_signature"
    reply = wire.decode(await provider.on_voucher("x", b"\x81\xa2op\xa6stored"))
    assert isinstance(reply, wire.Refused) and reply.code == "bad_message"
    assert provider.store.account(JOB, ME.address).voucher == good  # none of them replaced it
    assert await offer(provider, signed_voucher(30, 2)) == wire.Stored(cumulative="30", nonce=2)


async def test_settles_at_the_threshold_and_at_session_end(tmp_path):
    ledger = funded()
    provider = make(tmp_path, ledger, threshold=20)
    async with trio.open_nursery() as nursery:
        await nursery.start(provider.run)
        paid = await admit(provider)
        await run_steps(provider, paid, 3)
        await offer(provider, signed_voucher(10, 1))
        await trio.testing.wait_all_tasks_blocked()
        assert ledger.settlements == []  # under the threshold
        await offer(provider, signed_voucher(20, 2))
        await trio.testing.wait_all_tasks_blocked()
        assert [s.voucher.nonce for s in ledger.settlements] == [2]
        await offer(provider, signed_voucher(30, 3))
        await trio.testing.wait_all_tasks_blocked()
        assert len(ledger.settlements) == 1  # 10 unsettled: under the threshold
        provider.ended(paid)  # the job's last session here
        await trio.testing.wait_all_tasks_blocked()
        assert [s.voucher.nonce for s in ledger.settlements] == [2, 3]
        nursery.cancel_scope.cancel()
    key = (JOB, ME.address)
    assert ledger.paid[key] == 30 and ledger.fees == 0  # 1 % of 20, then of 10: rounded down
    account = provider.store.account(JOB, ME.address)
    assert (account.settled, account.pending) == (30, 0)


async def test_a_restarted_provider_settles_what_was_left(tmp_path):
    ledger = funded()
    provider = make(tmp_path, ledger)  # a threshold it never reaches
    paid = await admit(provider)
    await run_steps(provider, paid, 3)
    await offer(provider, signed_voucher(30, 1))
    assert ledger.settlements == []
    provider.store.close()  # killed: its session never ended

    again = make(tmp_path, ledger)
    async with trio.open_nursery() as nursery:
        await nursery.start(again.run)
        await trio.testing.wait_all_tasks_blocked()
        nursery.cancel_scope.cancel()
    assert ledger.paid[(JOB, ME.address)] == 30
    # it kept the job: a later voucher of the same job is taken and checked as before
    assert (await offer(again, signed_voucher(30, 1))).code == "stale_voucher"


async def test_settlement_retries_a_bounded_number_of_times(autojump_clock, tmp_path):
    ledger = funded()
    provider = make(tmp_path, ledger)
    paid = await admit(provider)
    await run_steps(provider, paid, 3)
    await offer(provider, signed_voucher(20, 1))
    ledger.fail_next = [ChainError("reset"), ChainError("reset")]
    assert await provider.settle(JOB)  # the third attempt goes through
    assert ledger.paid[(JOB, ME.address)] == 20
    assert not await provider.settle(JOB)  # nothing more to settle: no call at all
    # chain down for good: three attempts, then a recorded failure
    await offer(provider, signed_voucher(30, 2))
    ledger.fail_next = [ChainError("down")] * 3
    assert not await provider.settle(JOB)
    assert ledger.fail_next == [] and provider.settle_failures[-1].error == "down"
    assert provider.store.account(JOB, ME.address).pending == 10
    # another revert is not retried
    ledger.fail_next = [revert("ProviderNotActive"), ChainError("unused")]
    assert not await provider.settle(JOB)
    assert len(ledger.fail_next) == 1
    ledger.fail_next = []


async def test_stale_voucher_means_settled_already(tmp_path):
    """Someone else (anyone may call settle) settled our voucher first."""
    ledger = funded()
    provider = make(tmp_path, ledger)
    paid = await admit(provider)
    await run_steps(provider, paid, 3)
    await offer(provider, signed_voucher(30, 1))
    await FakeEscrow(ledger, PAYER).settle(signed_voucher(30, 1))
    assert await provider.settle(JOB)
    assert provider.store.account(JOB, ME.address).pending == 0
    assert ledger.paid[(JOB, ME.address)] == 30 and len(ledger.settlements) == 1
