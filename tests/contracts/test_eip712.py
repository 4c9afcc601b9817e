"""EIP-712 receipts and vouchers: our fast digests and signatures against eth-account's, and the
bounded decoding of receipts from untrusted peers."""

from __future__ import annotations

import contextlib

import msgpack
import pytest
from eth_account import Account
from eth_account.messages import _hash_eip191_message, encode_typed_data
from eth_utils import to_checksum_address as eth_checksum
from hypothesis import given
from hypothesis import strategies as st

from contracts import eip712
from contracts.eip712 import (
    Domain,
    Receipt,
    SignatureError,
    SignedReceipt,
    Signer,
    Voucher,
    WireFormatError,
)
from p2p.identity import NodeIdentity

ETH_TESTER_CHAIN_ID = 131277322940537
KEY_A = bytes.fromhex("4c0883a69102937d6231471b5dbb6204fe5129617082792ae468d01a3f362318")
KEY_B = bytes(31) + b"\x07"

# The types as issue14.md gives them, written out independently of contracts/eip712.py.
DOMAIN_FIELDS = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
RECEIPT_FIELDS = [
    {"name": "jobId", "type": "bytes32"},
    {"name": "provider", "type": "address"},
    {"name": "model", "type": "bytes32"},
    {"name": "layerStart", "type": "uint32"},
    {"name": "layerEnd", "type": "uint32"},
    {"name": "session", "type": "bytes32"},
    {"name": "step", "type": "uint64"},
    {"name": "inputHash", "type": "bytes32"},
    {"name": "outputHash", "type": "bytes32"},
    {"name": "units", "type": "uint64"},
    {"name": "pricePerUnit", "type": "uint256"},
    {"name": "prevReceipt", "type": "bytes32"},
    {"name": "timestamp", "type": "uint64"},
]
VOUCHER_FIELDS = [
    {"name": "jobId", "type": "bytes32"},
    {"name": "provider", "type": "address"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "receiptsRoot", "type": "bytes32"},
    {"name": "nonce", "type": "uint64"},
]

b32 = st.binary(min_size=32, max_size=32)
b20 = st.binary(min_size=20, max_size=20)
u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)
u256 = st.integers(0, 2**256 - 1)
domains = st.builds(
    Domain, chain_id=st.one_of(st.just(ETH_TESTER_CHAIN_ID), u256), verifying_contract=b20
)
receipts = st.builds(
    Receipt,
    job_id=b32,
    provider=b20,
    model=b32,
    layer_start=u32,
    layer_end=u32,
    session=b32,
    step=u64,
    input_hash=b32,
    output_hash=b32,
    units=u64,
    price_per_unit=u256,
    prev_receipt=b32,
    timestamp=u64,
)
vouchers = st.builds(
    Voucher, job_id=b32, provider=b20, cumulative_amount=u256, receipts_root=b32, nonce=u64
)


def full_message(domain: Domain, message: Receipt | Voucher) -> dict:
    """The eth-account form, built field by field from the spec's names."""
    if isinstance(message, Receipt):
        primary, fields = "Receipt", RECEIPT_FIELDS
        values = {
            "jobId": message.job_id,
            "provider": eth_checksum(message.provider),
            "model": message.model,
            "layerStart": message.layer_start,
            "layerEnd": message.layer_end,
            "session": message.session,
            "step": message.step,
            "inputHash": message.input_hash,
            "outputHash": message.output_hash,
            "units": message.units,
            "pricePerUnit": message.price_per_unit,
            "prevReceipt": message.prev_receipt,
            "timestamp": message.timestamp,
        }
    else:
        primary, fields = "Voucher", VOUCHER_FIELDS
        values = {
            "jobId": message.job_id,
            "provider": eth_checksum(message.provider),
            "cumulativeAmount": message.cumulative_amount,
            "receiptsRoot": message.receipts_root,
            "nonce": message.nonce,
        }
    return {
        "types": {"EIP712Domain": DOMAIN_FIELDS, primary: fields},
        "primaryType": primary,
        "domain": {
            "name": "gridmesh",
            "version": "1",
            "chainId": domain.chain_id,
            "verifyingContract": eth_checksum(domain.verifying_contract),
        },
        "message": values,
    }


def eth_digest(domain: Domain, message: Receipt | Voucher) -> bytes:
    return _hash_eip191_message(encode_typed_data(full_message=full_message(domain, message)))


