"""The requester's side of paid work: check every receipt, acknowledge it, send vouchers.

A generation runs as a paid job when it names a job id this node deposited for (its job book,
`daemon.payments.jobs.JobBook`); any other job id is refused before a session opens. Per job
the node keeps one `Acknowledger` (the payer's cumulative vouchers) and one `JobBudget` (all
receipts of the job within its deposit), shared by the job's generations.

Per generation (`PaidGeneration`), each session opened on a provider gets a `ReceiptVerifier`
bound to the provider's payout address (from its signed resource record) and the session. The
shard client hands every step's receipt with the bytes it concerns: a hop's input is what the
client sent, or in a chained step the copy of the previous hop's output (so each output hash
must be the next hop's input hash), and its output is what arrived. A refused receipt fails the
step as a bad hop and is never acknowledged. After each accepted receipt the provider is owed
a new voucher; a sender per provider (one that does not answer delays no other) hands it its
latest over `/gridmesh/voucher/1.0.0` (the newest only: vouchers are cumulative, and reach a
provider in nonce order), recording the nonce and amount in the job book before it is sent, so
a restarted node never issues a nonce twice. Vouchers owed or in flight when the generation
ends are sent before it returns (bounded by FLUSH_TIMEOUT_S).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

from contracts.eip712 import (
    Domain,
    Signer,
    WireFormatError,
    decode_signed_receipt,
    to_checksum_address,
)
from contracts.receipts import (
    Acknowledger,
    Equivocation,
    JobBudget,
    JobTerms,
    ReceiptRefused,
    ReceiptVerifier,
    StepReplayed,
    activation_hash,
)
from daemon.payments import wire
from p2p.network import NetworkError

log = logging.getLogger(__name__)

FLUSH_TIMEOUT_S = 10.0  # the vouchers of a finished generation must be sent within this


class PaymentError(Exception):
    """A generation cannot run as the paid job it names; `code` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Book(Protocol):
    """What the requester needs of the job book (`daemon.payments.jobs.JobBook`)."""

    def get(self, job_id: bytes) -> Any: ...  # PaidJob(job_id, max_price_per_unit, deposit, ...)

    def record_acknowledged(
        self, job_id: bytes, provider: bytes | str, cumulative: int, nonce: int
    ) -> None: ...

    def acknowledged(self, job_id: bytes) -> dict[str, Any]: ...  # -> Acknowledged(cum, nonce)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any: ...


# (peer id, request bytes) -> the answer's bytes (the network's request)
Send = Callable[[str, bytes], Awaitable[bytes]]
# peer id -> its payout address (20 bytes) from its signed resource record, None if unknown
PayoutOf = Callable[[str], Awaitable[bytes | None]]
# proof that a provider signed two outputs for one step -> reported on chain (slashes it)
Report = Callable[[Equivocation], Awaitable[Any]]


@dataclass
class JobState:
    """One job's acknowledgements, shared by its generations on this node."""

    terms: JobTerms
    budget: JobBudget
    acknowledger: Acknowledger
    peers: dict[bytes, str] = field(default_factory=dict)  # provider address -> peer id
    refusals: list[str] = field(default_factory=list)  # vouchers providers refused
    # per provider, one voucher issued and sent at a time: they arrive in nonce order
    sending: dict[bytes, trio.Lock] = field(default_factory=dict)


class Requester:
    """One node's paid work as a requester (the daemon holds one when it has an Escrow)."""

    def __init__(
        self,
        domain: Domain,
        payer: Signer,
        book: Book,
        *,
        send: Send,
        payout_of: PayoutOf,
        report: Report | None = None,
    ) -> None:
        """`report`: where proofs of equivocation go (Escrow.report_equivocation)."""
        self.domain = domain
        self.payer = payer
        self.book = book
        self._send = send
        self._payout_of = payout_of
        self._report = report
        self.reported: list[Equivocation] = []
        self.jobs: dict[bytes, JobState] = {}

    async def generation(self, job_id: bytes) -> PaidGeneration:
        """A paid generation of `job_id`, or PaymentError (not a job this node deposited)."""
        job = await self.book.run(self.book.get, job_id)
        if job is None:
            raise PaymentError(
                "unknown_job",
                f"job 0x{job_id.hex()} is not in this node's job book: create it with "
                "`gridmesh job create` on this node",
            )
        state = self.jobs.get(job_id)
        if state is None:
            acknowledger = Acknowledger(self.domain, job_id, self.payer)
            acked = await self.book.run(self.book.acknowledged, job_id)
            spent = 0
            for address, ack in acked.items():
                provider = bytes.fromhex(address[2:])
                acknowledger.resume(provider, ack.cumulative, ack.nonce)
                spent += ack.cumulative
            terms = JobTerms(job_id, job.deposit, job.max_price_per_unit)
            state = JobState(terms, JobBudget(job.deposit, spent), acknowledger)
            self.jobs[job_id] = state
        return PaidGeneration(self, state)


