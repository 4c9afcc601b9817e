"""The provider's payments, durably: HOME/payments.db (sqlite, mode 0600).

What a provider must not lose between a step and its settlement: the receipts it signed, the
latest voucher its payer sent per (job, provider) and what the escrow already paid. A voucher
is written here before the provider answers it, so a provider killed mid-job settles what was
acknowledged when it comes back (before the job's deadline).

Amounts are uint256 on chain: they are stored as decimal text and summed in Python. The
methods are synchronous (small writes, one connection behind a lock); trio callers run them
with `PaymentStore.run` (a worker thread, one at a time). `earnings(db)` reads a store for the
CLI (`gridmesh earnings`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.eip712 import (
    SignedReceipt,
    SignedVoucher,
    WireFormatError,
    decode_signed_voucher,
    encode_signed_receipt,
    encode_signed_voucher,
    to_checksum_address,
)
from daemon.payments.private_db import PrivateDB

STORE_FILE = "payments.db"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    job_id BLOB PRIMARY KEY, payer BLOB NOT NULL, deadline INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS receipts (
    digest BLOB PRIMARY KEY, job_id BLOB NOT NULL, provider BLOB NOT NULL,
    session BLOB NOT NULL, step INTEGER NOT NULL, amount TEXT NOT NULL,
    signed BLOB NOT NULL, at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS receipts_job ON receipts (job_id, provider);
CREATE TABLE IF NOT EXISTS totals (
    job_id BLOB NOT NULL, provider BLOB NOT NULL, signed TEXT NOT NULL,
    receipts INTEGER NOT NULL, PRIMARY KEY (job_id, provider)
);
CREATE TABLE IF NOT EXISTS vouchers (
    job_id BLOB NOT NULL, provider BLOB NOT NULL, nonce INTEGER NOT NULL,
    cumulative TEXT NOT NULL, signed BLOB NOT NULL, at REAL NOT NULL,
    PRIMARY KEY (job_id, provider)
);
CREATE TABLE IF NOT EXISTS settlements (
    job_id BLOB NOT NULL, provider BLOB NOT NULL, nonce INTEGER NOT NULL,
    cumulative TEXT NOT NULL, at REAL NOT NULL, PRIMARY KEY (job_id, provider)
);
"""


@dataclass(frozen=True)
class Account:
    """One (job, provider) as the store knows it."""

    job_id: bytes
    provider: bytes
    signed: int  # what this provider's receipts of the job add up to
    receipts: int
    voucher: SignedVoucher | None  # the latest the payer sent
    settled: int  # cumulative amount the escrow paid against (fee included)
    settled_nonce: int

    @property
    def acknowledged(self) -> int:
        return self.voucher.voucher.cumulative_amount if self.voucher is not None else 0

    @property
    def pending(self) -> int:
        """Acknowledged, not yet settled."""
        return max(0, self.acknowledged - self.settled)


