"""EIP-712 receipts and vouchers: the typed structures, their digests, signing and recovery.

The types are the ones `JobEscrow` hashes (docs: /work/notes/issue14.md); both sides must agree
byte for byte. Digests are built here directly from keccak and 32-byte ABI words (eth-account's
generic `encode_typed_data` is about a hundred times slower); tests check every digest against
eth-account's. Signatures are 65 bytes r||s||v with v = 27/28 and low s, as `ecrecover` and
OpenZeppelin's `ECDSA.recover` expect; coincurve (libsecp256k1) signs and recovers.

Receipts and vouchers arrive from untrusted peers: `receipt_from_wire` / `voucher_from_wire`
(dicts from msgpack or JSON) and `decode_signed_receipt` (msgpack bytes) check every field's
type and size and raise `WireFormatError` with a short `reason`, never anything else.
Addresses and hashes are raw `bytes` (20 and 32); `address_from_hex` / `to_checksum_address`
convert at the edges.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import coincurve
import msgspec
from Crypto.Hash import keccak as _keccak_mod

from p2p import codec

UINT32_MAX = (1 << 32) - 1
UINT64_MAX = (1 << 64) - 1
UINT256_MAX = (1 << 256) - 1
# secp256k1's group order; a signature's s must be at most half of it (EIP-2 / OpenZeppelin)
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
_HALF_N = SECP256K1_N // 2

DOMAIN_NAME = "gridmesh"
DOMAIN_VERSION = "1"
DOMAIN_TYPE = "EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)"
RECEIPT_TYPE = (
    "Receipt(bytes32 jobId,address provider,bytes32 model,uint32 layerStart,uint32 layerEnd,"
    "bytes32 session,uint64 step,bytes32 inputHash,bytes32 outputHash,uint64 units,"
    "uint256 pricePerUnit,bytes32 prevReceipt,uint64 timestamp)"
)
VOUCHER_TYPE = (
    "Voucher(bytes32 jobId,address provider,uint256 cumulativeAmount,bytes32 receiptsRoot,"
    "uint64 nonce)"
)
ZERO32 = bytes(32)
SIGNATURE_BYTES = 65
MAX_WIRE_BYTES = 4096  # a signed receipt is about 600 bytes of msgpack
_PAD12 = bytes(12)


def keccak(data: bytes) -> bytes:
    """keccak256 (Ethereum's, not SHA3-256)."""
    return _keccak_mod.new(digest_bits=256, data=data).digest()


DOMAIN_TYPEHASH = keccak(DOMAIN_TYPE.encode())
RECEIPT_TYPEHASH = keccak(RECEIPT_TYPE.encode())
VOUCHER_TYPEHASH = keccak(VOUCHER_TYPE.encode())


class WireFormatError(ValueError):
    """A receipt or voucher from the wire is malformed; `reason` is a short label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class SignatureError(ValueError):
    """A signature is malformed (size, v, high s) or recovers no key."""

    reason = "bad_signature"


# -- field checks -----------------------------------------------------------------------


def _check_bytes(name: str, value: object, size: int) -> None:
    if type(value) is not bytes or len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {_describe(value)}")


def _check_uint(name: str, value: object, maximum: int) -> None:
    if type(value) is not int or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [0, {maximum}], got {_describe(value)}")


def _describe(value: object) -> str:
    if isinstance(value, bytes | bytearray | str):
        return f"{type(value).__name__} of length {len(value)}"
    if type(value) is int:
        return "a negative integer" if value < 0 else f"an integer of {value.bit_length()} bits"
    return type(value).__name__


# -- the types ---------------------------------------------------------------------------

# (field name, wire name, kind, size/maximum): kind "b" = bytes of that size, "u" = uint <= max
_RECEIPT_FIELDS: tuple[tuple[str, str, str, int], ...] = (
    ("job_id", "jobId", "b", 32),
    ("provider", "provider", "b", 20),
    ("model", "model", "b", 32),
    ("layer_start", "layerStart", "u", UINT32_MAX),
    ("layer_end", "layerEnd", "u", UINT32_MAX),
    ("session", "session", "b", 32),
    ("step", "step", "u", UINT64_MAX),
    ("input_hash", "inputHash", "b", 32),
    ("output_hash", "outputHash", "b", 32),
    ("units", "units", "u", UINT64_MAX),
    ("price_per_unit", "pricePerUnit", "u", UINT256_MAX),
    ("prev_receipt", "prevReceipt", "b", 32),
    ("timestamp", "timestamp", "u", UINT64_MAX),
)
_VOUCHER_FIELDS: tuple[tuple[str, str, str, int], ...] = (
    ("job_id", "jobId", "b", 32),
    ("provider", "provider", "b", 20),
    ("cumulative_amount", "cumulativeAmount", "u", UINT256_MAX),
    ("receipts_root", "receiptsRoot", "b", 32),
    ("nonce", "nonce", "u", UINT64_MAX),
)


def _validate(obj: object, fields: tuple[tuple[str, str, str, int], ...]) -> None:
    for name, _, kind, limit in fields:
        value = getattr(obj, name)
        if kind == "b":
            _check_bytes(name, value, limit)
        else:
            _check_uint(name, value, limit)


class Receipt(msgspec.Struct, frozen=True, kw_only=True):
    """One step of work, signed by the provider that ran it (field order = the EIP-712 type)."""

    job_id: bytes
    provider: bytes
    model: bytes
    layer_start: int
    layer_end: int
    session: bytes
    step: int
    input_hash: bytes
    output_hash: bytes
    units: int
    price_per_unit: int
    prev_receipt: bytes
    timestamp: int

    def __post_init__(self) -> None:
        _validate(self, _RECEIPT_FIELDS)

    @property
    def amount(self) -> int:
        return self.units * self.price_per_unit

    def struct_hash(self) -> bytes:
        return keccak(
            b"".join(
                (
                    RECEIPT_TYPEHASH,
                    self.job_id,
                    _PAD12,
                    self.provider,
                    self.model,
                    self.layer_start.to_bytes(32, "big"),
                    self.layer_end.to_bytes(32, "big"),
                    self.session,
                    self.step.to_bytes(32, "big"),
                    self.input_hash,
                    self.output_hash,
                    self.units.to_bytes(32, "big"),
                    self.price_per_unit.to_bytes(32, "big"),
                    self.prev_receipt,
                    self.timestamp.to_bytes(32, "big"),
                )
            )
        )

    def abi_tuple(self) -> tuple[Any, ...]:
        """The struct as a contract call argument (web3 takes tuples for Solidity structs)."""
        return tuple(getattr(self, name) for name, _, _, _ in _RECEIPT_FIELDS)


class Voucher(msgspec.Struct, frozen=True, kw_only=True):
    """The payer's cumulative acknowledgement of one provider's receipts in one job."""

    job_id: bytes
    provider: bytes
    cumulative_amount: int
    receipts_root: bytes
    nonce: int

    def __post_init__(self) -> None:
        _validate(self, _VOUCHER_FIELDS)

    def struct_hash(self) -> bytes:
        return keccak(
            b"".join(
                (
                    VOUCHER_TYPEHASH,
                    self.job_id,
                    _PAD12,
                    self.provider,
                    self.cumulative_amount.to_bytes(32, "big"),
                    self.receipts_root,
                    self.nonce.to_bytes(32, "big"),
                )
            )
        )

    def abi_tuple(self) -> tuple[Any, ...]:
        return tuple(getattr(self, name) for name, _, _, _ in _VOUCHER_FIELDS)


@dataclass(frozen=True)
class Domain:
    """The EIP-712 domain: name "gridmesh", version "1", the chain (read `eth_chainId`, never
    assume it) and the JobEscrow contract's address (20 bytes)."""

    chain_id: int
    verifying_contract: bytes
    name: str = DOMAIN_NAME
    version: str = DOMAIN_VERSION
    separator: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        _check_uint("chain_id", self.chain_id, UINT256_MAX)
        _check_bytes("verifying_contract", self.verifying_contract, 20)
        sep = keccak(
            DOMAIN_TYPEHASH
            + keccak(self.name.encode())
            + keccak(self.version.encode())
            + self.chain_id.to_bytes(32, "big")
            + _PAD12
            + self.verifying_contract
        )
        object.__setattr__(self, "separator", sep)

    def digest(self, message: Receipt | Voucher) -> bytes:
        """The digest that is signed: keccak256(0x1901 || domain separator || struct hash)."""
        return keccak(b"\x19\x01" + self.separator + message.struct_hash())

    def as_dict(self) -> dict[str, Any]:
        """The domain as eth-account / web3 typed data take it."""
        return {
            "name": self.name,
            "version": self.version,
            "chainId": self.chain_id,
            "verifyingContract": to_checksum_address(self.verifying_contract),
        }


# -- signing and recovery ----------------------------------------------------------------


def address_of_public_key(public_key: coincurve.PublicKey) -> bytes:
    return keccak(public_key.format(compressed=False)[1:])[12:]


class Signer:
    """A secp256k1 key that signs digests (the payout key of a node, or a payer's key)."""

    __slots__ = ("_key", "address")

    def __init__(self, private_key: bytes | str) -> None:
        if isinstance(private_key, str):
            private_key = bytes.fromhex(private_key.removeprefix("0x"))
        if len(private_key) != 32:
            raise ValueError("a secp256k1 private key is 32 bytes")
        self._key = coincurve.PrivateKey(private_key)
        self.address: bytes = address_of_public_key(self._key.public_key)

    def sign_digest(self, digest: bytes) -> bytes:
        """65 bytes r||s||v, v = 27/28; libsecp256k1 always produces low s."""
        sig = self._key.sign_recoverable(digest, hasher=None)
        return sig[:64] + bytes((sig[64] + 27,))

    def sign(self, domain: Domain, message: Receipt | Voucher) -> bytes:
        return self.sign_digest(domain.digest(message))


def recover_digest(digest: bytes, signature: bytes) -> bytes:
    """The address that signed `digest`, or SignatureError. Refuses what `ecrecover` through
    OpenZeppelin's ECDSA would refuse: a length other than 65, v not 27/28, s above n/2."""
    if type(signature) is not bytes or len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"a signature is {SIGNATURE_BYTES} bytes, got {_describe(signature)}")
    v = signature[64]
    if v not in (27, 28):
        raise SignatureError(f"signature v must be 27 or 28, got {v}")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    if not 0 < r < SECP256K1_N or not 0 < s <= _HALF_N:
        raise SignatureError("signature r or s out of range (high s is refused)")
    try:
        key = coincurve.PublicKey.from_signature_and_message(
            signature[:64] + bytes((v - 27,)), digest, hasher=None
        )
    except Exception as exc:  # coincurve raises ValueError / its own errors for no key
        raise SignatureError(f"signature recovers no key ({type(exc).__name__})") from None
    return address_of_public_key(key)


