"""The voucher protocol, `/gridmesh/voucher/1.0.0`: a requester hands a provider its latest
cumulative voucher for a job; the provider answers once the voucher is stored (or why not).

One request, one response, each a msgpack map tagged by `op` and validated with its bounds by
msgspec before anything else is looked at. The signed voucher travels as the bytes of
`contracts.eip712.encode_signed_voucher` and is decoded by `decode_signed_voucher` (sizes and
types of every field). Every malformed input raises `VoucherWireError`, never anything else.
"""

from __future__ import annotations

from typing import Annotated, Union

import msgspec

from contracts.eip712 import (
    MAX_WIRE_BYTES,
    SignedVoucher,
    WireFormatError,
    decode_signed_voucher,
    encode_signed_voucher,
)

VOUCHER_PROTOCOL = "/gridmesh/voucher/1.0.0"
MAX_MESSAGE_BYTES = MAX_WIRE_BYTES + 512  # one signed voucher and a little framing
VOUCHER_TIMEOUT_S = 10.0  # a provider answers after one sqlite write

Code = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Amount = Annotated[str, msgspec.Meta(min_length=1, max_length=78, pattern=r"^[0-9]+$")]
Nonce = Annotated[int, msgspec.Meta(ge=0, le=(1 << 63) - 1)]  # a uint64 in practice


class VoucherWireError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Message(
    msgspec.Struct, tag_field="op", kw_only=True, frozen=True, forbid_unknown_fields=True
):
    pass


class Offer(_Message, tag="voucher"):
    """requester -> provider: the payer's latest voucher for (job, provider)."""

    voucher: Annotated[bytes, msgspec.Meta(min_length=1, max_length=MAX_WIRE_BYTES)]


class Stored(_Message, tag="stored"):
    """provider -> requester: the voucher is stored; `cumulative` (decimal) and `nonce` echo it."""

    cumulative: Amount
    nonce: Nonce


class Refused(_Message, tag="refused"):
    """provider -> requester: why the voucher was not taken (foreign_job, wrong_provider,
    bad_signature, stale_voucher, over_signed, unknown_job, malformed, ...)."""

    code: Code
    message: Text = ""


Message = Union[Offer, Stored, Refused]  # noqa: UP007 - msgspec wants a real Union here
_DECODER = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]
_ENCODER = msgspec.msgpack.Encoder()


def encode(message: _Message) -> bytes:
    return _ENCODER.encode(message)


def decode(data: bytes) -> Offer | Stored | Refused:
    """A typed message with bounded fields, or VoucherWireError."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise VoucherWireError("too_large", f"{len(data)} bytes, at most {MAX_MESSAGE_BYTES}")
    try:
        return _DECODER.decode(data)
    except msgspec.ValidationError as exc:
        raise VoucherWireError("bad_message", str(exc)[:300]) from None
    except msgspec.MsgspecError as exc:
        raise VoucherWireError("malformed", f"not msgpack: {str(exc)[:200]}") from None


def offer(signed: SignedVoucher) -> bytes:
    """The request that hands `signed` to its provider."""
    return encode(Offer(voucher=encode_signed_voucher(signed)))


def voucher_of(message: Offer) -> SignedVoucher:
    """The signed voucher an offer carries (shape and sizes checked), or VoucherWireError."""
    try:
        return decode_signed_voucher(message.voucher)
    except WireFormatError as exc:
        raise VoucherWireError(exc.reason, str(exc)) from None
