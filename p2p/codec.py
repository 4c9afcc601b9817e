"""The wire codec: msgpack values with hard limits, and signed, versioned envelopes.

Everything a peer sends is untrusted. `decode` refuses input over a size limit, nesting over a
depth limit, non-string map keys and msgpack extension types, and raises `CodecError` (with a
short `reason` used as a metrics label) for every malformed input, never anything else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgpack

from p2p import identity

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 1 << 20
MAX_DEPTH = 16
MAX_SIGNATURE_BYTES = 128  # Ed25519 signatures are 64 bytes


class CodecError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def encode(value: Any) -> bytes:
    return msgpack.packb(value, use_bin_type=True)


def _check_depth(value: Any, max_depth: int) -> None:
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > max_depth:
                raise CodecError("too_deep", f"nesting deeper than {max_depth}")
            for key, sub in item.items():
                if not isinstance(key, str):
                    raise CodecError("bad_key", "map keys must be strings")
                stack.append((sub, depth + 1))
        elif isinstance(item, list):
            if depth > max_depth:
                raise CodecError("too_deep", f"nesting deeper than {max_depth}")
            stack.extend((sub, depth + 1) for sub in item)


def decode(data: bytes, *, max_bytes: int = MAX_MESSAGE_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    if len(data) > max_bytes:
        raise CodecError("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        value = msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=False,
            use_list=True,
            ext_hook=_refuse_ext,
        )
    except CodecError:
        raise
    except Exception as exc:  # msgpack raises many types for garbage; all mean "malformed"
        raise CodecError("malformed", f"not valid msgpack ({type(exc).__name__})") from None
    _check_depth(value, max_depth)
    return value


def _refuse_ext(code: int, data: bytes) -> Any:
    raise CodecError("malformed", f"msgpack extension type {code} is not allowed")


@dataclass(frozen=True)
class Envelope:
    """A signed message: who sent what kind of body, when."""

    type: str
    sender: str
    timestamp: float
    body: Any
    signature: bytes = b""
    version: int = WIRE_VERSION

    def signing_bytes(self) -> bytes:
        return encode([self.version, self.type, self.sender, self.timestamp, self.body])

    def to_wire(self) -> bytes:
        return encode(
            {
                "v": self.version,
                "t": self.type,
                "from": self.sender,
                "ts": self.timestamp,
                "body": self.body,
                "sig": self.signature,
            }
        )


def seal(ident: identity.NodeIdentity, type_: str, body: Any, timestamp: float) -> Envelope:
    unsigned = Envelope(type=type_, sender=ident.peer_id, timestamp=timestamp, body=body)
    return Envelope(
        type=type_,
        sender=unsigned.sender,
        timestamp=timestamp,
        body=body,
        signature=ident.sign(unsigned.signing_bytes()),
    )


def parse_envelope(
    data: bytes, *, expect_type: str | None = None, max_bytes: int = MAX_MESSAGE_BYTES
) -> Envelope:
    """Decode an envelope and check its shape, WITHOUT checking the signature.

    The cheap checks (size, msgpack, shape, type) come first so that callers can refuse
    garbage and wrong-purpose messages before paying for a signature check; nothing read
    from the result may be trusted until `verify_envelope` has passed.
    """
    raw = decode(data, max_bytes=max_bytes)
    if not isinstance(raw, dict):
        raise CodecError("malformed", "an envelope is a map")
    version = raw.get("v")
    if version != WIRE_VERSION:
        raise CodecError("bad_version", f"wire version {str(version)[:16]!r} is not supported")
    type_, sender, ts, sig = raw.get("t"), raw.get("from"), raw.get("ts"), raw.get("sig")
    if not isinstance(type_, str) or not isinstance(sender, str) or len(sender) > 128:
        raise CodecError("malformed", "envelope type and sender must be short strings")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise CodecError("malformed", "envelope timestamp must be a number")
    if not isinstance(sig, bytes) or len(sig) > MAX_SIGNATURE_BYTES:
        raise CodecError("malformed", "envelope signature must be short bytes")
    if expect_type is not None and type_ != expect_type:
        raise CodecError("wrong_type", f"expected {expect_type!r}, got {type_[:32]!r}")
    return Envelope(type=type_, sender=sender, timestamp=ts, body=raw.get("body"), signature=sig)


def verify_envelope(env: Envelope) -> Envelope:
    """Raise CodecError unless the envelope is signed by the key behind its sender."""
    if not identity.verify(env.sender, env.signing_bytes(), env.signature):
        raise CodecError("bad_signature", "signature does not match the sender")
    return env


def open_envelope(
    data: bytes, *, expect_type: str | None = None, max_bytes: int = MAX_MESSAGE_BYTES
) -> Envelope:
    """Decode and verify an envelope; raise CodecError on any problem."""
    return verify_envelope(parse_envelope(data, expect_type=expect_type, max_bytes=max_bytes))
