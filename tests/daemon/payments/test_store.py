"""The provider's payments store (HOME/payments.db) and the voucher protocol's messages."""

from __future__ import annotations

import stat

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.eip712 import Domain, SignedVoucher, Signer, Voucher, encode_signed_voucher
from contracts.receipts import ReceiptChain
from daemon.payments import wire
from daemon.payments.store import STORE_FILE, PaymentStore, earnings, earnings_history

DOMAIN = Domain(chain_id=131277322940537, verifying_contract=bytes(range(20)))
PAYER = Signer(bytes([1] * 32))
PROVIDER = Signer(bytes([2] * 32))
JOB = bytes([7] * 32)
OTHER_JOB = bytes([8] * 32)


def receipts(job: bytes, n: int, price: int = 3, session: str = "s1") -> list:
    chain = ReceiptChain(
        DOMAIN,
        PROVIDER,
        job_id=job,
        session_id=session,
        model_id="tiny",
        layer_start=0,
        layer_end=2,
        price_per_unit=price,
    )
    return [
        chain.sign_step(
            input_hash=bytes([i] * 32), output_hash=bytes([i + 1] * 32), tokens=i + 1, timestamp=5
        )
        for i in range(n)
    ]


def voucher(job: bytes, amount: int, nonce: int) -> SignedVoucher:
    v = Voucher(
        job_id=job,
        provider=PROVIDER.address,
        cumulative_amount=amount,
        receipts_root=bytes(32),
        nonce=nonce,
    )
    return SignedVoucher(v, PAYER.sign(DOMAIN, v))


def test_receipts_vouchers_and_settlements_survive_a_reopen(tmp_path):
    path = tmp_path / STORE_FILE
    store = PaymentStore(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    signed = receipts(JOB, 3) + receipts(OTHER_JOB, 1, price=10, session="s2")
    for r in signed:
        store.add_receipt(r, DOMAIN.digest(r.receipt))
    with pytest.raises(Exception):  # noqa: B017, PT011 - sqlite's IntegrityError: once only
        store.add_receipt(signed[0], DOMAIN.digest(signed[0].receipt))
    store.add_job(JOB, PAYER.address, 1234)
    store.put_voucher(voucher(JOB, 12, 1))
    store.put_voucher(voucher(JOB, 18, 2))
    store.record_settled(voucher(JOB, 12, 1))
    store.close()

    store = PaymentStore(path)
    assert store.job(JOB) == (PAYER.address, 1234) and store.job(OTHER_JOB) is None
    assert store.receipts(JOB) == signed[:3]
    account = store.account(JOB, PROVIDER.address)
    assert account is not None
    # units 2, 4, 6 (2 layers x 1, 2, 3 tokens) at 3 each
    assert (account.signed, account.receipts) == (36, 3)
    assert (account.acknowledged, account.settled, account.pending) == (18, 12, 6)
    assert account.voucher == voucher(JOB, 18, 2)
    other = store.account(OTHER_JOB, PROVIDER.address)
    assert other is not None and (other.signed, other.acknowledged, other.pending) == (20, 0, 0)
    assert [a.job_id for a in store.unsettled()] == [JOB]
    store.record_settled(voucher(JOB, 6, 1))  # an older settlement never lowers the mark
    store.record_settled(voucher(JOB, 18, 2))
    assert store.unsettled() == []
    store.close()

    rows = earnings(tmp_path)  # the home, or the file itself
    assert rows == earnings(path)
    assert rows[0] == {
        "job_id": "0x" + JOB.hex(),
        "provider": rows[0]["provider"],
        "receipts": 3,
        "signed": 36,
        "acknowledged": 18,
        "nonce": 2,
        "settled": 18,
        "pending": 0,
    }
    assert rows[0]["provider"].lower() == "0x" + PROVIDER.address.hex()
    assert rows[1]["job_id"] == "0x" + OTHER_JOB.hex() and rows[1]["signed"] == 20


def test_earnings_without_a_store_is_empty(tmp_path):
    assert earnings(tmp_path) == []
    assert not (tmp_path / STORE_FILE).exists()


def test_amounts_past_64_bits_are_kept_exactly(tmp_path):
    store = PaymentStore(tmp_path / STORE_FILE)
    big = (1 << 200) + 7
    store.put_voucher(voucher(JOB, big, 3))
    account = store.account(JOB, PROVIDER.address)
    assert account is not None and account.acknowledged == big and account.pending == big


# -- the voucher protocol --------------------------------------------------------------------


def test_an_offer_round_trips_and_replies_are_typed():
    signed = voucher(JOB, (1 << 100) + 1, 9)
    message = wire.decode(wire.offer(signed))
    assert isinstance(message, wire.Offer) and wire.voucher_of(message) == signed
    stored = wire.decode(wire.encode(wire.Stored(cumulative="18", nonce=2)))
    assert stored == wire.Stored(cumulative="18", nonce=2)
    refused = wire.decode(wire.encode(wire.Refused(code="stale_voucher", message="nonce 1")))
    assert isinstance(refused, wire.Refused) and refused.code == "stale_voucher"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\xc1", "malformed"),
        (msgspec.msgpack.encode({"op": "voucher"}), "bad_message"),
        (msgspec.msgpack.encode({"op": "pay", "voucher": b"x"}), "bad_message"),
        (msgspec.msgpack.encode({"op": "voucher", "voucher": b"x", "more": 1}), "bad_message"),
        (msgspec.msgpack.encode({"op": "voucher", "voucher": b"x" * 4097}), "bad_message"),
        (msgspec.msgpack.encode({"op": "stored", "cumulative": "-1", "nonce": 1}), "bad_message"),
        (msgspec.msgpack.encode({"op": "stored", "cumulative": "1", "nonce": -1}), "bad_message"),
        (b"\x00" * (wire.MAX_MESSAGE_BYTES + 1), "too_large"),
    ],
)
def test_bad_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(wire.VoucherWireError) as err:
        wire.decode(raw)
    assert err.value.reason == reason