def recover(domain: Domain, message: Receipt | Voucher, signature: bytes) -> bytes:
    return recover_digest(domain.digest(message), signature)


# -- addresses ---------------------------------------------------------------------------

_HEX40 = re.compile(r"0x[0-9a-fA-F]{40}")


def address_from_hex(text: str) -> bytes:
    """'0x' + 40 hex digits -> 20 bytes (the checksum's case is not checked here)."""
    if not isinstance(text, str) or not _HEX40.fullmatch(text):
        raise ValueError(f"not an address: {text!r:.60}")
    return bytes.fromhex(text[2:])


def to_checksum_address(address: bytes) -> str:
    """EIP-55 mixed-case hex."""
    _check_bytes("address", address, 20)
    low = address.hex()
    mask = keccak(low.encode()).hex()[:40]
    return "0x" + "".join(
        c.upper() if m in "89abcdef" else c for c, m in zip(low, mask, strict=True)
    )


# -- signed messages and the wire --------------------------------------------------------


class SignedReceipt(msgspec.Struct, frozen=True):
    receipt: Receipt
    signature: bytes


class SignedVoucher(msgspec.Struct, frozen=True):
    voucher: Voucher
    signature: bytes


_HEX = re.compile(r"0x[0-9a-fA-F]*")


def _field_from_wire(wire_name: str, value: Any, kind: str, limit: int) -> Any:
    if kind == "b":
        if isinstance(value, bytes | bytearray):
            raw = bytes(value)
        elif isinstance(value, str) and len(value) == 2 + 2 * limit and _HEX.fullmatch(value):
            raw = bytes.fromhex(value[2:])
        else:
            raise WireFormatError(
                "bad_field", f"{wire_name} must be {limit} bytes, got {_describe(value)}"
            )
        if len(raw) != limit:
            raise WireFormatError("bad_field", f"{wire_name} must be {limit} bytes, got {len(raw)}")
        return raw
    if (
        type(value) is str
        and limit == UINT256_MAX
        and 0 < len(value) <= 78
        and value.isascii()
        and value.isdigit()
    ):
        value = int(value)  # numbers past 64 bits travel as decimal strings (msgpack stops there)
    if type(value) is not int or not 0 <= value <= limit:
        raise WireFormatError(
            "bad_field", f"{wire_name} must be an integer in [0, {limit}], got {_describe(value)}"
        )
    return value


