"""Receipts off chain: the provider's chain of signed receipts, the requester's checks (each
refusal with its reason), cumulative vouchers and equivocation proofs."""

from __future__ import annotations

import pytest
from msgspec.structs import asdict
from web3.logs import DISCARD

from contracts import eip712, merkle
from contracts.eip712 import Domain, SignedReceipt, Signer
from contracts.receipts import (
    Acknowledger,
    BadSignature,
    BrokenChain,
    Equivocation,
    ForeignJob,
    InputMismatch,
    JobBudget,
    JobTerms,
    OutputMismatch,
    OverDeposit,
    PriceOverMax,
    ReceiptChain,
    ReceiptRefused,
    ReceiptVerifier,
    StepReplayed,
    StepSkipped,
    VoucherBook,
    VoucherRefused,
    WrongProvider,
    WrongSession,
    WrongWork,
    activation_hash,
    find_equivocation,
    session_hash,
)

DOMAIN = Domain(131277322940537, b"\x5a" * 20)
JOB = b"\x01" * 32
PROVIDER = Signer(b"\x11" * 32)
OTHER = Signer(b"\x22" * 32)
PAYER = Signer(b"\x33" * 32)
PRICE = 5
LAYERS = (4, 8)  # 4 layers: a step of t tokens is 4 t units
TERMS = JobTerms(job_id=JOB, deposit=10_000, max_price_per_unit=10)


def chain(
    signer: Signer = PROVIDER, *, session: str = "s1", job: bytes = JOB, price: int = PRICE
) -> ReceiptChain:
    return ReceiptChain(
        DOMAIN,
        signer,
        job_id=job,
        session_id=session,
        model_id="tiny",
        layer_start=LAYERS[0],
        layer_end=LAYERS[1],
        price_per_unit=price,
    )


def verifier(
    *, session: str = "s1", terms: JobTerms = TERMS, budget: JobBudget | None = None
) -> ReceiptVerifier:
    return ReceiptVerifier(
        DOMAIN,
        terms,
        provider=PROVIDER.address,
        session_id=session,
        model_id="tiny",
        layers=LAYERS,
        budget=budget,
    )


def step_of(ch: ReceiptChain, n: int, *, tokens: int = 1, output: bytes | None = None):
    """(signed receipt, input hash, output hash) of the chain's next step."""
    inp = activation_hash(b"in %d" % n)
    out = output if output is not None else activation_hash(b"out %d" % n)
    signed = ch.sign_step(
        input_hash=inp, output_hash=out, tokens=tokens, timestamp=1_790_000_000 + n
    )
    return signed, inp, out


def resign(
    signed: SignedReceipt, signer: Signer = PROVIDER, domain: Domain = DOMAIN, **changes: object
) -> SignedReceipt:
    receipt = eip712.Receipt(**{**asdict(signed.receipt), **changes})
    return SignedReceipt(receipt, signer.sign(domain, receipt))


def refused(v: ReceiptVerifier, signed, inp, out, error: type[ReceiptRefused]) -> ReceiptRefused:
    state = (v.next_step, v.last_digest, v.total, v.budget.accepted)
    with pytest.raises(error) as caught:
        v.check(signed, input_hash=inp, output_hash=out)
    assert caught.value.reason == error.reason
    assert str(caught.value).startswith(error.reason + ": ")
    assert (v.next_step, v.last_digest, v.total, v.budget.accepted) == state  # nothing changed
    return caught.value


def test_a_good_chain_is_accepted_and_vouched() -> None:
    ch, v, ack = chain(), verifier(), Acknowledger(DOMAIN, JOB, PAYER)
    accepted = []
    for n in range(10):
        signed, inp, out = step_of(ch, n, tokens=n + 1)
        # it travels as msgpack to the requester
        arrived = eip712.decode_signed_receipt(eip712.encode_signed_receipt(signed))
        got = v.check(arrived, input_hash=inp, output_hash=out)
        assert got.receipt.step == n
        assert got.receipt.units == 4 * (n + 1) and got.amount == 4 * (n + 1) * PRICE
        assert got.receipt.prev_receipt == (accepted[-1].digest if accepted else bytes(32))
        assert got.digest == DOMAIN.digest(signed.receipt)
        ack.acknowledge(got)
        accepted.append(got)
    total = sum(4 * (n + 1) * PRICE for n in range(10))
    assert v.total == v.budget.accepted == ack.acknowledged(PROVIDER.address) == total
    signed_voucher = ack.voucher(PROVIDER.address)
    assert signed_voucher is not None
    voucher = signed_voucher.voucher
    assert (voucher.job_id, voucher.provider, voucher.cumulative_amount, voucher.nonce) == (
        JOB,
        PROVIDER.address,
        total,
        1,
    )
    assert eip712.recover(DOMAIN, voucher, signed_voucher.signature) == PAYER.address
    digests = [a.digest for a in accepted]
    assert voucher.receipts_root == merkle.root(digests)
    for d in digests:
        assert merkle.verify(ack.proof(PROVIDER.address, d), voucher.receipts_root, d)


