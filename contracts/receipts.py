"""Receipts off chain: what a provider signs per step and what the requester checks and pays.

- `ReceiptChain` (provider, one per job and session): signs one receipt per step, step numbers
  0, 1, 2, ..., each linking the previous receipt's EIP-712 digest; it cannot sign two receipts
  for one step, so an honest provider never equivocates by accident.
- `ReceiptVerifier` (requester, one per job, provider and session): checks every arriving
  receipt against what the requester knows (the job's terms, the provider it chose, the session
  it opened, the bytes it sent and received) and refuses with a typed `ReceiptRefused` whose
  `reason` is a short code. Verifiers of one job share a `JobBudget`, so all receipts together
  stay within the deposit.
- `Acknowledger` (requester, one per job): keeps the accepted receipts per provider in order and
  issues cumulative vouchers signed by the payer (nonce + 1, Merkle root over every digest
  acknowledged so far, cumulative amount): what `JobEscrow.settle` pays against.
- `VoucherBook` (provider, one per job): checks the vouchers its payer sends (job, provider,
  the payer's signature, nonce and amount rising) and keeps the best one to settle with.
- `find_equivocation`: two receipts of one provider for one job, session and step with different
  outputs, both signed by it: the arguments of `JobEscrow.reportEquivocation`.

Pure and sans-IO: no clock (timestamps are passed in), no network, no web3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from contracts import merkle
from contracts.eip712 import (
    ZERO32,
    Domain,
    Receipt,
    SignatureError,
    SignedReceipt,
    SignedVoucher,
    Signer,
    Voucher,
    keccak,
    recover_digest,
    to_checksum_address,
)


def model_hash(model_id: str) -> bytes:
    """A receipt's `model`: keccak256 of the model id (utf-8)."""
    return keccak(model_id.encode())


def session_hash(session_id: str) -> bytes:
    """A receipt's `session`: keccak256 of the session id (utf-8)."""
    return keccak(session_id.encode())


def activation_hash(data: bytes) -> bytes:
    """A receipt's `inputHash` / `outputHash`: keccak256 of the activation bytes as sent."""
    return keccak(data)


# -- refusals ----------------------------------------------------------------------------