def _from_wire(obj: Any, fields: tuple[tuple[str, str, str, int], ...], what: str) -> dict:
    if not isinstance(obj, dict):
        raise WireFormatError("malformed", f"a {what} is a map, got {type(obj).__name__}")
    if len(obj) != len(fields):
        names = {f[1] for f in fields}
        missing = sorted(names - obj.keys())
        if missing:
            raise WireFormatError("missing_field", f"{what} lacks {', '.join(missing)}")
        extra = [repr(k)[:40] for k in obj if k not in names][:3]
        raise WireFormatError("unknown_field", f"{what} has unknown fields {', '.join(extra)}")
    values = {}
    for name, wire_name, kind, limit in fields:
        if wire_name not in obj:
            raise WireFormatError("missing_field", f"{what} lacks {wire_name}")
        values[name] = _field_from_wire(wire_name, obj[wire_name], kind, limit)
    return values


def _to_wire(message: Receipt | Voucher, fields: tuple[tuple[str, str, str, int], ...]) -> dict:
    out: dict[str, Any] = {}
    for name, wire_name, _, _ in fields:
        value = getattr(message, name)
        out[wire_name] = str(value) if type(value) is int and value > UINT64_MAX else value
    return out


def receipt_to_wire(receipt: Receipt) -> dict[str, Any]:
    """A msgpack-ready map with the EIP-712 field names (bytes as bytes; a uint256 past 64 bits
    as a decimal string)."""
    return _to_wire(receipt, _RECEIPT_FIELDS)