def test_bad_signatures_are_refused() -> None:
    ch, v = chain(), verifier()
    signed, inp, out = step_of(ch, 0)
    by_other = resign(signed, OTHER)
    assert "not by the provider" in refused(v, by_other, inp, out, BadSignature).detail
    flipped = bytearray(signed.signature)
    flipped[5] ^= 1
    refused(v, SignedReceipt(signed.receipt, bytes(flipped)), inp, out, BadSignature)
    malformed = SignedReceipt(signed.receipt, signed.signature[:64] + b"\x01")
    assert "27 or 28" in refused(v, malformed, inp, out, BadSignature).detail
    # a field changed after signing: the signature no longer recovers the provider
    tampered = SignedReceipt(resign(signed, units=1000).receipt, signed.signature)
    refused(v, tampered, inp, out, BadSignature)
    v.check(signed, input_hash=inp, output_hash=out)  # the genuine one still goes through


def test_a_broken_hash_chain_is_refused() -> None:
    ch, v = chain(), verifier()
    first, inp, out = step_of(ch, 0)
    v.check(first, input_hash=inp, output_hash=out)
    second, inp, out = step_of(ch, 1)
    refused(v, resign(second, prev_receipt=b"\x07" * 32), inp, out, BrokenChain)
    refused(v, resign(second, prev_receipt=bytes(32)), inp, out, BrokenChain)
    # the first receipt of a session links nothing
    fresh = verifier(session="s2")
    other, inp0, out0 = step_of(chain(session="s2"), 0)
    refused(
        fresh,
        resign(other, prev_receipt=first.receipt.prev_receipt[:31] + b"\x01"),
        inp0,
        out0,
        BrokenChain,
    )
    v.check(second, input_hash=inp, output_hash=out)


def test_replayed_and_skipped_steps_are_refused() -> None:
    ch, v = chain(), verifier()
    first, inp, out = step_of(ch, 0)
    v.check(first, input_hash=inp, output_hash=out)
    error = refused(v, first, inp, out, StepReplayed)
    assert isinstance(error, StepReplayed) and error.equivocation is None  # the same receipt
    second, inp1, out1 = step_of(ch, 1)
    third, inp2, out2 = step_of(ch, 2)
    assert "step 1 expected" in refused(v, third, inp2, out2, StepSkipped).detail
    v.check(second, input_hash=inp1, output_hash=out1)
    v.check(third, input_hash=inp2, output_hash=out2)


def test_a_replayed_step_with_another_output_is_equivocation() -> None:
    ch, v = chain(), verifier()
    first, inp, out = step_of(ch, 0)
    v.check(first, input_hash=inp, output_hash=out)
    second, inp1, out1 = step_of(ch, 1)
    v.check(second, input_hash=inp1, output_hash=out1)
    liar = resign(first, output_hash=activation_hash(b"something else"))
    error = refused(v, liar, inp, liar.receipt.output_hash, StepReplayed)
    assert isinstance(error, StepReplayed)
    assert error.equivocation == Equivocation(first, liar)
    assert "equivocation" in error.detail
    a, sig_a, b, sig_b = error.equivocation.call_args()
    assert a == first.receipt.abi_tuple() and sig_a == first.signature
    assert b == liar.receipt.abi_tuple() and sig_b == liar.signature
    assert a[6] == b[6] == 0 and a[8] != b[8]  # step, outputHash in the struct's order


