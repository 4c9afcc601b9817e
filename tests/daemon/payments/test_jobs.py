"""The requester's job book (daemon/payments/jobs.py): durable jobs and acknowledgements,
0600, nonces that never go back across a restart, and create_job's deposit through Escrow on a
dev chain (recorded before sending, removed when refused, reconciled after a crash)."""

from __future__ import annotations

import secrets
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts.chain.errors import ContractRevert
from daemon.payments.job_spec import JobSpec
from daemon.payments.jobs import (
    DEPOSITED,
    DEPOSITING,
    JobBook,
    JobBookError,
    PaidJob,
    create_job,
    reconcile,
)
from tests.daemon.payments.escrow_env import Env, deployed_chain

PROVIDER = "0x" + "ab" * 20


def _job(job_id: bytes, state: str = DEPOSITED, created: float = 1.0) -> PaidJob:
    return PaidJob(job_id, 5, 10**18, 2_000_000_000, created, "demo", "tiny", state, "0xE", 7)


def test_jobs_and_acknowledgements_survive_a_restart(tmp_path: Path) -> None:
    one, two, pending = secrets.token_bytes(32), secrets.token_bytes(32), secrets.token_bytes(32)
    with JobBook(tmp_path) as book:
        assert stat.S_IMODE((tmp_path / "jobs.db").stat().st_mode) == 0o600
        book.add(_job(one, created=1.0))
        book.add(_job(two, created=2.0))
        book.add(_job(pending, DEPOSITING, created=3.0))
        with pytest.raises(JobBookError, match="already"):
            book.add(_job(one))
        book.record_acknowledged(one, PROVIDER, 10, 1)
        book.record_acknowledged(one, bytes.fromhex("cd" * 20), 2**200, 1)
        book.record_acknowledged(one, PROVIDER, 25, 2)
        book.record_acknowledged(one, PROVIDER, 25, 2)  # the same again: no-op
    with JobBook(tmp_path / "jobs.db") as book:
        assert book.get(one) == _job(one, created=1.0)
        assert book.get(pending) is None  # not paid work until deposited
        assert book.get(pending, include_pending=True).state == DEPOSITING
        assert [j.job_id for j in book.list()] == [pending, two, one]
        acked = book.acknowledged(one)
        assert [(a.cumulative, a.nonce) for a in acked.values()] == [(25, 2), (2**200, 1)]
        assert acked["0xABaBaBaBABabABabAbAbABAbABabababaBaBABaB"].nonce == 2
        assert book.acknowledged(two) == {}
        with pytest.raises(JobBookError, match="does not follow"):
            book.record_acknowledged(one, PROVIDER, 30, 2)  # a nonce issued again
        with pytest.raises(JobBookError, match="does not follow"):
            book.record_acknowledged(one, PROVIDER, 24, 3)  # an amount going back
        with pytest.raises(JobBookError, match="not in this node's job book"):
            book.record_acknowledged(secrets.token_bytes(32), PROVIDER, 1, 1)
        with pytest.raises(JobBookError, match="20-byte"):
            book.record_acknowledged(one, b"\x01" * 19, 1, 1)
        book.mark_deposited(pending, "0xfeed")
        assert book.get(pending).tx == "0xfeed"
        book.remove(one)
        assert book.get(one) is None and book.acknowledged(one) == {}


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    with deployed_chain(accounts=3) as running:
        yield running


async def test_create_job_deposits_and_records(env: Env, tmp_path: Path) -> None:
    escrow = env.escrow(1)
    await escrow.mint(100_000_000)
    spec = JobSpec(name="demo", deposit=40_000_000, max_price_per_unit=3, deadline_s=900)
    with JobBook(tmp_path) as book:
        before = await escrow.token_balance()
        job = await create_job(book, escrow, spec)
        assert len(job.job_id) == 32 and job.state == DEPOSITED and job.tx.startswith("0x")
        assert env.now() < job.deadline <= env.now() + 900
        assert book.get(job.job_id) == job
        on_chain = await escrow.job(job.job_id)
        assert on_chain is not None and on_chain.payer == escrow.address
        assert (on_chain.deposit, on_chain.max_price_per_unit, on_chain.deadline) == (
            40_000_000,
            3,
            job.deadline,
        )
        assert await escrow.token_balance() == before - 40_000_000
        assert job.escrow == env.record.addresses["JobEscrow"]

        with pytest.raises(JobBookError, match="already"):
            await create_job(book, escrow, spec, job_id=job.job_id)
        taken = secrets.token_bytes(32)  # refused on chain: nothing stays in the book
        await escrow.deposit(taken, 1, 1, env.now() + 60)
        with pytest.raises(ContractRevert, match="JobExists"):
            await create_job(book, escrow, spec, job_id=taken)
        assert book.get(taken, include_pending=True) is None
        assert len(book.list()) == 1


async def test_reconcile_after_a_crash_between_book_and_chain(env: Env, tmp_path: Path) -> None:
    escrow = env.escrow(2)
    await escrow.mint(10_000_000)
    landed, lost = secrets.token_bytes(32), secrets.token_bytes(32)
    deadline = env.now() + 120
    with JobBook(tmp_path) as book:
        for job_id in (landed, lost):
            book.add(PaidJob(job_id, 1, 1_000, deadline, 1.0, state=DEPOSITING))
        await escrow.deposit(landed, 1_000, 1, deadline)  # mined; the node died before marking
        fixed = await reconcile(book, escrow, landed)
        assert fixed is not None and fixed.state == DEPOSITED and fixed.deadline == deadline
        assert (await reconcile(book, escrow, lost)).state == DEPOSITING  # may still land
        env.advance(121)
        assert await reconcile(book, escrow, lost) is None  # no deposit can land now
        assert book.get(lost, include_pending=True) is None