class PaymentStore(PrivateDB):
    """Signed receipts, the latest voucher per (job, provider) and settlements.

    Write-ahead logged (a receipt per step is cheap); vouchers and settlements are written
    with synchronous = FULL (`_write(durable=True)`), which also survives the machine going
    down."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, _SCHEMA, wal=True)

    def _write(self, statements: list[tuple[str, tuple[Any, ...]]], durable: bool = False) -> None:
        with self._lock:
            if durable:
                self._db.execute("PRAGMA synchronous = FULL")
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for sql, args in statements:
                        self._db.execute(sql, args)
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
                self._db.execute("COMMIT")
            finally:
                if durable:
                    self._db.execute("PRAGMA synchronous = NORMAL")

    # -- writes ------------------------------------------------------------------------------

    def add_job(self, job_id: bytes, payer: bytes, deadline: int) -> None:
        """Remember a job's payer and deadline (as the escrow told them) once."""
        self._write([("INSERT OR IGNORE INTO jobs VALUES (?, ?, ?)", (job_id, payer, deadline))])

    def add_receipt(self, signed: SignedReceipt, digest: bytes) -> None:
        """A receipt this node signed, and its amount added to the job's total (atomically)."""
        r = signed.receipt
        key = (r.job_id, r.provider)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT signed, receipts FROM totals WHERE job_id = ? AND provider = ?", key
                ).fetchone()
                total, count = (int(row[0]), row[1]) if row else (0, 0)
                self._db.execute(
                    "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (
                        digest,
                        r.job_id,
                        r.provider,
                        r.session,
                        r.step,
                        str(r.amount),
                        encode_signed_receipt(signed),
                        time.time(),
                    ),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO totals VALUES (?, ?, ?, ?)",
                    (*key, str(total + r.amount), count + 1),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def put_voucher(self, signed: SignedVoucher) -> None:
        """The latest voucher of (job, provider); the caller checked it is newer."""
        v = signed.voucher
        self._write(
            [
                (
                    "INSERT OR REPLACE INTO vouchers VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        v.job_id,
                        v.provider,
                        v.nonce,
                        str(v.cumulative_amount),
                        encode_signed_voucher(signed),
                        time.time(),
                    ),
                )
            ],
            durable=True,
        )

    def record_settled(self, signed: SignedVoucher) -> None:
        """The escrow paid up to this voucher (a later one only raises the mark)."""
        v = signed.voucher
        current = self.account(v.job_id, v.provider)
        if current is not None and current.settled >= v.cumulative_amount:
            return
        self._write(
            [
                (
                    "INSERT OR REPLACE INTO settlements VALUES (?, ?, ?, ?, ?)",
                    (v.job_id, v.provider, v.nonce, str(v.cumulative_amount), time.time()),
                )
            ],
            durable=True,
        )

    # -- reads -------------------------------------------------------------------------------

    def job(self, job_id: bytes) -> tuple[bytes, int] | None:
        """(payer, deadline) of a job this node worked for, or None."""
        with self._lock:
            row = self._db.execute(
                "SELECT payer, deadline FROM jobs WHERE job_id = ?", (job_id,)
            ).fetchone()
        return (bytes(row[0]), row[1]) if row else None

    def receipts(self, job_id: bytes) -> list[SignedReceipt]:
        """The receipts this node signed in a job, in the order it signed them."""
        from contracts.eip712 import decode_signed_receipt

        with self._lock:
            rows = self._db.execute(
                "SELECT signed FROM receipts WHERE job_id = ? ORDER BY rowid", (job_id,)
            ).fetchall()
        return [decode_signed_receipt(bytes(row[0])) for row in rows]

    def account(self, job_id: bytes, provider: bytes) -> Account | None:
        accounts = self.accounts(job_id=job_id, provider=provider)
        return accounts[0] if accounts else None

    def accounts(self, job_id: bytes | None = None, provider: bytes | None = None) -> list[Account]:
        """Every (job, provider) with receipts or a voucher (optionally of one job/provider)."""
        with self._lock:
            keys = self._db.execute(
                "SELECT job_id, provider FROM totals UNION SELECT job_id, provider FROM vouchers"
            ).fetchall()
            out = []
            for job, prov in sorted((bytes(j), bytes(p)) for j, p in keys):
                if (job_id is not None and job != job_id) or (
                    provider is not None and prov != provider
                ):
                    continue
                out.append(self._account(job, prov))
        return out

    def _account(self, job_id: bytes, provider: bytes) -> Account:
        key = (job_id, provider)
        where = "WHERE job_id = ? AND provider = ?"
        total = self._db.execute(f"SELECT signed, receipts FROM totals {where}", key).fetchone()
        voucher = self._db.execute(f"SELECT signed FROM vouchers {where}", key).fetchone()
        settled = self._db.execute(
            f"SELECT cumulative, nonce FROM settlements {where}", key
        ).fetchone()
        try:
            signed_voucher = decode_signed_voucher(bytes(voucher[0])) if voucher else None
        except WireFormatError:  # written by us: only a damaged file gets here
            signed_voucher = None
        return Account(
            job_id=job_id,
            provider=provider,
            signed=int(total[0]) if total else 0,
            receipts=total[1] if total else 0,
            voucher=signed_voucher,
            settled=int(settled[0]) if settled else 0,
            settled_nonce=settled[1] if settled else 0,
        )

    def unsettled(self) -> list[Account]:
        """Accounts whose latest voucher pays more than was settled: what to settle."""
        return [a for a in self.accounts() if a.pending > 0]