def test_find_equivocation_only_for_real_conflicts() -> None:
    ch = chain()
    a, _, _ = step_of(ch, 0)
    b = resign(a, output_hash=b"\x09" * 32)
    assert find_equivocation(DOMAIN, a, b) == Equivocation(a, b)
    assert find_equivocation(DOMAIN, a, resign(a, timestamp=1)) is None  # same output
    assert find_equivocation(DOMAIN, a, resign(b, step=1)) is None
    assert find_equivocation(DOMAIN, a, resign(b, session=session_hash("s9"))) is None
    assert find_equivocation(DOMAIN, a, resign(b, job_id=b"\x02" * 32)) is None
    # a receipt "of" the provider signed by somebody else proves nothing
    assert find_equivocation(DOMAIN, a, resign(b, OTHER)) is None
    forged_sig = SignedReceipt(b.receipt, a.signature)
    assert find_equivocation(DOMAIN, a, forged_sig) is None
    # another domain (chain or escrow): the signatures do not recover the provider here
    elsewhere = Domain(31337, DOMAIN.verifying_contract)
    assert find_equivocation(elsewhere, a, b) is None


def test_foreign_job_session_provider_and_work_are_refused() -> None:
    v = verifier()
    signed, inp, out = step_of(chain(job=b"\x02" * 32), 0)
    refused(v, signed, inp, out, ForeignJob)
    signed, inp, out = step_of(chain(session="other"), 0)
    refused(v, signed, inp, out, WrongSession)
    signed, inp, out = step_of(chain(OTHER), 0)
    assert "the session runs on" in refused(v, signed, inp, out, WrongProvider).detail
    signed, inp, out = step_of(chain(), 0)
    refused(v, resign(signed, model=b"\x00" * 32), inp, out, WrongWork)
    refused(v, resign(signed, layer_end=9), inp, out, WrongWork)
    refused(v, resign(signed, units=0), inp, out, WrongWork)


def test_input_and_output_must_be_what_was_sent_and_received() -> None:
    v = verifier()
    signed, inp, out = step_of(chain(), 0)
    refused(v, signed, activation_hash(b"what I sent"), out, InputMismatch)
    refused(v, signed, inp, activation_hash(b"what I got"), OutputMismatch)
    v.check(signed, input_hash=inp, output_hash=out)


def test_a_price_over_the_maximum_is_refused() -> None:
    v = verifier()
    signed, inp, out = step_of(chain(price=11), 0)
    assert "maximum 10" in refused(v, signed, inp, out, PriceOverMax).detail
    signed, inp, out = step_of(chain(price=10), 0)
    v.check(signed, input_hash=inp, output_hash=out)  # at the maximum is fine


def test_amounts_over_the_deposit_are_refused_across_sessions() -> None:
    terms = JobTerms(job_id=JOB, deposit=100, max_price_per_unit=10)
    budget = JobBudget(terms.deposit)
    v1, v2 = (
        verifier(terms=terms, budget=budget),
        verifier(session="s2", terms=terms, budget=budget),
    )
    c1, c2 = chain(), chain(session="s2")
    signed, inp, out = step_of(c1, 0, tokens=3)  # 4 layers x 3 tokens x 5 = 60
    v1.check(signed, input_hash=inp, output_hash=out)
    signed, inp, out = step_of(c2, 0, tokens=2)  # 40: exactly the deposit
    v2.check(signed, input_hash=inp, output_hash=out)
    assert budget.accepted == 100
    signed, inp, out = step_of(c1, 1, tokens=1)  # 20 more
    assert "over its deposit of 100" in refused(v1, signed, inp, out, OverDeposit).detail
    lone = verifier(terms=JobTerms(job_id=JOB, deposit=19, max_price_per_unit=10))
    signed, inp, out = step_of(chain(), 0)
    refused(lone, signed, inp, out, OverDeposit)


