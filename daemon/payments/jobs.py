"""The requester's job book: the jobs this node deposited for, durably (HOME/jobs.db, sqlite,
mode 0600), and what it acknowledged to each provider in them.

A job is written before its deposit is sent (state "depositing") and marked "deposited" when
the deposit is mined, so a node killed in between still knows the job id whose money may be
locked; `reconcile` settles such a job against the chain. Only deposited jobs are paid work
(`get`). The acknowledged amount and nonce per provider are recorded by the requester's flow
each time it issues a voucher, so a restarted node never issues a nonce twice.

Amounts are uint256 on chain: stored as decimal text. The methods are synchronous (small
writes, one connection behind a lock); trio callers may use `JobBook.run` (a worker thread).
"""

from __future__ import annotations

import secrets
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from contracts.eip712 import address_from_hex, to_checksum_address
from daemon.payments.private_db import PrivateDB

if TYPE_CHECKING:
    from daemon.payments.escrow import Escrow
    from daemon.payments.job_spec import JobSpec

BOOK_FILE = "jobs.db"
DEPOSITING = "depositing"
DEPOSITED = "deposited"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id BLOB PRIMARY KEY, name TEXT NOT NULL, model TEXT, deposit TEXT NOT NULL,
    max_price_per_unit TEXT NOT NULL, deadline INTEGER NOT NULL, created REAL NOT NULL,
    state TEXT NOT NULL, escrow TEXT NOT NULL, chain_id INTEGER NOT NULL, tx TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS acknowledged (
    job_id BLOB NOT NULL, provider BLOB NOT NULL, cumulative TEXT NOT NULL,
    nonce INTEGER NOT NULL, at REAL NOT NULL, PRIMARY KEY (job_id, provider)
);
"""


class JobBookError(ValueError):
    """A write the book refuses (a nonce going back, an unknown job)."""


@dataclass(frozen=True)
class PaidJob:
    """A job this node created: what it deposited, for how long, at which escrow."""

    job_id: bytes
    max_price_per_unit: int
    deposit: int
    deadline: int  # unix seconds, chain time
    created: float  # unix seconds, this node's clock
    name: str = "job"
    model: str | None = None
    state: str = DEPOSITED
    escrow: str = ""  # JobEscrow's address
    chain_id: int = 0
    tx: str = ""  # the deposit's transaction hash ("" while depositing)

    def as_json(self) -> dict[str, Any]:
        return {
            "job_id": "0x" + self.job_id.hex(),
            "name": self.name,
            "model": self.model,
            "deposit": self.deposit,
            "max_price_per_unit": self.max_price_per_unit,
            "deadline": self.deadline,
            "created": self.created,
            "state": self.state,
            "escrow": self.escrow,
            "chain_id": self.chain_id,
            "tx": self.tx,
        }


@dataclass(frozen=True)
class Acknowledged:
    """The latest voucher this node issued to one provider in a job."""

    provider: str  # checksummed address
    cumulative: int
    nonce: int


def _provider_bytes(provider: bytes | str) -> bytes:
    raw = address_from_hex(provider) if isinstance(provider, str) else provider
    if len(raw) != 20:
        raise JobBookError("a provider is a 20-byte address")
    return raw


class JobBook(PrivateDB):
    """The jobs this node deposited for and their acknowledged amounts (synchronous = FULL:
    an acknowledgement is recorded before its voucher leaves)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path / BOOK_FILE if path.is_dir() else path, _SCHEMA, wal=False)

    # -- jobs --------------------------------------------------------------------------------

    def add(self, job: PaidJob) -> None:
        """Record a new job (its id must be new)."""
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        job.job_id,
                        job.name,
                        job.model,
                        str(job.deposit),
                        str(job.max_price_per_unit),
                        job.deadline,
                        job.created,
                        job.state,
                        job.escrow,
                        job.chain_id,
                        job.tx,
                    ),
                )
            except sqlite3.IntegrityError:
                raise JobBookError(f"job 0x{job.job_id.hex()} is in the book already") from None

    def mark_deposited(self, job_id: bytes, tx: str, deadline: int | None = None) -> None:
        with self._lock:
            if deadline is None:
                self._db.execute(
                    "UPDATE jobs SET state = ?, tx = ? WHERE job_id = ?", (DEPOSITED, tx, job_id)
                )
            else:
                self._db.execute(
                    "UPDATE jobs SET state = ?, tx = ?, deadline = ? WHERE job_id = ?",
                    (DEPOSITED, tx, deadline, job_id),
                )

    def remove(self, job_id: bytes) -> None:
        """Forget a job whose deposit never happened."""
        with self._lock:
            self._db.execute("DELETE FROM acknowledged WHERE job_id = ?", (job_id,))
            self._db.execute("DELETE FROM jobs WHERE job_id = ?", (job_id,))

    def get(self, job_id: bytes, *, include_pending: bool = False) -> PaidJob | None:
        """The job if this node deposited for it (or, with include_pending, is depositing)."""
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM jobs WHERE job_id = ?", (bytes(job_id),)
            ).fetchone()
        if row is None:
            return None
        job = _job(row)
        return job if include_pending or job.state == DEPOSITED else None

    def list(self) -> list[PaidJob]:
        """Every job, newest first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM jobs ORDER BY created DESC").fetchall()
        return [_job(row) for row in rows]

    # -- acknowledgements --------------------------------------------------------------------

    def record_acknowledged(
        self, job_id: bytes, provider: bytes | str, cumulative: int, nonce: int
    ) -> None:
        """Record the voucher just issued to `provider` (before it is sent). A nonce never
        goes back and an amount never shrinks; the same pair again is a no-op."""
        raw = _provider_bytes(provider)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if (
                    self._db.execute("SELECT 1 FROM jobs WHERE job_id = ?", (job_id,)).fetchone()
                    is None
                ):
                    raise JobBookError(f"job 0x{job_id.hex()} is not in this node's job book")
                row = self._db.execute(
                    "SELECT cumulative, nonce FROM acknowledged WHERE job_id = ? AND provider = ?",
                    (job_id, raw),
                ).fetchone()
                if row is not None:
                    old_cumulative, old_nonce = int(row[0]), int(row[1])
                    if (old_cumulative, old_nonce) == (cumulative, nonce):
                        self._db.execute("COMMIT")
                        return
                    if nonce <= old_nonce or cumulative < old_cumulative:
                        raise JobBookError(
                            f"voucher nonce {nonce} / amount {cumulative} for "
                            f"{to_checksum_address(raw)} does not follow the recorded nonce "
                            f"{old_nonce} / amount {old_cumulative}"
                        )
                self._db.execute(
                    "INSERT OR REPLACE INTO acknowledged VALUES (?, ?, ?, ?, ?)",
                    (job_id, raw, str(cumulative), nonce, time.time()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def acknowledged(self, job_id: bytes) -> dict[str, Acknowledged]:
        """The latest voucher per provider (checksummed address) in the job."""
        with self._lock:
            rows = self._db.execute(
                "SELECT provider, cumulative, nonce FROM acknowledged WHERE job_id = ? "
                "ORDER BY provider",
                (job_id,),
            ).fetchall()
        found = [Acknowledged(to_checksum_address(bytes(p)), int(c), int(n)) for p, c, n in rows]
        return {a.provider: a for a in found}


def _job(row: tuple[Any, ...]) -> PaidJob:
    job_id, name, model, deposit, max_price, deadline, created, state, escrow, chain_id, tx = row
    return PaidJob(
        job_id=bytes(job_id),
        max_price_per_unit=int(max_price),
        deposit=int(deposit),
        deadline=int(deadline),
        created=float(created),
        name=name,
        model=model,
        state=state,
        escrow=escrow,
        chain_id=int(chain_id),
        tx=tx,
    )


async def create_job(
    book: JobBook, escrow: Escrow, spec: JobSpec, *, job_id: bytes | None = None
) -> PaidJob:
    """Deposit for `spec` through `escrow` under a new random job id (or `job_id`) and record
    it: written as depositing first, marked deposited once mined, removed if refused. The
    deadline is the chain's time plus `spec.deadline_s`."""
    from contracts.chain.errors import ContractRevert

    job_id = job_id if job_id is not None else secrets.token_bytes(32)
    deadline = await escrow.chain_time() + spec.deadline_s
    job = PaidJob(
        job_id=job_id,
        max_price_per_unit=spec.max_price_per_unit,
        deposit=spec.deposit,
        deadline=deadline,
        created=time.time(),
        name=spec.name,
        model=spec.model,
        state=DEPOSITING,
        escrow=escrow.escrow.address,
        chain_id=escrow.chain_id,
    )
    await book.run(book.add, job)
    try:
        result = await escrow.deposit(job_id, spec.deposit, spec.max_price_per_unit, deadline)
    except ContractRevert:
        await book.run(book.remove, job_id)  # refused: nothing was locked
        raise
    await book.run(book.mark_deposited, job_id, result.tx_hash)
    return PaidJob(**{**job.__dict__, "state": DEPOSITED, "tx": result.tx_hash})


async def reconcile(book: JobBook, escrow: Escrow, job_id: bytes) -> PaidJob | None:
    """A job left "depositing" (the node stopped while its deposit was in flight): marked
    deposited if the chain has it from this node, forgotten once its deadline has passed
    without it (no deposit can land after that), left as it is otherwise."""
    job = await book.run(lambda: book.get(job_id, include_pending=True))
    if job is None or job.state == DEPOSITED:
        return job
    on_chain = await escrow.job(job_id)
    if on_chain is not None and on_chain.payer == escrow.address:
        await book.run(book.mark_deposited, job_id, "", on_chain.deadline)
        return await book.run(book.get, job_id)
    if on_chain is not None or await escrow.chain_time() >= job.deadline:  # someone else's
        await book.run(book.remove, job_id)
        return None
    return job