def test_an_offer_of_a_malformed_voucher_is_refused():
    good = encode_signed_voucher(voucher(JOB, 5, 1))
    for bad in (b"\x91\x01", good[:-3], msgspec.msgpack.encode({"voucher": {}, "signature": b""})):
        with pytest.raises(wire.VoucherWireError):
            wire.voucher_of(wire.Offer(voucher=bad))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_the_decoder_raises_only_its_own_error(data):
    try:
        message = wire.decode(data)
        if isinstance(message, wire.Offer):
            wire.voucher_of(message)
    except wire.VoucherWireError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["op", "voucher", "cumulative", "nonce", "code", "message", "x"]),
        st.one_of(
            st.sampled_from(["voucher", "stored", "refused"]),
            st.integers(min_value=-(1 << 63), max_value=(1 << 64) - 1),
            st.binary(max_size=64),
            st.text(max_size=80),
            st.none(),
        ),
    )
)
def test_maps_of_any_shape_raise_only_the_decoders_error(obj):
    try:
        message = wire.decode(msgspec.msgpack.encode(obj))
        if isinstance(message, wire.Offer):
            wire.voucher_of(message)
    except wire.VoucherWireError:
        pass


def test_earnings_over_time_are_cumulative_bounded_and_exact(tmp_path, monkeypatch):
    """Receipts at their own times, a job's voucher and settlement at their latest: the
    history is cumulative, in time order, about `most` points at most, and exact past 64
    bits."""
    import daemon.payments.store as store_module

    clock = [1000.0]
    monkeypatch.setattr(store_module.time, "time", lambda: clock[0])
    assert earnings_history(tmp_path) == []
    store = PaymentStore(tmp_path / STORE_FILE)
    assert earnings_history(tmp_path) == []  # a store without a row yet
    signed = receipts(JOB, 3)  # 6, 12, 18
    for at, r in zip((1000.0, 1001.0, 2000.0), signed, strict=True):
        clock[0] = at
        store.add_receipt(r, DOMAIN.digest(r.receipt))
    clock[0] = 2500.0
    store.put_voucher(voucher(JOB, 36, 1))
    clock[0] = 3000.0
    store.record_settled(voucher(JOB, 24, 1))
    big = (1 << 200) + 7
    store.put_voucher(voucher(OTHER_JOB, big, 1))  # also at 3000
    store.close()

    history = earnings_history(tmp_path, most=10)
    assert 4 <= len(history) <= 11
    assert history[0] == {
        "at": 1001.0, "signed": 18, "acknowledged": 0, "settled": 0, "pending": 0
    }  # fmt: skip
    assert [p["at"] for p in history] == sorted(p["at"] for p in history)
    for key in ("signed", "acknowledged", "settled"):
        values = [p[key] for p in history]
        assert values == sorted(values), key
    assert history[-1] == {
        "at": 3000.0, "signed": 36, "acknowledged": 36 + big, "settled": 24, "pending": 12 + big
    }  # fmt: skip
    assert [p for p in history if p["at"] == 2500.0][0]["acknowledged"] == 36
    assert len(earnings_history(tmp_path, most=1)) <= 2
    with pytest.raises(ValueError):
        earnings_history(tmp_path, most=0)