def sample_receipt(**changes: object) -> Receipt:
    fields = dict(
        job_id=b"\x01" * 32,
        provider=Signer(KEY_A).address,
        model=eip712.keccak(b"tiny-llama"),
        layer_start=0,
        layer_end=4,
        session=eip712.keccak(b"session-1"),
        step=0,
        input_hash=eip712.keccak(b"in"),
        output_hash=eip712.keccak(b"out"),
        units=4 * 7,
        price_per_unit=3,
        prev_receipt=bytes(32),
        timestamp=1_790_000_000,
    )
    fields.update(changes)
    return Receipt(**fields)


DOMAIN = Domain(ETH_TESTER_CHAIN_ID, bytes.fromhex("f2e246bb76df876cef8b38ae84130f4f55de395b"))


# -- digests -----------------------------------------------------------------------------


@given(domains, receipts)
def test_receipt_digest_equals_eth_account(domain: Domain, receipt: Receipt) -> None:
    assert domain.digest(receipt) == eth_digest(domain, receipt)


@given(domains, vouchers)
def test_voucher_digest_equals_eth_account(domain: Domain, voucher: Voucher) -> None:
    assert domain.digest(voucher) == eth_digest(domain, voucher)


def test_type_strings_are_the_spec() -> None:
    assert eip712.RECEIPT_TYPE == (
        "Receipt(bytes32 jobId,address provider,bytes32 model,uint32 layerStart,uint32 layerEnd,"
        "bytes32 session,uint64 step,bytes32 inputHash,bytes32 outputHash,uint64 units,"
        "uint256 pricePerUnit,bytes32 prevReceipt,uint64 timestamp)"
    )
    assert eip712.VOUCHER_TYPE == (
        "Voucher(bytes32 jobId,address provider,uint256 cumulativeAmount,bytes32 receiptsRoot,"
        "uint64 nonce)"
    )


def test_domain_binds_chain_and_contract() -> None:
    receipt = sample_receipt()
    other_chain = Domain(31337, DOMAIN.verifying_contract)
    other_contract = Domain(DOMAIN.chain_id, b"\x02" * 20)
    digests = {d.digest(receipt) for d in (DOMAIN, other_chain, other_contract)}
    assert len(digests) == 3


@given(b20)
def test_checksum_address_equals_eth_utils(address: bytes) -> None:
    text = eip712.to_checksum_address(address)
    assert text == eth_checksum(address)
    assert eip712.address_from_hex(text) == address


# -- signatures --------------------------------------------------------------------------


@given(domains, receipts)
def test_our_signatures_recover_with_eth_account(domain: Domain, receipt: Receipt) -> None:
    signer = Signer(KEY_A)
    signature = signer.sign(domain, receipt)
    assert len(signature) == 65 and signature[64] in (27, 28)
    assert int.from_bytes(signature[32:64], "big") <= eip712.SECP256K1_N // 2
    expected = Account.from_key(KEY_A).address
    assert Account._recover_hash(domain.digest(receipt), signature=signature) == expected
    signable = encode_typed_data(full_message=full_message(domain, receipt))
    assert Account.recover_message(signable, signature=signature) == expected
    assert eip712.recover(domain, receipt, signature) == signer.address


@given(domains, vouchers)
def test_eth_account_signatures_recover_with_ours(domain: Domain, voucher: Voucher) -> None:
    signed = Account.sign_typed_data(KEY_B, full_message=full_message(domain, voucher))
    assert eip712.recover(domain, voucher, bytes(signed.signature)) == Signer(KEY_B).address


def test_signer_address_is_eth_accounts() -> None:
    assert eip712.to_checksum_address(Signer(KEY_A).address) == Account.from_key(KEY_A).address
    assert Signer("0x" + KEY_A.hex()).address == Signer(KEY_A).address
    # a node signs receipts with its payout key: the address its identity binds to its peer id
    ident = NodeIdentity.generate()
    assert eip712.to_checksum_address(Signer(ident.payout_key).address) == ident.payout_address
    with pytest.raises(ValueError, match="32 bytes"):
        Signer(b"\x01" * 31)


def test_wrong_domain_field_or_signer_recovers_another_address() -> None:
    signer = Signer(KEY_A)
    receipt = sample_receipt()
    signature = signer.sign(DOMAIN, receipt)
    assert eip712.recover(DOMAIN, receipt, signature) == signer.address
    wrong = [
        eip712.recover(Domain(31337, DOMAIN.verifying_contract), receipt, signature),
        eip712.recover(Domain(DOMAIN.chain_id, b"\x09" * 20), receipt, signature),
        eip712.recover(DOMAIN, sample_receipt(step=1), signature),
        eip712.recover(DOMAIN, sample_receipt(output_hash=b"\x00" * 32), signature),
        eip712.recover(DOMAIN, sample_receipt(price_per_unit=4), signature),
    ]
    assert signer.address not in wrong
    assert eip712.recover(DOMAIN, receipt, Signer(KEY_B).sign(DOMAIN, receipt)) != signer.address