class ReceiptRefused(Exception):
    """A receipt the requester does not accept; `reason` is a short code for logs and metrics."""

    reason = "refused"

    def __init__(self, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.detail = detail


class BadSignature(ReceiptRefused):
    reason = "bad_signature"


class WrongProvider(ReceiptRefused):
    reason = "wrong_provider"


class ForeignJob(ReceiptRefused):
    reason = "foreign_job"


class WrongSession(ReceiptRefused):
    reason = "wrong_session"


class WrongWork(ReceiptRefused):
    """Another model or layer range than the session runs, or no units for a step."""

    reason = "wrong_work"


class StepReplayed(ReceiptRefused):
    """A step already receipted. `equivocation` is set when the new receipt, validly signed,
    claims another output for that step: proof for `JobEscrow.reportEquivocation`."""

    reason = "step_replayed"

    def __init__(self, detail: str, equivocation: Equivocation | None = None) -> None:
        super().__init__(detail)
        self.equivocation = equivocation


class StepSkipped(ReceiptRefused):
    reason = "step_skipped"


class BrokenChain(ReceiptRefused):
    reason = "broken_chain"


class InputMismatch(ReceiptRefused):
    reason = "input_mismatch"


class OutputMismatch(ReceiptRefused):
    reason = "output_mismatch"


class PriceOverMax(ReceiptRefused):
    reason = "price_over_max"


class OverDeposit(ReceiptRefused):
    reason = "over_deposit"


# -- the provider's side -----------------------------------------------------------------


class ReceiptChain:
    """The receipts of one session on the provider that runs it."""

    def __init__(
        self,
        domain: Domain,
        signer: Signer,
        *,
        job_id: bytes,
        session_id: str,
        model_id: str,
        layer_start: int,
        layer_end: int,
        price_per_unit: int,
    ) -> None:
        if not 0 <= layer_start < layer_end:
            raise ValueError(f"layer range [{layer_start}, {layer_end}) is empty")
        self.domain = domain
        self.signer = signer
        self.job_id = job_id
        self.session = session_hash(session_id)
        self.model = model_hash(model_id)
        self.layer_start = layer_start
        self.layer_end = layer_end
        self.price_per_unit = price_per_unit
        self.next_step = 0
        self.last_digest = ZERO32

    def sign_step(
        self, *, input_hash: bytes, output_hash: bytes, tokens: int, timestamp: int
    ) -> SignedReceipt:
        """The receipt of the next step: units = layers x `tokens` of the step."""
        if tokens <= 0:
            raise ValueError("a step processes at least one token")
        receipt = Receipt(
            job_id=self.job_id,
            provider=self.signer.address,
            model=self.model,
            layer_start=self.layer_start,
            layer_end=self.layer_end,
            session=self.session,
            step=self.next_step,
            input_hash=input_hash,
            output_hash=output_hash,
            units=(self.layer_end - self.layer_start) * tokens,
            price_per_unit=self.price_per_unit,
            prev_receipt=self.last_digest,
            timestamp=timestamp,
        )
        digest = self.domain.digest(receipt)
        signed = SignedReceipt(receipt, self.signer.sign_digest(digest))
        self.next_step += 1
        self.last_digest = digest
        return signed


# -- the requester's side ----------------------------------------------------------------


@dataclass(frozen=True)
class JobTerms:
    """What the requester deposited for a job (as `JobEscrow.deposit` recorded it)."""

    job_id: bytes
    deposit: int
    max_price_per_unit: int


@dataclass
class JobBudget:
    """The amount accepted across all of a job's sessions and providers, against its deposit."""

    deposit: int
    accepted: int = 0

    def check(self, amount: int) -> None:
        if self.accepted + amount > self.deposit:
            raise OverDeposit(
                f"receipt of {amount} would bring the job to {self.accepted + amount}, "
                f"over its deposit of {self.deposit}"
            )


@dataclass(frozen=True)
class AcceptedReceipt:
    signed: SignedReceipt
    digest: bytes

    @property
    def receipt(self) -> Receipt:
        return self.signed.receipt

    @property
    def amount(self) -> int:
        return self.signed.receipt.amount


@dataclass(frozen=True)
class Equivocation:
    """Two receipts of one provider for one job, session and step with different outputs."""

    a: SignedReceipt
    b: SignedReceipt

    @property
    def provider(self) -> bytes:
        return self.a.receipt.provider

    def call_args(self) -> tuple[Any, ...]:
        """`JobEscrow.reportEquivocation(a, sigA, b, sigB)`'s arguments, for web3."""
        return (
            self.a.receipt.abi_tuple(),
            self.a.signature,
            self.b.receipt.abi_tuple(),
            self.b.signature,
        )


def _signer_of(domain: Domain, signed: SignedReceipt) -> bytes | None:
    try:
        return recover_digest(domain.digest(signed.receipt), signed.signature)
    except SignatureError:
        return None


def find_equivocation(domain: Domain, a: SignedReceipt, b: SignedReceipt) -> Equivocation | None:
    """The pair as proof of equivocation, or None when it proves nothing (other step, same
    output, or a signature that is not the provider's): the checks `reportEquivocation` makes."""
    ra, rb = a.receipt, b.receipt
    if (ra.job_id, ra.provider, ra.session, ra.step) != (
        rb.job_id,
        rb.provider,
        rb.session,
        rb.step,
    ):
        return None
    if ra.output_hash == rb.output_hash:
        return None
    if _signer_of(domain, a) != ra.provider or _signer_of(domain, b) != ra.provider:
        return None
    return Equivocation(a, b)


class ReceiptVerifier:
    """Checks the receipts of one session, run by one provider, as they arrive."""

    def __init__(
        self,
        domain: Domain,
        terms: JobTerms,
        *,
        provider: bytes,
        session_id: str,
        model_id: str | None = None,
        layers: tuple[int, int] | None = None,
        budget: JobBudget | None = None,
    ) -> None:
        self.domain = domain
        self.terms = terms
        self.provider = provider
        self.session = session_hash(session_id)
        self.model = None if model_id is None else model_hash(model_id)
        self.layers = layers
        self.budget = budget if budget is not None else JobBudget(terms.deposit)
        self.next_step = 0
        self.last_digest = ZERO32
        self.total = 0  # accepted in this session
        self._by_step: dict[int, SignedReceipt] = {}

    def check(
        self, signed: SignedReceipt, *, input_hash: bytes, output_hash: bytes
    ) -> AcceptedReceipt:
        """Accept the next receipt of the session or raise `ReceiptRefused`. `input_hash` and
        `output_hash` are keccak256 of the bytes the requester sent and received for the step.
        A refused receipt changes nothing."""
        r = signed.receipt
        if r.job_id != self.terms.job_id:
            raise ForeignJob(f"receipt is for job {r.job_id.hex()[:16]}.., not this one")
        if r.provider != self.provider:
            raise WrongProvider(
                f"receipt names {to_checksum_address(r.provider)}, the session runs on "
                f"{to_checksum_address(self.provider)}"
            )
        if r.session != self.session:
            raise WrongSession("receipt is for another session")
        self._check_work(r)
        if r.price_per_unit > self.terms.max_price_per_unit:
            raise PriceOverMax(
                f"price per unit {r.price_per_unit} over the job's maximum "
                f"{self.terms.max_price_per_unit}"
            )
        digest = self.domain.digest(r)
        try:
            signer = recover_digest(digest, signed.signature)
        except SignatureError as exc:
            raise BadSignature(str(exc)) from None
        if signer != self.provider:
            raise BadSignature(f"signed by {to_checksum_address(signer)}, not by the provider")
        if r.step < self.next_step:
            earlier = self._by_step.get(r.step)
            proof = None if earlier is None else find_equivocation(self.domain, earlier, signed)
            what = "with another output (equivocation)" if proof else "again"
            raise StepReplayed(f"step {r.step} receipted {what}", proof)
        if r.step > self.next_step:
            raise StepSkipped(f"step {r.step} arrived, step {self.next_step} expected")
        if r.prev_receipt != self.last_digest:
            raise BrokenChain(f"step {r.step} does not link the previous receipt's digest")
        if r.input_hash != input_hash:
            raise InputMismatch(f"step {r.step}'s input hash is not that of the bytes sent")
        if r.output_hash != output_hash:
            raise OutputMismatch(f"step {r.step}'s output hash is not that of the bytes received")
        amount = r.amount
        self.budget.check(amount)
        self.budget.accepted += amount
        self.total += amount
        self.next_step += 1
        self.last_digest = digest
        self._by_step[r.step] = signed
        return AcceptedReceipt(signed, digest)

    def _check_work(self, r: Receipt) -> None:
        if self.model is not None and r.model != self.model:
            raise WrongWork("receipt is for another model")
        if self.layers is not None and (r.layer_start, r.layer_end) != self.layers:
            raise WrongWork(
                f"receipt is for layers [{r.layer_start}, {r.layer_end}), the session runs "
                f"[{self.layers[0]}, {self.layers[1]})"
            )
        if r.units == 0:
            raise WrongWork("a receipt of zero units")


@dataclass
class _Account:
    digests: list[bytes] = field(default_factory=list)
    index: dict[bytes, int] = field(default_factory=dict)
    tree: merkle.Accumulator = field(default_factory=merkle.Accumulator)
    amount: int = 0
    voucher: SignedVoucher | None = None
    vouched: int = 0  # how many digests the last voucher covers
    nonce: int = 0  # the nonce of the last voucher (also one issued before a `resume`)


class Acknowledger:
    """The payer's acknowledgements in one job: accepted receipts per provider, and vouchers.

    A voucher's root covers every receipt acknowledged to that provider so far; it is kept
    incrementally (`merkle.Accumulator`), so a voucher per receipt costs O(log n), not O(n).
    """

    def __init__(self, domain: Domain, job_id: bytes, payer: Signer) -> None:
        self.domain = domain
        self.job_id = job_id
        self.payer = payer
        self._accounts: dict[bytes, _Account] = {}

    def acknowledge(self, accepted: AcceptedReceipt) -> None:
        """Record a receipt a `ReceiptVerifier` accepted (once; a repeat is a ValueError)."""
        r = accepted.receipt
        if r.job_id != self.job_id:
            raise ValueError("receipt is for another job")
        account = self._accounts.setdefault(r.provider, _Account())
        if accepted.digest in account.index:
            raise ValueError("receipt acknowledged already")
        account.index[accepted.digest] = len(account.digests)
        account.digests.append(accepted.digest)
        account.tree.append(accepted.digest)
        account.amount += accepted.amount

    def resume(self, provider: bytes, cumulative: int, nonce: int) -> None:
        """Go on from a record kept elsewhere (the requester's job book, after a restart): the
        next voucher to `provider` adds to `cumulative` and has nonce `nonce + 1`. The receipts
        behind the record are not known here, so later roots cover only receipts acknowledged
        from now on (the earlier ones were paid against the roots of earlier vouchers)."""
        if provider in self._accounts:
            raise ValueError("this provider has acknowledgements here already")
        if cumulative < 0 or nonce < 0:
            raise ValueError("a cumulative amount and a nonce are never negative")
        self._accounts[provider] = _Account(amount=cumulative, nonce=nonce)

    def acknowledged(self, provider: bytes) -> int:
        """The cumulative amount acknowledged to `provider`."""
        account = self._accounts.get(provider)
        return 0 if account is None else account.amount

    def digests(self, provider: bytes) -> list[bytes]:
        account = self._accounts.get(provider)
        return [] if account is None else list(account.digests)

    def voucher(self, provider: bytes) -> SignedVoucher | None:
        """The latest voucher for `provider`: a new one (nonce + 1) when receipts were
        acknowledged since the last, else the last again; None when nothing was."""
        account = self._accounts.get(provider)
        if account is None or (account.voucher is None and not account.digests):
            return None  # nothing acknowledged (since a `resume`)
        if account.voucher is not None and account.vouched == len(account.digests):
            return account.voucher
        nonce = account.nonce + 1
        voucher = Voucher(
            job_id=self.job_id,
            provider=provider,
            cumulative_amount=account.amount,
            receipts_root=account.tree.root(),
            nonce=nonce,
        )
        account.voucher = SignedVoucher(voucher, self.payer.sign(self.domain, voucher))
        account.vouched = len(account.digests)
        account.nonce = nonce
        return account.voucher

    def proof(self, provider: bytes, digest: bytes) -> list[bytes]:
        """The Merkle proof of an acknowledged receipt under the root of the latest voucher
        (`JobEscrow.verifyReceipt`); KeyError when that voucher does not cover it."""
        account = self._accounts.get(provider)
        if account is None or digest not in account.index:
            raise KeyError("receipt not acknowledged")
        index = account.index[digest]
        if index >= account.vouched:
            raise KeyError("receipt acknowledged after the latest voucher")
        return merkle.proof(account.digests[: account.vouched], index)


class VoucherRefused(Exception):
    """A voucher the provider does not take; `reason`: foreign_job, wrong_provider,
    bad_signature or stale_voucher."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class VoucherBook:
    """The provider's vouchers of one job: the best one its payer signed, and what was settled.

    The root is not checked here (the provider does not know the order in which the requester
    acknowledged the receipts of several sessions); settlement needs only the payer's signature,
    and a receipt left out of the root can still be proven with the provider's own copy."""

    def __init__(self, domain: Domain, job_id: bytes, *, provider: bytes, payer: bytes) -> None:
        self.domain = domain
        self.job_id = job_id
        self.provider = provider
        self.payer = payer
        self.best: SignedVoucher | None = None
        self.settled_amount = 0
        self.settled_nonce = 0

    def offer(self, signed: SignedVoucher) -> None:
        """Take `signed` as the best voucher, or raise VoucherRefused."""
        v = signed.voucher
        if v.job_id != self.job_id:
            raise VoucherRefused("foreign_job", "voucher is for another job")
        if v.provider != self.provider:
            raise VoucherRefused("wrong_provider", "voucher pays another provider")
        try:
            signer = recover_digest(self.domain.digest(v), signed.signature)
        except SignatureError as exc:
            raise VoucherRefused("bad_signature", str(exc)) from None
        if signer != self.payer:
            raise VoucherRefused("bad_signature", "voucher not signed by the job's payer")
        best = self.best.voucher if self.best is not None else None
        floor_nonce = max(self.settled_nonce, best.nonce if best else 0)
        floor_amount = max(self.settled_amount, best.cumulative_amount if best else 0)
        if v.nonce <= floor_nonce or v.cumulative_amount < floor_amount:
            raise VoucherRefused(
                "stale_voucher",
                f"nonce {v.nonce} / amount {v.cumulative_amount} after nonce {floor_nonce} / "
                f"amount {floor_amount}",
            )
        self.best = signed

    @property
    def unsettled(self) -> int:
        """What settling the best voucher would pay (fee included)."""
        best = self.best.voucher.cumulative_amount if self.best is not None else 0
        return max(0, best - self.settled_amount)

    def to_settle(self) -> SignedVoucher | None:
        """The voucher to settle with, or None when it would pay nothing."""
        return self.best if self.unsettled > 0 else None

    def settled(self, signed: SignedVoucher) -> None:
        """Record a voucher the escrow accepted (from its Settled event)."""
        self.settled_amount = max(self.settled_amount, signed.voucher.cumulative_amount)
        self.settled_nonce = max(self.settled_nonce, signed.voucher.nonce)