def test_vouchers_are_cumulative_and_monotonic() -> None:
    ch, v, ack = chain(), verifier(), Acknowledger(DOMAIN, JOB, PAYER)
    assert ack.voucher(PROVIDER.address) is None
    seen, digests = [], []
    for batch in range(3):
        for n in range(batch * 4, batch * 4 + 4):
            signed, inp, out = step_of(ch, n)
            accepted = v.check(signed, input_hash=inp, output_hash=out)
            ack.acknowledge(accepted)
            digests.append(accepted.digest)
        signed_voucher = ack.voucher(PROVIDER.address)
        assert signed_voucher is not None
        assert ack.voucher(PROVIDER.address) == signed_voucher  # nothing new: the same one
        voucher = signed_voucher.voucher
        assert voucher.nonce == batch + 1
        assert voucher.cumulative_amount == len(digests) * 4 * PRICE
        assert voucher.receipts_root == merkle.root(digests)
        assert eip712.recover(DOMAIN, voucher, signed_voucher.signature) == PAYER.address
        seen.append(voucher)
    assert [s.nonce for s in seen] == [1, 2, 3]
    assert seen[0].cumulative_amount < seen[1].cumulative_amount < seen[2].cumulative_amount
    assert ack.digests(PROVIDER.address) == digests
    # a receipt acknowledged after the latest voucher has no proof under its root yet
    signed, inp, out = step_of(ch, 12)
    late = v.check(signed, input_hash=inp, output_hash=out)
    ack.acknowledge(late)
    with pytest.raises(KeyError):
        ack.proof(PROVIDER.address, late.digest)
    with pytest.raises(ValueError, match="already"):
        ack.acknowledge(late)
    assert ack.voucher(PROVIDER.address).voucher.nonce == 4  # type: ignore[union-attr]
    assert merkle.verify(
        ack.proof(PROVIDER.address, late.digest), merkle.root(digests + [late.digest]), late.digest
    )


def test_vouchers_resume_from_a_record_after_a_restart() -> None:
    """A requester restarted with its job book's record (cumulative 5000, nonce 7) goes on:
    nothing to send until a receipt arrives, then nonce 8 over 5000 plus the new amount, signed,
    with a root over the receipts acknowledged since."""
    ch, v, ack = chain(), verifier(), Acknowledger(DOMAIN, JOB, PAYER)
    ack.resume(PROVIDER.address, 5000, 7)
    assert ack.voucher(PROVIDER.address) is None  # no placeholder ever leaves
    assert ack.acknowledged(PROVIDER.address) == 5000
    signed, inp, out = step_of(ch, 0)
    accepted = v.check(signed, input_hash=inp, output_hash=out)
    ack.acknowledge(accepted)
    signed_voucher = ack.voucher(PROVIDER.address)
    assert signed_voucher is not None
    voucher = signed_voucher.voucher
    assert voucher.nonce == 8
    assert voucher.cumulative_amount == 5000 + accepted.amount
    assert voucher.receipts_root == merkle.root([accepted.digest])
    assert eip712.recover(DOMAIN, voucher, signed_voucher.signature) == PAYER.address
    with pytest.raises(ValueError, match="already"):
        ack.resume(PROVIDER.address, 0, 0)
    with pytest.raises(ValueError, match="negative"):
        Acknowledger(DOMAIN, JOB, PAYER).resume(PROVIDER.address, -1, 0)


def test_vouchers_are_per_provider_and_per_job() -> None:
    ack = Acknowledger(DOMAIN, JOB, PAYER)
    other_v = ReceiptVerifier(DOMAIN, TERMS, provider=OTHER.address, session_id="s1")
    for signer, v in ((PROVIDER, verifier()), (OTHER, other_v)):
        signed, inp, out = step_of(chain(signer), 0, tokens=2 if signer is OTHER else 1)
        ack.acknowledge(v.check(signed, input_hash=inp, output_hash=out))
    mine, theirs = ack.voucher(PROVIDER.address), ack.voucher(OTHER.address)
    assert mine is not None and theirs is not None
    assert (mine.voucher.cumulative_amount, theirs.voucher.cumulative_amount) == (20, 40)
    assert mine.voucher.nonce == theirs.voucher.nonce == 1
    foreign_ack = Acknowledger(DOMAIN, b"\x02" * 32, PAYER)
    signed, inp, out = step_of(chain(), 0)
    with pytest.raises(ValueError, match="another job"):
        foreign_ack.acknowledge(verifier().check(signed, input_hash=inp, output_hash=out))