class PaidGeneration:
    """The receipts and vouchers of one generation of a paid job (see the module doc)."""

    def __init__(self, requester: Requester, state: JobState) -> None:
        self._requester = requester
        self.state = state
        self.job_id = state.terms.job_id
        self.max_price_per_unit = state.terms.max_price_per_unit
        self._verifiers: dict[tuple[str, str], ReceiptVerifier] = {}
        self._owed: set[bytes] = set()  # providers whose latest voucher is not sent yet
        self._senders: dict[bytes, trio.Event] = {}  # a task per provider, woken by its event
        self._nursery: trio.Nursery | None = None
        self.acknowledged = 0  # in this generation
        self.refused: list[str] = []  # receipts refused (peer: reason)
        self._proofs: list[Equivocation] = []  # equivocations to report

    async def opened(
        self, peer_id: str, session_id: str, model_id: str, start: int, end: int
    ) -> str | None:
        """A session opened on `peer_id` for layers [start, end) of `model_id`; the reason it
        cannot be paid (no payout address known for the peer), or None."""
        provider = await self._requester._payout_of(peer_id)
        if provider is None:
            return "no signed payout address known for this peer"
        self.state.peers[provider] = peer_id
        self._verifiers[(peer_id, session_id)] = ReceiptVerifier(
            self._requester.domain,
            self.state.terms,
            provider=provider,
            session_id=session_id,
            model_id=model_id,
            layers=(start, end),
            budget=self.state.budget,
        )
        return None

    def check(
        self, peer_id: str, session_id: str, receipt: bytes | None, given: bytes, got: bytes
    ) -> str | None:
        """Verify and acknowledge a step's receipt (`given`: the hop's input bytes, `got`:
        its output bytes as they arrived); the reason it is refused, or None."""
        verifier = self._verifiers.get((peer_id, session_id))
        try:
            if verifier is None:
                raise ReceiptRefused("a step of a session not opened as paid")
            if receipt is None:
                raise ReceiptRefused("the step came without a receipt")
            signed = decode_signed_receipt(receipt)
            accepted = verifier.check(
                signed, input_hash=activation_hash(given), output_hash=activation_hash(got)
            )
        except (ReceiptRefused, WireFormatError) as exc:
            if isinstance(exc, StepReplayed) and exc.equivocation is not None:
                self._proofs.append(exc.equivocation)
                if self._nursery is not None:
                    self._nursery.start_soon(self._report_all)
            why = f"receipt refused: {exc}"
            self.refused.append(f"{peer_id}: {why}"[:300])
            del self.refused[:-32]
            return why
        self.state.acknowledger.acknowledge(accepted)
        self.acknowledged += accepted.amount
        self._owe(accepted.receipt.provider)
        return None

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        """Send vouchers while the generation runs (a task per provider: one that does not
        answer delays no other); on exit, send what is still owed, within FLUSH_TIMEOUT_S."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for provider in list(self._owed):
                self._owe(provider)
            try:
                yield
            finally:
                self._nursery = None
                with trio.CancelScope(shield=True), trio.move_on_after(FLUSH_TIMEOUT_S):
                    await self._flush()
                nursery.cancel_scope.cancel()

    def _owe(self, provider: bytes) -> None:
        """The provider is owed its newest voucher: wake (or start) its sender."""
        self._owed.add(provider)
        if self._nursery is None:
            return  # sent when the generation runs, or at its end
        event = self._senders.get(provider)
        if event is None:
            event = self._senders[provider] = trio.Event()
            self._nursery.start_soon(self._sender, provider)
        event.set()

    async def _sender(self, provider: bytes) -> None:
        while True:
            await self._senders[provider].wait()
            self._senders[provider] = trio.Event()
            await self._send_if_owed(provider)

    async def _send_if_owed(self, provider: bytes) -> None:
        lock = self.state.sending.setdefault(provider, trio.Lock())
        async with lock:  # also waits for a send in flight
            if provider in self._owed:
                self._owed.discard(provider)
                try:
                    await self._send_voucher(provider)
                except BaseException:  # cancelled mid-send: the flush sends it again
                    self._owed.add(provider)
                    raise

    async def _flush(self) -> None:
        """Report equivocations and send every owed voucher, providers in parallel."""
        await self._report_all()
        async with trio.open_nursery() as nursery:  # those in flight too: wait for them
            for provider in sorted(self._owed | set(self._senders)):
                nursery.start_soon(self._send_if_owed, provider)

    async def _report_all(self) -> None:
        while self._proofs:
            await self._report_one(self._proofs.pop(0))

    async def _send_voucher(self, provider: bytes) -> None:
        """Issue the provider's latest voucher, record it in the job book, then send it."""
        requester, state = self._requester, self.state
        signed = state.acknowledger.voucher(provider)
        if signed is None:
            return
        v = signed.voucher
        await requester.book.run(
            requester.book.record_acknowledged, v.job_id, provider, v.cumulative_amount, v.nonce
        )
        peer_id = state.peers[provider]
        who = to_checksum_address(provider)
        try:
            reply = wire.decode(await requester._send(peer_id, wire.offer(signed)))
        except (NetworkError, wire.VoucherWireError) as exc:
            # the provider settles with the voucher it has; the next one covers this one
            log.warning("voucher %d for %s not delivered: %s", v.nonce, who, exc)
            return
        if isinstance(reply, wire.Refused):
            log.warning("%s refused voucher %d: %s %s", who, v.nonce, reply.code, reply.message)
            state.refusals.append(f"{who}: {reply.code}")
            del state.refusals[:-32]

    async def _report_one(self, proof: Equivocation) -> None:
        """Report a provider that signed two outputs for one step (its stake is slashed)."""
        requester = self._requester
        who = to_checksum_address(proof.provider)
        log.warning("%s signed two outputs for one step: reporting it", who)
        if requester._report is None:
            return
        try:
            await requester._report(proof)
        except Exception as exc:  # noqa: BLE001 - a chain error must not end the generation
            log.warning("reporting the equivocation of %s failed: %s", who, exc)
            return
        requester.reported.append(proof)

    def to_json(self) -> dict[str, Any]:
        """What the generation's job reports about its payment."""
        return {
            "job_id": "0x" + self.job_id.hex(),
            "acknowledged": self.acknowledged,
            "receipts_refused": list(self.refused),
            "vouchers_refused": list(self.state.refusals),
        }
