"""The provider's side of paid work: admission, receipts, vouchers and settlement.

- `admit`: a session opened with a job id runs only for a job JobEscrow knows, not refunded,
  before its deadline, with money left and a maximum price at least this node's price; else
  `PaymentRefused` with a code the shard server answers (the client reports it). No free work
  for an unfunded job.
- `sign`: each step of a paid session gets a receipt from the session's `ReceiptChain`
  (inputHash / outputHash = keccak256 of the activation bytes as received / sent), stored in
  HOME/payments.db before it leaves with the step's result.
- `on_voucher` (`/gridmesh/voucher/1.0.0`): the payer's cumulative voucher is checked (the job's
  payer signed it, it pays this node, its nonce and amount rise, it never asks more than this
  node's receipts of the job add up to), stored, and only then answered.
- `run`: the settlement loop. At start it settles whatever the store holds unsettled (a provider
  killed mid-job is paid for what was acknowledged when it comes back); then a job is settled
  when its unsettled amount reaches `settle_threshold` or its last session here ends. Bounded
  retries on chain errors; a `StaleVoucher` revert means it was settled already.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from contracts.chain.errors import ChainError, ContractRevert
from contracts.eip712 import (
    SignedVoucher,
    Signer,
    address_from_hex,
    encode_signed_receipt,
    to_checksum_address,
)
from contracts.receipts import ReceiptChain, VoucherBook, VoucherRefused, activation_hash
from daemon.payments import wire
from daemon.payments.store import PaymentStore

if TYPE_CHECKING:
    from daemon.payments.escrow import Escrow

log = logging.getLogger(__name__)

SETTLE_ATTEMPTS = 3
SETTLE_BACKOFF_S = 2.0  # doubled after each failed attempt
MAX_NONCE = (1 << 63) - 1  # what the voucher protocol's answer carries


class PaymentRefused(Exception):
    """A paid session this provider will not run; `code` is what the client is answered:
    unknown_job, job_refunded, job_expired, job_spent, not_payer, payer_unknown,
    price_over_max, chain_unavailable."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class PaidSession:
    """The payment side of one paid session: its job and its chain of receipts."""

    job_id: bytes
    chain: ReceiptChain
    ended: bool = False


@dataclass
class SettleFailure:
    job_id: bytes
    nonce: int
    error: str