def test_the_provider_chain_never_signs_a_step_twice() -> None:
    ch = chain()
    receipts = [step_of(ch, n, tokens=3)[0] for n in range(3)]
    assert [r.receipt.step for r in receipts] == [0, 1, 2]
    assert receipts[1].receipt.prev_receipt == DOMAIN.digest(receipts[0].receipt)
    assert all(r.receipt.units == 12 and r.receipt.amount == 60 for r in receipts)
    with pytest.raises(ValueError, match="token"):
        ch.sign_step(input_hash=bytes(32), output_hash=bytes(32), tokens=0, timestamp=0)
    with pytest.raises(ValueError, match="empty"):
        ReceiptChain(
            DOMAIN,
            PROVIDER,
            job_id=JOB,
            session_id="s",
            model_id="m",
            layer_start=3,
            layer_end=3,
            price_per_unit=1,
        )


def test_the_provider_keeps_the_best_voucher_of_its_payer() -> None:
    ch, v, ack = chain(), verifier(), Acknowledger(DOMAIN, JOB, PAYER)
    book = VoucherBook(DOMAIN, JOB, provider=PROVIDER.address, payer=PAYER.address)
    assert book.to_settle() is None and book.unsettled == 0
    vouchers = []
    for n in range(3):
        signed, inp, out = step_of(ch, n)
        ack.acknowledge(v.check(signed, input_hash=inp, output_hash=out))
        voucher = ack.voucher(PROVIDER.address)
        assert voucher is not None
        # it travels as msgpack to the provider
        vouchers.append(eip712.decode_signed_voucher(eip712.encode_signed_voucher(voucher)))
    book.offer(vouchers[0])
    book.offer(vouchers[2])
    assert book.to_settle() == vouchers[2] and book.unsettled == 60

    def refusal(signed: eip712.SignedVoucher) -> str:
        with pytest.raises(VoucherRefused) as caught:
            book.offer(signed)
        assert book.best == vouchers[2]
        return caught.value.reason

    assert refusal(vouchers[1]) == "stale_voucher"
    assert refusal(vouchers[2]) == "stale_voucher"

    def signed_by(signer: Signer, **changes: object) -> eip712.SignedVoucher:
        voucher = eip712.Voucher(**{**asdict(vouchers[2].voucher), "nonce": 9, **changes})
        return eip712.SignedVoucher(voucher, signer.sign(DOMAIN, voucher))

    assert refusal(signed_by(OTHER)) == "bad_signature"
    assert refusal(signed_by(PAYER, cumulative_amount=59)) == "stale_voucher"
    assert refusal(signed_by(PAYER, job_id=b"\x02" * 32)) == "foreign_job"
    assert refusal(signed_by(PAYER, provider=OTHER.address)) == "wrong_provider"
    bad_sig = eip712.SignedVoucher(vouchers[2].voucher, vouchers[2].signature[:64] + b"\x00")
    assert refusal(bad_sig) == "bad_signature"
    book.settled(vouchers[2])
    assert book.to_settle() is None and book.unsettled == 0
    book.offer(signed_by(PAYER, cumulative_amount=80))
    assert book.unsettled == 20


# -- on chain: the same digests, roots, proofs and equivocation proofs as JobEscrow's ------------


