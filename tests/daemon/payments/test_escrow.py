"""Escrow (daemon/payments/escrow.py) on an in-process dev chain over HTTP: deposits read back
as OnChainJob, settlement pays exactly the acknowledged amount minus the fee, refunds only after
the deadline, staking and unbonding, reverts named by their custom error with advice, the job
cache, and the errors of a node with no deployment."""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.chain.client import ChainClient
from contracts.chain.errors import ChainError, ContractRevert
from contracts.eip712 import SignedVoucher, Signer, Voucher, address_from_hex
from daemon.payments.escrow import (
    Escrow,
    OnChainJob,
    explain,
    job_id_from_hex,
    job_id_hex,
)
from tests.daemon.payments.escrow_env import FEE_BPS, MIN_STAKE, UNBONDING_S, Env, deployed_chain

TUSD = 1_000_000  # one tUSD in its smallest unit


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with deployed_chain(accounts=5) as running:
        yield running


def _voucher(
    env: Env,
    payer_index: int,
    escrow: Escrow,
    job_id: bytes,
    provider: str,
    cumulative: int,
    nonce: int,
) -> SignedVoucher:
    voucher = Voucher(
        job_id=job_id,
        provider=address_from_hex(provider),
        cumulative_amount=cumulative,
        receipts_root=secrets.token_bytes(32),
        nonce=nonce,
    )
    signature = Signer(env.key(payer_index)).sign(escrow.domain, voucher)
    return SignedVoucher(voucher, signature)


async def test_deposit_settle_refund_pay_exactly(env: Env) -> None:
    payer, provider, anyone = env.escrow(1), env.escrow(2), env.escrow(3)
    await payer.mint(50 * TUSD)
    await provider.mint(MIN_STAKE)
    assert await provider.register("12D3KooW-provider") is not None
    assert await provider.register("12D3KooW-provider") is None  # idempotent
    await provider.stake(MIN_STAKE)
    assert await provider.is_active()

    job_id = secrets.token_bytes(32)
    deadline = env.now() + 3600
    before = await payer.token_balance()
    result = await payer.deposit(job_id, 10 * TUSD, 7, deadline)
    assert result.gas_used > 0 and result.named("Deposited")
    assert await payer.token_balance() == before - 10 * TUSD
    job = await provider.job(job_id)
    assert job == OnChainJob(job_id, payer.address, 10 * TUSD, 0, 7, deadline, False)
    assert job.remaining == 10 * TUSD
    assert await provider.job(secrets.token_bytes(32)) is None

    fee_before = await payer.token_balance(env.fee_recipient)
    first = _voucher(env, 1, payer, job_id, provider.address, 3 * TUSD + 17, 1)
    settled = await anyone.settle(first)  # anyone may submit it; it pays the provider
    (event,) = settled.named("Settled")
    fee = (3 * TUSD + 17) * FEE_BPS // 10_000
    assert event.args["delta"] == 3 * TUSD + 17 and event.args["fee"] == fee
    assert await provider.token_balance() == 3 * TUSD + 17 - fee
    assert await payer.token_balance(env.fee_recipient) == fee_before + fee
    assert await provider.paid(job_id, provider.address) == 3 * TUSD + 17
    assert await provider.last_nonce(job_id, provider.address) == 1
    assert await anyone.reputation_of(provider.address) > 0
    assert await anyone.fee() == (FEE_BPS, env.fee_recipient)

    with pytest.raises(ContractRevert) as stale:
        await provider.settle(first)
    assert stale.value.error_name == "StaleVoucher"
    assert "settled already" in explain(stale.value)
    over = _voucher(env, 1, payer, job_id, provider.address, 10 * TUSD + 1, 2)
    with pytest.raises(ContractRevert, match="OverDeposit"):
        await provider.settle(over)
    forged = _voucher(env, 3, payer, job_id, provider.address, 4 * TUSD, 2)  # not the payer
    with pytest.raises(ContractRevert, match="BadSignature"):
        await provider.settle(forged)
    assert (await provider.job(job_id)).paid == 3 * TUSD + 17  # cache dropped after settle

    with pytest.raises(ContractRevert) as early:
        await payer.refund(job_id)
    assert early.value.error_name == "DeadlineNotReached"
    assert "only after its deadline" in explain(early.value)
    env.advance(3601)
    late = _voucher(env, 1, payer, job_id, provider.address, 4 * TUSD, 2)
    with pytest.raises(ContractRevert, match="DeadlinePassed"):
        await provider.settle(late)
    before_refund = await payer.token_balance()
    (refunded,) = (await payer.refund(job_id)).named("Refunded")
    assert refunded.args["amount"] == 10 * TUSD - (3 * TUSD + 17)
    assert await payer.token_balance() == before_refund + 7 * TUSD - 17
    job = await payer.job(job_id)
    assert job is not None and job.refunded and job.remaining == 0
    with pytest.raises(ContractRevert, match="AlreadyRefunded"):
        await payer.refund(job_id)