def voucher_to_wire(voucher: Voucher) -> dict[str, Any]:
    return _to_wire(voucher, _VOUCHER_FIELDS)


def receipt_from_wire(obj: Any) -> Receipt:
    """A receipt from an untrusted map (msgpack: bytes; JSON: '0x' hex strings)."""
    return Receipt(**_from_wire(obj, _RECEIPT_FIELDS, "receipt"))


def voucher_from_wire(obj: Any) -> Voucher:
    return Voucher(**_from_wire(obj, _VOUCHER_FIELDS, "voucher"))


def _signature_from_wire(value: Any) -> bytes:
    if isinstance(value, bytes | bytearray) and len(value) == SIGNATURE_BYTES:
        return bytes(value)
    if isinstance(value, str) and len(value) == 2 + 2 * SIGNATURE_BYTES and _HEX.fullmatch(value):
        return bytes.fromhex(value[2:])
    raise WireFormatError(
        "bad_field", f"signature must be {SIGNATURE_BYTES} bytes, got {_describe(value)}"
    )


def _signed_from_wire(obj: Any, key: str) -> tuple[Any, bytes]:
    if not isinstance(obj, dict):
        raise WireFormatError("malformed", f"a signed {key} is a map, got {type(obj).__name__}")
    if set(obj) != {key, "signature"}:
        raise WireFormatError("malformed", f"a signed {key} has exactly '{key}' and 'signature'")
    return obj[key], _signature_from_wire(obj["signature"])


def signed_receipt_to_wire(signed: SignedReceipt) -> dict[str, Any]:
    return {"receipt": receipt_to_wire(signed.receipt), "signature": signed.signature}


def signed_receipt_from_wire(obj: Any) -> SignedReceipt:
    """Shape and sizes only; whether the signature is the provider's is the verifier's job."""
    body, signature = _signed_from_wire(obj, "receipt")
    return SignedReceipt(receipt_from_wire(body), signature)


def signed_voucher_to_wire(signed: SignedVoucher) -> dict[str, Any]:
    return {"voucher": voucher_to_wire(signed.voucher), "signature": signed.signature}


def signed_voucher_from_wire(obj: Any) -> SignedVoucher:
    body, signature = _signed_from_wire(obj, "voucher")
    return SignedVoucher(voucher_from_wire(body), signature)


def encode_signed_receipt(signed: SignedReceipt) -> bytes:
    return codec.encode(signed_receipt_to_wire(signed))


def decode_signed_receipt(data: bytes) -> SignedReceipt:
    """msgpack bytes from a peer -> SignedReceipt, or WireFormatError."""
    return signed_receipt_from_wire(_decode_bounded(data))


def encode_signed_voucher(signed: SignedVoucher) -> bytes:
    return codec.encode(signed_voucher_to_wire(signed))


def decode_signed_voucher(data: bytes) -> SignedVoucher:
    """msgpack bytes from a peer -> SignedVoucher, or WireFormatError."""
    return signed_voucher_from_wire(_decode_bounded(data))


def _decode_bounded(data: bytes) -> Any:
    """msgpack from a peer, bounded in size and depth before anything else is looked at."""
    try:
        return codec.decode(data, max_bytes=MAX_WIRE_BYTES, max_depth=3)
    except codec.CodecError as exc:
        raise WireFormatError(exc.reason, str(exc)) from None