class Provider:
    """One node's paid work as a provider (the daemon holds one when it has an Escrow)."""

    def __init__(
        self,
        escrow: Escrow,
        signer: Signer,
        store: PaymentStore,
        *,
        price_per_unit: int,
        settle_threshold: int,
        payout_of: Callable[[str], Awaitable[bytes | None]] | None = None,
        clock: Callable[[], float] = time.time,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        """`signer`: the payout key (the account `escrow` transacts with); `payout_of`: a
        peer's payout address from its signed resource record, so that a paid session is run
        only for the peer whose account pays the job (None: not checked); `clock`: unix time,
        for deadlines and receipts' timestamps."""
        self.escrow = escrow
        self.signer = signer
        self.store = store
        self.price_per_unit = price_per_unit
        self.settle_threshold = settle_threshold
        self._payout_of = payout_of
        self._clock = clock
        self._on_reject = on_reject or (lambda reason: None)
        self._books: dict[bytes, VoucherBook] = {}
        self._signed: dict[bytes, int] = {}  # job -> what this node's receipts add up to
        self._live: dict[bytes, int] = {}  # job -> paid sessions running here
        self._lock = trio.Lock()  # one voucher at a time: check, store, answer
        self._due: set[bytes] = set()
        self._wake = trio.Event()
        self.settle_failures: list[SettleFailure] = []
        # (outcome: settled, already or failed; amount newly settled): metrics
        self.on_settle: Callable[[str, int], None] = lambda outcome, amount: None
        self._load()

    @property
    def address(self) -> bytes:
        return self.signer.address

    def _load(self) -> None:
        """Vouchers, settlements and receipt totals from the store (a restart)."""
        for account in self.store.accounts(provider=self.address):
            self._signed[account.job_id] = account.signed
            job = self.store.job(account.job_id)
            if job is None:
                continue
            book = self._new_book(account.job_id, job[0])
            book.best = account.voucher
            book.settled_amount, book.settled_nonce = account.settled, account.settled_nonce

    def _new_book(self, job_id: bytes, payer: bytes) -> VoucherBook:
        book = VoucherBook(self.escrow.domain, job_id, provider=self.address, payer=payer)
        self._books[job_id] = book
        return book

    # -- sessions and receipts ---------------------------------------------------------------

    async def admit(
        self,
        job_id: bytes,
        session_id: str,
        model_id: str,
        start: int,
        end: int,
        *,
        opener: str | None = None,
    ) -> PaidSession:
        """A paid session's receipts, or PaymentRefused. `opener`: the peer that opened the
        session (its authenticated identity): it must be the job's payer's, or anyone who
        learnt a job id could have providers work for it unpaid."""
        try:
            job = await self.escrow.job(job_id)
        except ChainError as exc:
            raise PaymentRefused("chain_unavailable", f"cannot read the job: {exc}") from None
        name = job_id.hex()[:16]
        if job is None:
            raise PaymentRefused("unknown_job", f"job {name}.. is not in the escrow")
        if job.refunded:
            raise PaymentRefused("job_refunded", f"job {name}.. was refunded")
        if job.deadline <= self._clock():
            raise PaymentRefused("job_expired", f"job {name}.. is past its deadline")
        if job.remaining <= 0:
            raise PaymentRefused("job_spent", f"job {name}.. has no deposit left")
        if job.max_price_per_unit < self.price_per_unit:
            raise PaymentRefused(
                "price_over_max",
                f"this node's price {self.price_per_unit} is over job {name}..'s maximum "
                f"{job.max_price_per_unit}",
            )
        payer = address_from_hex(job.payer)
        if self._payout_of is not None and opener is not None:
            address = await self._payout_of(opener)
            if address is None:  # its record may show up: another server may find it
                raise PaymentRefused("payer_unknown", "no signed record of the session's opener")
            if address != payer:
                raise PaymentRefused(
                    "not_payer",
                    f"job {name}.. is paid by {job.payer}, not by this session's opener",
                )
        if job_id not in self._books:
            await self.store.run(self.store.add_job, job_id, payer, job.deadline)
            self._new_book(job_id, payer)
        self._live[job_id] = self._live.get(job_id, 0) + 1
        chain = ReceiptChain(
            self.escrow.domain,
            self.signer,
            job_id=job_id,
            session_id=session_id,
            model_id=model_id,
            layer_start=start,
            layer_end=end,
            price_per_unit=self.price_per_unit,
        )
        return PaidSession(job_id, chain)

    async def sign(self, paid: PaidSession, received: bytes, sent: bytes, tokens: int) -> bytes:
        """The next receipt of a paid session, stored, as the bytes that travel with the step
        (`received` / `sent`: the activation bytes as they came in and go out)."""
        signed = paid.chain.sign_step(
            input_hash=activation_hash(received),
            output_hash=activation_hash(sent),
            tokens=tokens,
            timestamp=int(self._clock()),
        )
        await self.store.run(self.store.add_receipt, signed, paid.chain.last_digest)
        self._signed[paid.job_id] = self._signed.get(paid.job_id, 0) + signed.receipt.amount
        return encode_signed_receipt(signed)

    def ended(self, paid: PaidSession) -> None:
        """A paid session ended (closed, its stream gone, reaped): its job is settled when it
        was the job's last session here."""
        if paid.ended:
            return
        paid.ended = True
        left = self._live.get(paid.job_id, 1) - 1
        if left > 0:
            self._live[paid.job_id] = left
            return
        self._live.pop(paid.job_id, None)
        self._settle_soon(paid.job_id)

    # -- vouchers ----------------------------------------------------------------------------

    async def on_voucher(self, sender: str, payload: bytes) -> bytes:
        """Answer a voucher offer: `stored` once it is durably stored, else `refused`."""
        try:
            message = wire.decode(payload)
            if not isinstance(message, wire.Offer):
                raise VoucherRefused("bad_message", "only a voucher offer is a request")
            signed = wire.voucher_of(message)
            stored = await self.take_voucher(signed)
        except wire.VoucherWireError as exc:
            self._on_reject(exc.reason)
            return wire.encode(wire.Refused(code=exc.reason, message=str(exc)[:1000]))
        except VoucherRefused as exc:
            self._on_reject(exc.reason)
            return wire.encode(wire.Refused(code=exc.reason, message=str(exc)[:1000]))
        return wire.encode(stored)

    async def take_voucher(self, signed: SignedVoucher) -> wire.Stored:
        """Check and store a voucher (VoucherRefused says why not)."""
        v = signed.voucher
        book = self._books.get(v.job_id)
        if book is None:
            raise VoucherRefused("unknown_job", "this node ran no paid session of that job")
        if v.nonce > MAX_NONCE:
            raise VoucherRefused("stale_voucher", f"nonce over {MAX_NONCE}")
        async with self._lock:
            before = book.best
            book.offer(signed)  # job, provider, the payer's signature, rising nonce and amount
            signed_total = self._signed.get(v.job_id, 0)
            if v.cumulative_amount > signed_total:
                book.best = before
                raise VoucherRefused(
                    "over_signed",
                    f"voucher of {v.cumulative_amount} is over the {signed_total} this node's "
                    "receipts of the job add up to",
                )
            try:
                await self.store.run(self.store.put_voucher, signed)
            except BaseException:
                book.best = before
                raise
        if book.unsettled >= max(1, self.settle_threshold) or v.job_id not in self._live:
            self._settle_soon(v.job_id)
        return wire.Stored(cumulative=str(v.cumulative_amount), nonce=v.nonce)

    # -- settlement --------------------------------------------------------------------------

    def _settle_soon(self, job_id: bytes) -> None:
        self._due.add(job_id)
        self._wake.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Settle what was left unsettled, then each job when it is due; until cancelled."""
        for job_id, book in self._books.items():
            if book.unsettled > 0:
                self._due.add(job_id)
        task_status.started()
        while True:
            if not self._due:
                self._wake = trio.Event()
                await self._wake.wait()
            due, self._due = sorted(self._due), set()
            for job_id in due:
                await self.settle(job_id)

    async def settle(self, job_id: bytes) -> bool:
        """Settle a job's best voucher (bounded retries on chain errors); whether the escrow
        now holds it as settled."""
        book = self._books.get(job_id)
        signed = book.to_settle() if book is not None else None
        if book is None or signed is None:
            return False
        delay = SETTLE_BACKOFF_S
        outcome = "settled"
        for attempt in range(1, SETTLE_ATTEMPTS + 1):
            try:
                await self.escrow.settle(signed)
            except ContractRevert as exc:
                if exc.error_name != "StaleVoucher":  # another revert would revert again
                    self._failed(signed, str(exc))
                    return False
                outcome = "already"
                log.info(
                    "voucher %d of job %s was settled already",
                    signed.voucher.nonce,
                    job_id.hex()[:16],
                )
            except ChainError as exc:
                if attempt == SETTLE_ATTEMPTS:
                    self._failed(signed, str(exc))
                    return False
                log.warning("settling job %s failed (%s); retrying", job_id.hex()[:16], exc)
                await trio.sleep(delay)
                delay *= 2
                continue
            before = book.settled_amount
            book.settled(signed)
            await self.store.run(self.store.record_settled, signed)
            self.on_settle(outcome, book.settled_amount - before)
            return True
        return False

    def _failed(self, signed: SignedVoucher, error: str) -> None:
        v = signed.voucher
        log.warning(
            "could not settle voucher %d of job %s for %s: %s",
            v.nonce,
            v.job_id.hex()[:16],
            to_checksum_address(v.provider),
            error,
        )
        self._on_reject("settle_failed")
        self.on_settle("failed", 0)
        self.settle_failures.append(SettleFailure(v.job_id, v.nonce, error[:300]))
        del self.settle_failures[:-32]

    def state(self) -> dict[str, Any]:
        """For status pages: jobs with live sessions, and each job's voucher state."""
        return {
            "address": to_checksum_address(self.address),
            "live_jobs": len(self._live),
            "unsettled": {
                "0x" + job.hex(): book.unsettled
                for job, book in self._books.items()
                if book.unsettled
            },
        }