async def test_deposit_refusals_name_their_error(env: Env) -> None:
    payer = env.escrow(4)
    await payer.mint(5 * TUSD)
    job_id = secrets.token_bytes(32)
    await payer.deposit(job_id, TUSD, 1, env.now() + 600)
    with pytest.raises(ContractRevert) as taken:
        await payer.deposit(job_id, TUSD, 1, env.now() + 600)
    assert taken.value.error_name == "JobExists" and "used once" in explain(taken.value)
    with pytest.raises(ContractRevert, match="DeadlineInPast"):
        await payer.deposit(secrets.token_bytes(32), TUSD, 1, env.now() - 1)
    with pytest.raises(ContractRevert) as poor:
        await payer.deposit(secrets.token_bytes(32), 10**12, 1, env.now() + 600)
    assert poor.value.error_name == "ERC20InsufficientBalance"
    assert "gridmesh fund" in explain(poor.value)
    with pytest.raises(ChainError, match="positive"):
        await payer.deposit(secrets.token_bytes(32), 0, 1, env.now() + 600)
    with pytest.raises(ChainError, match="32 bytes"):
        await payer.job(b"short")


async def test_stake_unstake_withdraw_after_the_delay(env: Env) -> None:
    provider = env.escrow(3)
    with pytest.raises(ContractRevert) as unregistered:
        await provider.stake(TUSD)  # approves, then the registry refuses
    assert unregistered.value.error_name == "NotRegistered"
    await provider.register("12D3KooW-three")
    with pytest.raises(ChainError, match="for good"):
        await provider.register("12D3KooW-another")
    await provider.mint(2 * MIN_STAKE)
    await provider.stake(2 * MIN_STAKE)
    info = await provider.stake_info()
    assert (info.registered, info.peer_id, info.stake, info.active) == (
        True,
        "12D3KooW-three",
        2 * MIN_STAKE,
        True,
    )
    assert info.min_stake == MIN_STAKE and not info.slashed
    await provider.request_unstake(MIN_STAKE + 1)
    info = await provider.stake_info()
    assert info.stake == MIN_STAKE - 1 and info.unbonding == MIN_STAKE + 1 and not info.active
    assert info.unbonding_ready_at >= env.now() + UNBONDING_S - 1
    with pytest.raises(ContractRevert, match="UnbondingNotOver"):
        await provider.withdraw_unstaked()
    env.advance(UNBONDING_S + 1)
    balance = await provider.token_balance()
    await provider.withdraw_unstaked()
    assert await provider.token_balance() == balance + MIN_STAKE + 1
    with pytest.raises(ContractRevert) as nothing:
        await provider.withdraw_unstaked()
    assert "unstake AMOUNT" in explain(nothing.value)


async def test_gas_from_a_dev_account(env: Env) -> None:
    dev = env.escrow(0)
    fresh = "0x" + secrets.token_bytes(20).hex()
    await dev.send_gas(fresh, 10**18)
    assert await dev.gas_balance(fresh) == 10**18
    await dev.mint(TUSD, to=fresh)  # and the client's own nonces still line up
    assert await dev.token_balance(fresh) == TUSD


async def test_jobs_are_cached_briefly(env: Env) -> None:
    now = [0.0]
    payer = env.escrow(1)
    watcher = env.escrow(2, cache_s=5.0, clock=lambda: now[0])
    await payer.mint(TUSD)
    job_id = secrets.token_bytes(32)
    assert await watcher.job(job_id) is None  # unknown jobs are not cached
    await payer.deposit(job_id, TUSD, 1, env.now() + 3600)
    seen = await watcher.job(job_id)
    assert seen is not None and seen.paid == 0
    env.advance(3601)
    await payer.refund(job_id)
    assert not (await watcher.job(job_id)).refunded  # still the cached view
    assert (await watcher.job(job_id, fresh=True)).refunded
    now[0] = 5.0
    assert (await watcher.job(job_id)).refunded


async def test_domain_is_the_recorded_chain_and_escrow(env: Env) -> None:
    escrow = env.escrow(1)
    assert escrow.domain.chain_id == env.record.chain_id
    assert escrow.domain.verifying_contract == address_from_hex(env.record.addresses["JobEscrow"])
    await escrow.check()
    wrong = dict(env.record.as_json(), chainId=31337)
    with ChainClient(env.chain.url) as client:
        with pytest.raises(ChainError, match="chain id 31337"):
            await Escrow(client, wrong).check()
        gone = dict(env.record.as_json())
        gone["addresses"] = dict(gone["addresses"], JobEscrow="0x" + "11" * 20)
        with pytest.raises(ChainError, match="no JobEscrow"):
            await Escrow(client, gone).check()
        with pytest.raises(ChainError, match="names no .*JobEscrow"):
            Escrow(client, {"chainId": 1, "addresses": {"TestUSD": "0x" + "22" * 20}})
        reader = Escrow(client, env.record)  # no key: reads, never transacts
        assert reader.address == ""
        with pytest.raises(ChainError, match="no key"):
            await reader.token_balance()


def test_no_deployment_recorded_says_how_to_make_one(tmp_path: Path) -> None:
    with ChainClient("http://127.0.0.1:9") as client, pytest.raises(ChainError) as none:
        Escrow.from_home(client, tmp_path, "devnet")
    assert "no chain configured" in str(none.value)
    assert "gridmesh chain deploy --network devnet" in str(none.value)


def test_job_ids_in_hex() -> None:
    job_id = secrets.token_bytes(32)
    assert job_id_from_hex(job_id_hex(job_id)) == job_id
    assert job_id_from_hex(job_id.hex().upper()) == job_id
    with pytest.raises(ValueError, match="64 hex digits"):
        job_id_from_hex("0x1234")
    with pytest.raises(ValueError, match="not hex"):
        job_id_from_hex("zz" * 32)
