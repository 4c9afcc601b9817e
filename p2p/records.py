"""Signed resource records stored in the DHT: what a node has, valid for a bounded time.

A record lives under a key derived from the network id and the peer id, in the network's own
DHT namespace (`p2p.network.NetworkScope`), so a node can only publish under its own key, and
networks sharing a DHT never read each other's records. Every
node's DHT validator runs `validate_record`; readers run it again before trusting a value,
because a DHT node's local store keeps values long after they expire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from p2p import addrs as addrs_check
from p2p import codec, identity
from p2p.network import scoped_namespace

NAMESPACE = "gridmesh"
RECORD_TYPE = "resources"
MAX_RECORD_BYTES = 64 * 1024
DEFAULT_MAX_SKEW_S = 10.0
MAX_VALIDITY_S = 3600.0
MAX_ADDRS = addrs_check.MAX_ADDRS  # a record with more is refused whole (malformed)
MAX_ADDR_CHARS = addrs_check.MAX_ADDR_CHARS
# A price: the stablecoin's smallest unit per unit of work (one layer run over one token).
# At most an int64, so msgpack, sqlite and JSON all carry it exactly.
MAX_PRICE_PER_UNIT = 2**63 - 1
PricePerUnit = Annotated[int, Meta(ge=0, le=MAX_PRICE_PER_UNIT)]


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def record_key(network_id: str, peer_id: str) -> str:
    """The DHT key of a node's resource record, in its network's namespace
    (`/gridmesh-1a2b3c/<32 hex>`: 49 bytes; py-libp2p rejects lookup keys over 50)."""
    digest = hashlib.sha256(f"{network_id}\0{peer_id}".encode()).hexdigest()[:32]
    return f"/{scoped_namespace(NAMESPACE, network_id)}/{digest}"


@dataclass(frozen=True)
class ResourceRecord:
    peer_id: str
    network_id: str
    issued_at: float
    valid_for: float
    payout_address: str
    addrs: list[str]
    resources: dict[str, Any]
    # the node's price per unit of work; None: it declares none (a node of an older version)
    price_per_unit: int | None = None
    # why each address of the signed record that is not in `addrs` was dropped (unusable:
    # p2p.addrs.check_addrs); the reader counts them
    dropped_addrs: tuple[str, ...] = ()

    @property
    def expires_at(self) -> float:
        return self.issued_at + self.valid_for

    def to_json(self) -> dict[str, Any]:
        return {
            "peer_id": self.peer_id,
            "network_id": self.network_id,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "payout_address": self.payout_address,
            "addrs": list(self.addrs),
            "resources": self.resources,
            "price_per_unit": self.price_per_unit,
        }


def make_record(
    ident: identity.NodeIdentity,
    *,
    network_id: str,
    now: float,
    valid_for: float,
    addrs: list[str],
    resources: dict[str, Any],
    price_per_unit: int | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "net": network_id,
        "valid_for": float(valid_for),
        "payout": ident.payout_address,
        "addrs": list(addrs),
        "resources": resources,
    }
    if price_per_unit is not None:
        body["price_per_unit"] = price_per_unit
    return codec.seal(ident, RECORD_TYPE, body, timestamp=float(now)).to_wire()


class RecordBody(msgspec.Struct, frozen=True):
    """The typed body of a resource record; unknown fields are ignored (newer writers), and
    a field added later is optional: absent in an older writer's record, it reads as None
    (unknown), never as a made-up value."""

    net: Annotated[str, Meta(max_length=128)]
    valid_for: Annotated[float, Meta(gt=0, le=MAX_VALIDITY_S)]
    payout: Annotated[str, Meta(max_length=64)]
    addrs: Annotated[
        list[Annotated[str, Meta(max_length=MAX_ADDR_CHARS)]], Meta(max_length=MAX_ADDRS)
    ]
    resources: dict[str, Any]
    price_per_unit: PricePerUnit | None = None


def validate_record(
    key: str,
    value: bytes,
    *,
    now: float,
    network_id: str,
    max_skew: float = DEFAULT_MAX_SKEW_S,
) -> ResourceRecord:
    """Return the record if it is well-formed, correctly signed, under its own key and fresh.

    Cheap checks first: size, shape, network, key and freshness are refused before the
    signature is checked, so forged or misplaced records cost a flooder's victim little.
    Its addresses, the publisher's word, are then parsed (`p2p.addrs.check_addrs`): the
    record keeps the usable ones as signed, and says why it dropped the others
    (`dropped_addrs`: unspecified, multicast, port 0, malformed, naming another peer...); one
    bad address does not cost the record. Whether an address is near enough to dial (loopback
    from another host) is for the dialler to judge (`p2p.addrs.dial_order`).
    """
    if len(key) > 128:
        raise RecordError("wrong_key", "key too long")
    try:
        env = codec.parse_envelope(value, expect_type=RECORD_TYPE, max_bytes=MAX_RECORD_BYTES)
    except codec.CodecError as exc:
        raise RecordError(exc.reason, str(exc)) from None
    try:
        body = msgspec.convert(env.body, RecordBody, strict=True)
    except (msgspec.ValidationError, TypeError, ValueError) as exc:
        raise RecordError("malformed", f"record body: {str(exc)[:200]}") from None
    if body.net != network_id:
        raise RecordError("wrong_network", f"record is for network {body.net[:40]!r}")
    if key != record_key(network_id, env.sender):
        raise RecordError("wrong_key", "record is stored under another node's key")
    issued = float(env.timestamp)
    if issued > now + max_skew:
        raise RecordError("future", f"issued {issued - now:.1f} s in the future")
    if issued + body.valid_for < now:
        raise RecordError("stale", f"expired {now - issued - body.valid_for:.1f} s ago")
    try:
        codec.verify_envelope(env)
    except codec.CodecError as exc:
        raise RecordError(exc.reason, str(exc)) from None
    addrs, dropped = addrs_check.check_addrs(body.addrs, env.sender)
    return ResourceRecord(
        peer_id=env.sender,
        network_id=network_id,
        issued_at=issued,
        valid_for=body.valid_for,
        payout_address=body.payout,
        addrs=addrs,
        resources=body.resources,
        price_per_unit=body.price_per_unit,
        dropped_addrs=tuple(dropped),
    )


def select_newest(values: list[bytes]) -> int:
    """Index of the most recently issued value; the last one wins ties (libp2p requires it)."""
    best_index, best_ts = 0, float("-inf")
    for index, value in enumerate(values):
        try:
            env = codec.decode(value, max_bytes=MAX_RECORD_BYTES)
            ts = float(env["ts"]) if isinstance(env, dict) else float("-inf")
        except (codec.CodecError, KeyError, TypeError, ValueError):
            ts = float("-inf")
        if ts >= best_ts:
            best_index, best_ts = index, ts
    return best_index