class Escrow:
    """The contracts on an in-process eth-tester chain, a staked provider and a funded payer."""

    MIN_STAKE = 1_000
    FUNDS = 10**12

    def __init__(self) -> None:
        from eth_account import Account
        from eth_tester import EthereumTester, PyEVMBackend
        from web3 import EthereumTesterProvider, Web3

        from contracts import artifacts, deployment

        backend = PyEVMBackend()
        self.w3 = Web3(EthereumTesterProvider(EthereumTester(backend)))
        self.keys = [k.to_hex() for k in backend.account_keys[:5]]
        self.send = deployment.send
        self.accounts = [Account.from_key(k) for k in self.keys]
        self.d = deployment.deploy_all(
            self.w3, self.keys[0], min_stake=self.MIN_STAKE, unbonding_delay_s=60, half_life_s=3600
        )

        def contract(name: str, address: str):
            return self.w3.eth.contract(address=address, abi=artifacts.load(name).abi)

        self.token = contract("TestUSD", self.d.token)
        self.providers = contract("ProviderRegistry", self.d.providers)
        self.escrow = contract("JobEscrow", self.d.escrow)
        self.domain = Domain(self.w3.eth.chain_id, eip712.address_from_hex(self.d.escrow))
        self.payer = self.accounts[1]
        self.payer_signer = Signer(self.keys[1])
        self.fund(self.payer, self.d.escrow)
        self.jobs = 0

    def fund(self, account, spender: str) -> None:
        self.send(self.w3, account, self.token.functions.mint(account.address, self.FUNDS))
        approve = self.token.functions.approve(spender, self.FUNDS)
        self.send(self.w3, account, approve)

    def stake(self, index: int) -> Signer:
        account = self.accounts[index]
        self.fund(account, self.d.providers)
        self.send(self.w3, account, self.providers.functions.register(b"peer %d" % index))
        self.send(self.w3, account, self.providers.functions.stake(self.MIN_STAKE))
        assert self.providers.functions.isActive(account.address).call()
        return Signer(self.keys[index])

    def deposit(self, amount: int, max_price: int) -> bytes:
        self.jobs += 1
        job = eip712.keccak(b"job %d" % self.jobs)
        deadline = self.w3.eth.get_block("latest")["timestamp"] + 3600
        call = self.escrow.functions.deposit(job, amount, max_price, deadline)
        self.send(self.w3, self.payer, call)
        return job

    def settle(self, signed: eip712.SignedVoucher, by: int = 2) -> dict:
        call = self.escrow.functions.settle(signed.voucher.abi_tuple(), signed.signature)
        receipt = self.send(self.w3, self.accounts[by], call)
        (event,) = self.escrow.events.Settled().process_receipt(receipt, errors=DISCARD)
        return dict(event["args"])

    def verify(self, job: bytes, provider: bytes, digest: bytes, proof: list[bytes]) -> bool:
        address = eip712.to_checksum_address(provider)
        return self.escrow.functions.verifyReceipt(job, address, digest, proof).call()


@pytest.fixture(scope="module")
def onchain() -> Escrow:
    return Escrow()


def test_the_contract_hashes_receipts_and_vouchers_as_we_do(onchain: Escrow) -> None:
    d = onchain.domain
    ch = ReceiptChain(
        d,
        PROVIDER,
        job_id=JOB,
        session_id="s",
        model_id="m",
        layer_start=0,
        layer_end=2**32 - 1,
        price_per_unit=2**256 - 1,
    )
    for n in range(3):
        signed, _, _ = step_of(ch, n, tokens=n + 1)
        receipt = signed.receipt
        assert onchain.escrow.functions.hashReceipt(receipt.abi_tuple()).call() == d.digest(receipt)
    voucher = eip712.Voucher(
        job_id=JOB,
        provider=OTHER.address,
        cumulative_amount=2**255 + 7,
        receipts_root=b"\x42" * 32,
        nonce=2**64 - 1,
    )
    assert onchain.escrow.functions.hashVoucher(voucher.abi_tuple()).call() == d.digest(voucher)


def test_vouchers_settle_and_receipts_prove_against_the_recorded_root(onchain: Escrow) -> None:
    provider = onchain.stake(2)
    d, price = onchain.domain, 7
    job = onchain.deposit(amount=100_000, max_price=price)
    terms = JobTerms(job_id=job, deposit=100_000, max_price_per_unit=price)
    ch = ReceiptChain(
        d,
        provider,
        job_id=job,
        session_id="s",
        model_id="m",
        layer_start=0,
        layer_end=3,
        price_per_unit=price,
    )
    v = ReceiptVerifier(d, terms, provider=provider.address, session_id="s", model_id="m")
    ack = Acknowledger(d, job, onchain.payer_signer)
    book = VoucherBook(d, job, provider=provider.address, payer=onchain.payer_signer.address)
    balance = onchain.token.functions.balanceOf
    address = eip712.to_checksum_address(provider.address)
    paid, digests, vouchers = 0, [], []
    for batch in (5, 12):
        for _ in range(batch):
            signed, inp, out = step_of(ch, ch.next_step, tokens=2)
            accepted = v.check(signed, input_hash=inp, output_hash=out)
            ack.acknowledge(accepted)
            digests.append(accepted.digest)
        book.offer(ack.voucher(provider.address))  # type: ignore[arg-type]
        signed_voucher = book.to_settle()
        assert signed_voucher is not None
        vouchers.append(signed_voucher)
        before = balance(address).call()
        event = onchain.settle(signed_voucher)
        delta = signed_voucher.voucher.cumulative_amount - paid
        assert event["delta"] == delta and event["fee"] == delta * 100 // 10_000
        assert (event["receiptsRoot"], event["nonce"]) == (merkle.root(digests), len(vouchers))
        assert balance(address).call() - before == delta - delta * 100 // 10_000
        book.settled(signed_voucher)
        paid = signed_voucher.voucher.cumulative_amount
        assert paid == len(digests) * 3 * 2 * price and book.to_settle() is None
        for digest in digests:
            proof = ack.proof(provider.address, digest)
            assert onchain.verify(job, provider.address, digest, proof)
            assert not onchain.verify(job, provider.address, eip712.keccak(digest), proof)
    # the same or an older voucher pays nothing: the contract refuses it (StaleVoucher)
    state = (balance(address).call(), onchain.escrow.functions.paid(job, address).call())
    assert state[1] == paid
    for old in vouchers:
        with pytest.raises(Exception, match="revert"):
            onchain.settle(old)
    assert (balance(address).call(), onchain.escrow.functions.paid(job, address).call()) == state