def _open_existing(db: Path | str) -> PaymentStore | None:
    """The store in `db` (a home directory or the file itself); None when there is none yet
    (reading must not create one)."""
    path = Path(db)
    if path.is_dir():
        path = path / STORE_FILE
    return PaymentStore(path) if path.exists() else None


def earnings(db: Path | str) -> list[dict[str, Any]]:
    """Per job and provider: receipts signed (count and amount), acknowledged (the latest
    voucher), settled and pending, amounts in the token's smallest unit. [] without a store."""
    store = _open_existing(db)
    if store is None:
        return []
    try:
        return [
            {
                "job_id": "0x" + a.job_id.hex(),
                "provider": to_checksum_address(a.provider),
                "receipts": a.receipts,
                "signed": a.signed,
                "acknowledged": a.acknowledged,
                "nonce": a.voucher.voucher.nonce if a.voucher is not None else 0,
                "settled": a.settled,
                "pending": a.pending,
            }
            for a in store.accounts()
        ]
    finally:
        store.close()


HISTORY_POINTS = 240


def earnings_history(db: Path | str, most: int = HISTORY_POINTS) -> list[dict[str, Any]]:
    """Cumulative earnings over time, oldest first, at most about `most` points, each
    `{at, signed, acknowledged, settled, pending}` (the token's smallest unit; `at` in Unix
    seconds, the end of its time bucket). `signed` follows every receipt's time. A job's
    vouchers and settlements keep only their latest row, so its acknowledged and settled
    amounts appear whole at the time of its latest voucher and settlement. [] without a
    store. Rows are read one by one (a provider's millions of receipts take time here, not
    memory): the `earnings` RPC computes it only when asked (`history: true`)."""
    if most < 1:
        raise ValueError("most must be >= 1")
    store = _open_existing(db)
    if store is None:
        return []
    try:
        return _history(store._db, most)
    finally:
        store.close()


def _history(db: Any, most: int) -> list[dict[str, Any]]:
    tables = ("receipts", "vouchers", "settlements")
    spans = [db.execute(f"SELECT MIN(at), MAX(at) FROM {t}").fetchone() for t in tables]
    known = [s for s in spans if s[0] is not None]
    if not known:
        return []
    first, last = min(s[0] for s in known), max(s[1] for s in known)
    width = max((last - first) / most, 1e-3)
    columns = {"receipts": "amount", "vouchers": "cumulative", "settlements": "cumulative"}
    keys = {"receipts": "signed", "vouchers": "acknowledged", "settlements": "settled"}
    buckets: dict[int, dict[str, Any]] = {}
    for table in tables:  # streamed row by row: exact for any amount, memory per bucket only
        for at, amount in db.execute(f"SELECT at, {columns[table]} FROM {table}"):
            point = buckets.setdefault(int((at - first) / width), {"at": at})
            point["at"] = max(point["at"], at)
            point[keys[table]] = point.get(keys[table], 0) + int(amount)
    totals = dict.fromkeys(keys.values(), 0)
    out = []
    for bucket in sorted(buckets):
        point = buckets[bucket]
        for key in totals:
            totals[key] += point.get(key, 0)
        pending = max(0, totals["acknowledged"] - totals["settled"])
        out.append({"at": round(point["at"], 3), **totals, "pending": pending})
    return out
