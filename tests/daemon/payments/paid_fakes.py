"""An in-memory stand-in for `daemon.payments.escrow.Escrow` (the same shape, the contract's
rules for jobs and settlement), for tests on trio's virtual clock: the real one waits on a
worker thread, which lets the autojump clock fire every deadline meanwhile."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import Any

from contracts.chain.errors import ChainError, ContractRevert
from contracts.eip712 import Domain, SignedVoucher, Signer, recover_digest, to_checksum_address
from daemon.payments.escrow import OnChainJob

DOMAIN = Domain(chain_id=131277322940537, verifying_contract=bytes.fromhex("ab" * 20))
FEE_BPS = 100


def revert(name: str) -> ContractRevert:
    return ContractRevert(name, (), "0x00000000", context="JobEscrow.settle")


@dataclass
class Ledger:
    """The chain all fake escrows of a test share: jobs, payments, balances."""

    jobs: dict[bytes, OnChainJob] = field(default_factory=dict)
    paid: dict[tuple[bytes, bytes], int] = field(default_factory=dict)  # (job, provider)
    nonces: dict[tuple[bytes, bytes], int] = field(default_factory=dict)
    roots: dict[tuple[bytes, bytes], bytes] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)  # checksummed address -> tUSD
    fees: int = 0
    settlements: list[SignedVoucher] = field(default_factory=list)
    fail_next: list[Exception] = field(default_factory=list)  # raised by the next settles
    reads: int = 0

    def deposit(self, job_id: bytes, payer: Signer, amount: int, max_price: int, deadline: float):
        self.jobs[job_id] = OnChainJob(
            job_id=job_id,
            payer=to_checksum_address(payer.address),
            deposit=amount,
            paid=0,
            max_price_per_unit=max_price,
            deadline=int(deadline),
            refunded=False,
        )


class FakeEscrow:
    """`Escrow`'s shape over a shared `Ledger`, for the account of `signer`."""

    def __init__(self, ledger: Ledger, signer: Signer, domain: Domain = DOMAIN) -> None:
        self.ledger = ledger
        self.domain = domain
        self.address = to_checksum_address(signer.address)

    async def job(self, job_id: bytes) -> OnChainJob | None:
        self.ledger.reads += 1
        return self.ledger.jobs.get(job_id)

    async def settle(self, signed: SignedVoucher) -> Any:
        ledger = self.ledger
        if ledger.fail_next:
            raise ledger.fail_next.pop(0)
        v = signed.voucher
        job = ledger.jobs.get(v.job_id)
        if job is None:
            raise revert("UnknownJob")
        if time.time() > job.deadline:
            raise revert("DeadlinePassed")
        if recover_digest(self.domain.digest(v), signed.signature) != bytes.fromhex(job.payer[2:]):
            raise revert("BadSignature")
        key = (v.job_id, v.provider)
        if v.nonce <= ledger.nonces.get(key, 0) or v.cumulative_amount <= ledger.paid.get(key, 0):
            raise revert("StaleVoucher")
        delta = v.cumulative_amount - ledger.paid.get(key, 0)
        if job.paid + delta > job.deposit:
            raise revert("OverDeposit")
        fee = delta * FEE_BPS // 10_000
        ledger.paid[key] = v.cumulative_amount
        ledger.nonces[key] = v.nonce
        ledger.roots[key] = v.receipts_root
        ledger.jobs[v.job_id] = replace(job, paid=job.paid + delta)
        provider = to_checksum_address(v.provider)
        ledger.balances[provider] = ledger.balances.get(provider, 0) + delta - fee
        ledger.fees += fee
        ledger.settlements.append(signed)
        return {"delta": delta, "fee": fee}


class DownEscrow(FakeEscrow):
    """An escrow whose chain cannot be reached."""

    async def job(self, job_id: bytes) -> OnChainJob | None:
        raise ChainError("connection refused")