# trees whose every leaf is checked on chain (odd and even levels, promotions at several
# heights); of the other sizes the first, a middle and the last leaf (each call costs ~10 ms)
EVERY_LEAF = {1, 2, 3, 4, 5, 6, 7, 8, 9, 16, 17, 31, 33}


def test_openzeppelin_merkle_proofs_agree_for_trees_of_1_to_33(onchain: Escrow) -> None:
    """Trees of 1..33 leaves, each recorded on chain by a settlement: our proofs of its leaves
    verify through JobEscrow.verifyReceipt (OpenZeppelin's MerkleProof); a truncated proof, or
    a leaf of the previous tree, does not."""
    provider = onchain.stake(3)
    job = onchain.deposit(amount=10_000, max_price=1)
    address = eip712.to_checksum_address(provider.address)
    previous: list[bytes] = []
    for n in range(1, 34):
        leaves = [eip712.keccak(b"%d/%d" % (n, i)) for i in range(n)]
        root = merkle.root(leaves)
        voucher = eip712.Voucher(
            job_id=job, provider=provider.address, cumulative_amount=n, receipts_root=root, nonce=n
        )
        signature = onchain.payer_signer.sign(onchain.domain, voucher)
        onchain.settle(eip712.SignedVoucher(voucher, signature))
        assert onchain.escrow.functions.rootOf(job, address).call() == root
        indexes = range(n) if n in EVERY_LEAF else sorted({0, n // 2, n - 1})
        for i in indexes:
            proof = merkle.proof(leaves, i)
            assert onchain.verify(job, provider.address, leaves[i], proof), (n, i)
            if n > 1 and i in (0, n - 1):
                assert not onchain.verify(job, provider.address, leaves[i], proof[:-1])
        if previous:
            assert not onchain.verify(
                job, provider.address, previous[-1], merkle.proof(previous, len(previous) - 1)
            )
        previous = leaves


def test_an_equivocation_found_off_chain_slashes_on_chain(onchain: Escrow) -> None:
    provider = onchain.stake(4)
    d = onchain.domain
    job = onchain.deposit(amount=1_000, max_price=1)
    ch = ReceiptChain(
        d,
        provider,
        job_id=job,
        session_id="s",
        model_id="m",
        layer_start=0,
        layer_end=1,
        price_per_unit=1,
    )
    honest, _, _ = step_of(ch, 0)
    liar = resign(honest, provider, d, output_hash=b"\x66" * 32)
    assert find_equivocation(d, honest, resign(honest, provider, d, timestamp=5)) is None
    proof = find_equivocation(d, honest, liar)
    assert proof is not None
    call = onchain.escrow.functions.reportEquivocation(*proof.call_args())
    receipt = onchain.send(onchain.w3, onchain.payer, call)
    (event,) = onchain.escrow.events.EquivocationReported().process_receipt(receipt, errors=DISCARD)
    assert event["args"]["slashed"] == Escrow.MIN_STAKE
    address = eip712.to_checksum_address(provider.address)
    assert not onchain.providers.functions.isActive(address).call()
