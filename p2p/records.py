"""Signed resource records stored in the DHT: what a node has, valid for a bounded time.

A record lives under a key derived from the network id and the peer id, so a node can only
publish under its own key, and networks sharing a DHT never read each other's records. Every
node's DHT validator runs `validate_record`; readers run it again before trusting a value,
because a DHT node's local store keeps values long after they expire.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from p2p import codec, identity

NAMESPACE = "gridmesh"
RECORD_TYPE = "resources"
MAX_RECORD_BYTES = 64 * 1024
DEFAULT_MAX_SKEW_S = 10.0
MAX_VALIDITY_S = 3600.0


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def record_key(network_id: str, peer_id: str) -> str:
    """The DHT key of a node's resource record (short: py-libp2p rejects keys over 50 bytes)."""
    digest = hashlib.sha256(f"{network_id}\0{peer_id}".encode()).hexdigest()[:32]
    return f"/{NAMESPACE}/{digest}"


@dataclass(frozen=True)
class ResourceRecord:
    peer_id: str
    network_id: str
    issued_at: float
    valid_for: float
    payout_address: str
    addrs: list[str]
    resources: dict[str, Any]

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
        }


def make_record(
    ident: identity.NodeIdentity,
    *,
    network_id: str,
    now: float,
    valid_for: float,
    addrs: list[str],
    resources: dict[str, Any],
) -> bytes:
    body = {
        "net": network_id,
        "valid_for": float(valid_for),
        "payout": ident.payout_address,
        "addrs": list(addrs),
        "resources": resources,
    }
    return codec.seal(ident, RECORD_TYPE, body, timestamp=float(now)).to_wire()


def validate_record(
    key: str,
    value: bytes,
    *,
    now: float,
    network_id: str,
    max_skew: float = DEFAULT_MAX_SKEW_S,
) -> ResourceRecord:
    """Return the record if it is well-formed, correctly signed, under its own key and fresh."""
    try:
        env = codec.open_envelope(value, expect_type=RECORD_TYPE, max_bytes=MAX_RECORD_BYTES)
    except codec.CodecError as exc:
        raise RecordError(exc.reason, str(exc)) from None
    body = env.body
    if not isinstance(body, dict):
        raise RecordError("malformed", "record body is not a map")
    net, valid_for = body.get("net"), body.get("valid_for")
    payout, addrs, resources = body.get("payout"), body.get("addrs"), body.get("resources")
    if net != network_id:
        raise RecordError("wrong_network", f"record is for network {str(net)[:40]!r}")
    if key != record_key(network_id, env.sender):
        raise RecordError("wrong_key", "record is stored under another node's key")
    if not isinstance(valid_for, float) or not 0 < valid_for <= MAX_VALIDITY_S:
        raise RecordError("malformed", "valid_for must be a float in (0, 3600]")
    if not isinstance(payout, str) or not isinstance(resources, dict):
        raise RecordError("malformed", "payout must be a string and resources a map")
    if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
        raise RecordError("malformed", "addrs must be a list of strings")
    issued = float(env.timestamp)
    if issued > now + max_skew:
        raise RecordError("future", f"issued {issued - now:.1f} s in the future")
    if issued + valid_for < now:
        raise RecordError("stale", f"expired {now - issued - valid_for:.1f} s ago")
    return ResourceRecord(
        peer_id=env.sender,
        network_id=network_id,
        issued_at=issued,
        valid_for=valid_for,
        payout_address=payout,
        addrs=addrs,
        resources=resources,
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