def test_malformed_signatures_are_refused() -> None:
    receipt = sample_receipt()
    signature = Signer(KEY_A).sign(DOMAIN, receipt)
    r, s, v = signature[:32], int.from_bytes(signature[32:64], "big"), signature[64]
    high_s = r + (eip712.SECP256K1_N - s).to_bytes(32, "big") + bytes((55 - v,))
    # the high-s twin is a valid ECDSA signature of the same key: OpenZeppelin refuses it
    assert Account._recover_hash(DOMAIN.digest(receipt), signature=high_s)
    bad = {
        "short": signature[:64],
        "long": signature + b"\x00",
        "v is 0": signature[:64] + b"\x00",
        "v is 29": signature[:64] + b"\x1d",
        "high s": high_s,
        "zero r": bytes(32) + signature[32:],
        "r at n": eip712.SECP256K1_N.to_bytes(32, "big") + signature[32:],
        "not bytes": signature.hex(),
    }
    for name, sig in bad.items():
        with pytest.raises(SignatureError):
            eip712.recover(DOMAIN, receipt, sig)  # type: ignore[arg-type]
            pytest.fail(f"accepted a signature with {name}")


# -- field validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("job_id", b"\x01" * 31),
        ("job_id", "0x" + "01" * 32),
        ("provider", b"\x01" * 32),
        ("layer_start", 2**32),
        ("layer_end", -1),
        ("step", 2**64),
        ("units", True),
        ("units", 1.0),
        ("price_per_unit", 2**256),
        ("prev_receipt", bytearray(32)),
        ("timestamp", None),
    ],
)
def test_receipt_fields_are_bounded(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        sample_receipt(**{field: value})


def test_receipt_bounds_are_inclusive() -> None:
    receipt = sample_receipt(
        layer_start=2**32 - 1, step=2**64 - 1, units=2**64 - 1, price_per_unit=2**256 - 1
    )
    assert receipt.amount == (2**64 - 1) * (2**256 - 1)
    with pytest.raises(ValueError, match="nonce"):
        Voucher(
            job_id=bytes(32),
            provider=bytes(20),
            cumulative_amount=0,
            receipts_root=bytes(32),
            nonce=2**64,
        )


def test_domain_is_validated() -> None:
    with pytest.raises(ValueError, match="verifying_contract"):
        Domain(1, b"\x01" * 19)
    with pytest.raises(ValueError, match="chain_id"):
        Domain(-1, b"\x01" * 20)


# -- the wire ----------------------------------------------------------------------------


@given(receipts)
def test_wire_round_trips(receipt: Receipt) -> None:
    signed = SignedReceipt(receipt, Signer(KEY_A).sign(DOMAIN, receipt))
    assert eip712.decode_signed_receipt(eip712.encode_signed_receipt(signed)) == signed
    as_json = {
        name: ("0x" + value.hex() if isinstance(value, bytes) else value)
        for name, value in eip712.receipt_to_wire(receipt).items()
    }
    assert eip712.receipt_from_wire(as_json) == receipt


@given(vouchers)
def test_voucher_wire_round_trips(voucher: Voucher) -> None:
    signed = eip712.SignedVoucher(voucher, Signer(KEY_B).sign(DOMAIN, voucher))
    packed = msgpack.packb(eip712.signed_voucher_to_wire(signed))
    assert eip712.signed_voucher_from_wire(msgpack.unpackb(packed)) == signed
    assert eip712.decode_signed_voucher(eip712.encode_signed_voucher(signed)) == signed


def test_bad_signed_vouchers_are_refused() -> None:
    voucher = Voucher(
        job_id=bytes(32), provider=bytes(20), cumulative_amount=1, receipts_root=bytes(32), nonce=1
    )
    good = {"voucher": eip712.voucher_to_wire(voucher), "signature": b"\x1b" * 65}
    assert eip712.decode_signed_voucher(msgpack.packb(good)).voucher == voucher
    for bad, reason in (
        ({**good, "voucher": {**good["voucher"], "nonce": -1}}, "bad_field"),
        ({**good, "voucher": {**good["voucher"], "receiptsRoot": b"\x00"}}, "bad_field"),
        ({"voucher": {}, "signature": b"\x1b" * 65}, "missing_field"),
        ({**good, "signature": b""}, "bad_field"),
        ({**good, "pad": b"\x00" * eip712.MAX_WIRE_BYTES}, "too_large"),
    ):
        with pytest.raises(WireFormatError) as caught:
            eip712.decode_signed_voucher(msgpack.packb(bad))
        assert caught.value.reason == reason
    with pytest.raises(WireFormatError) as caught:
        eip712.decode_signed_voucher(b"\xc1")
    assert caught.value.reason == "malformed"


def test_big_prices_travel_as_decimal_strings() -> None:
    wire = eip712.receipt_to_wire(sample_receipt(price_per_unit=2**100))
    assert wire["pricePerUnit"] == str(2**100)
    assert eip712.receipt_to_wire(sample_receipt(price_per_unit=2**64 - 1))["pricePerUnit"] == (
        2**64 - 1
    )
    assert eip712.receipt_from_wire(wire).price_per_unit == 2**100


def _wire(**changes: object) -> dict:
    wire = eip712.receipt_to_wire(sample_receipt())
    wire.update(changes)
    return wire


@pytest.mark.parametrize(
    ("wire", "reason", "words"),
    [
        (["not", "a", "map"], "malformed", "map"),
        ({k: v for k, v in _wire().items() if k != "step"}, "missing_field", "step"),
        (_wire(extra=1), "unknown_field", "extra"),
        (_wire(jobId=b"\x00" * 33), "bad_field", "jobId"),
        (_wire(jobId="0x" + "zz" * 32), "bad_field", "jobId"),
        (_wire(provider="0x" + "ab" * 19), "bad_field", "provider"),
        (_wire(step=-1), "bad_field", "step"),
        (_wire(step="5"), "bad_field", "step"),
        (_wire(units=2**64), "bad_field", "units"),
        (_wire(layerStart=False), "bad_field", "layerStart"),
        (_wire(pricePerUnit="1" * 79), "bad_field", "pricePerUnit"),
        (_wire(pricePerUnit=str(2**256)), "bad_field", "pricePerUnit"),
        (_wire(pricePerUnit="-1"), "bad_field", "pricePerUnit"),
        (_wire(pricePerUnit="\u00b2"), "bad_field", "pricePerUnit"),  # a digit int() refuses
        (_wire(pricePerUnit="\u0663"), "bad_field", "pricePerUnit"),  # a non-ASCII digit
        (_wire(timestamp=1.5), "bad_field", "timestamp"),
    ],
)
def test_bad_wire_receipts_are_refused(wire: object, reason: str, words: str) -> None:
    with pytest.raises(WireFormatError, match=words) as caught:
        eip712.receipt_from_wire(wire)
    assert caught.value.reason == reason


def test_bad_signed_receipts_are_refused() -> None:
    good = {"receipt": _wire(), "signature": b"\x1b" * 65}
    assert eip712.signed_receipt_from_wire(good).signature == b"\x1b" * 65
    for bad in (
        {"receipt": _wire()},
        {**good, "extra": 1},
        {**good, "signature": b"\x1b" * 64},
        {**good, "signature": 5},
        "receipt",
    ):
        with pytest.raises(WireFormatError):
            eip712.signed_receipt_from_wire(bad)
    too_big = msgpack.packb({**good, "pad": b"\x00" * eip712.MAX_WIRE_BYTES})
    with pytest.raises(WireFormatError) as caught:
        eip712.decode_signed_receipt(too_big)
    assert caught.value.reason == "too_large"
    with pytest.raises(WireFormatError) as caught:
        eip712.decode_signed_receipt(msgpack.packb({1: 2}))
    assert caught.value.reason == "bad_key"


@given(st.binary(max_size=700))
def test_decoder_fuzz_random_bytes(data: bytes) -> None:
    with contextlib.suppress(WireFormatError):
        eip712.decode_signed_receipt(data)


_wire_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**260),
    st.floats(allow_nan=True),
    st.binary(max_size=70),
    st.text(max_size=90),
    st.sampled_from(
        ["0x" + "ab" * 32, "0x" + "cd" * 20, "12345", "0x", "0x" + "ab" * 65, "\u00b2"]
    ),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=3),
)


@given(
    st.dictionaries(st.sampled_from(sorted(_wire())), _wire_values, max_size=14),
    st.booleans(),
    _wire_values,
)
def test_decoder_fuzz_mutated_fields(changes: dict, drop: bool, signature: object) -> None:
    wire = _wire(**changes)
    if drop and changes:
        del wire[next(iter(changes))]
    try:
        receipt = eip712.receipt_from_wire(wire)
    except WireFormatError:
        receipt = None
    if receipt is not None:
        assert eip712.receipt_from_wire(eip712.receipt_to_wire(receipt)) == receipt
    try:
        packed = msgpack.packb({"receipt": wire, "signature": signature})
    except (TypeError, OverflowError, ValueError):
        return  # not representable in msgpack (floats are, big ints are not)
    with contextlib.suppress(WireFormatError):
        eip712.decode_signed_receipt(packed)
