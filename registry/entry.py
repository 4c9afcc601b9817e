"""Registry entries: signed (kind, key) -> value with a hybrid logical clock, and their merge.

Who owns a key is part of the entry: `claim` is (created timestamp, owner peer id), set by the
write that created the key and carried by every later write. Merge is a join over a total
order, so it is commutative, associative and idempotent:
- the smaller claim wins (when two nodes create the same key concurrently, the earlier one
  keeps it, on every replica, whatever the order of arrival);
- within one claim, the larger version (timestamp, author, value digest) wins: last writer
  wins, and the digest breaks the tie a misbehaving author could create.
A delete is an entry whose value is None (a tombstone); tombstones are collected later.
Authorization (may this author write this key?) needs replica state and lives in `replica`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from p2p import codec, identity
from registry.hlc import Timestamp

MAX_KIND_LEN = 32
MAX_KEY_LEN = 200

Claim = tuple[int, int, str]
Version = tuple[int, int, str, bytes]
EntryId = tuple[str, str]


class EntryError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Entry:
    kind: str
    key: str
    value: dict[str, Any] | None
    ts: Timestamp
    author: str
    created: Timestamp
    owner: str
    signature: bytes = b""

    @property
    def id(self) -> EntryId:
        return (self.kind, self.key)

    @property
    def deleted(self) -> bool:
        return self.value is None

    @property
    def claim(self) -> Claim:
        return (self.created.wall_ms, self.created.counter, self.owner)

    @property
    def digest(self) -> bytes:
        return hashlib.sha256(codec.encode(self.value)).digest()[:8]

    @property
    def version(self) -> Version:
        return (self.ts.wall_ms, self.ts.counter, self.author, self.digest)

    def signing_bytes(self) -> bytes:
        return codec.encode(
            [
                "gridmesh-registry-entry/1",
                self.kind,
                self.key,
                self.value,
                list(self.ts),
                self.author,
                list(self.created),
                self.owner,
            ]
        )

    def to_wire(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "key": self.key,
            "value": self.value,
            "ts": list(self.ts),
            "author": self.author,
            "created": list(self.created),
            "owner": self.owner,
            "sig": self.signature,
        }

    def to_json(self) -> dict[str, Any]:
        """The shape users see over RPC (and the filter language queries)."""
        return {
            "kind": self.kind,
            "key": self.key,
            "value": self.value,
            "deleted": self.deleted,
            "author": self.author,
            "owner": self.owner,
            "updated_at": self.ts.wall_ms / 1000,
            "created_at": self.created.wall_ms / 1000,
            "version": str(self.ts),
        }


def sign_entry(
    ident: identity.NodeIdentity,
    *,
    kind: str,
    key: str,
    value: dict[str, Any] | None,
    ts: Timestamp,
    created: Timestamp,
    owner: str,
) -> Entry:
    unsigned = Entry(kind, key, value, ts, ident.peer_id, created, owner)
    return Entry(
        kind, key, value, ts, ident.peer_id, created, owner, ident.sign(unsigned.signing_bytes())
    )


def verify_entry(entry: Entry) -> bool:
    return identity.verify(entry.author, entry.signing_bytes(), entry.signature)


def _timestamp(raw: Any, name: str) -> Timestamp:
    if (
        not isinstance(raw, list)
        or len(raw) != 2
        or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in raw)
    ):
        raise EntryError("malformed", f"{name} must be [wall_ms, counter]")
    return Timestamp(raw[0], raw[1])


def entry_from_wire(raw: Any) -> Entry:
    """Build an Entry from decoded wire data; EntryError on any shape problem (not the sig)."""
    if not isinstance(raw, dict):
        raise EntryError("malformed", "an entry is a map")
    kind, key, author, owner, sig = (raw.get(f) for f in ("kind", "key", "author", "owner", "sig"))
    if not isinstance(kind, str) or not 0 < len(kind) <= MAX_KIND_LEN:
        raise EntryError("malformed", "kind must be a short string")
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_LEN:
        raise EntryError("malformed", f"key must be a string of 1 to {MAX_KEY_LEN} characters")
    if not isinstance(author, str) or not isinstance(owner, str):
        raise EntryError("malformed", "author and owner must be peer ids")
    if len(author) > 128 or len(owner) > 128:
        raise EntryError("malformed", "author and owner must be peer ids")
    if not isinstance(sig, bytes):
        raise EntryError("malformed", "sig must be bytes")
    value = raw.get("value")
    if value is not None and not isinstance(value, dict):
        raise EntryError("malformed", "value must be a map or null")
    return Entry(
        kind=kind,
        key=key,
        value=value,
        ts=_timestamp(raw.get("ts"), "ts"),
        author=author,
        created=_timestamp(raw.get("created"), "created"),
        owner=owner,
        signature=sig,
    )


def better(a: Entry, b: Entry) -> bool:
    """True when `a` beats `b` for the same (kind, key): smaller claim, then larger version."""
    if a.claim != b.claim:
        return a.claim < b.claim
    return a.version > b.version


def join(a: Entry | None, b: Entry | None) -> Entry | None:
    if a is None:
        return b
    if b is None or a == b:
        return a
    return a if better(a, b) else b


def merge(
    replica: dict[EntryId, Entry], incoming: Iterable[Entry]
) -> tuple[dict[EntryId, Entry], list[Entry]]:
    """Pure merge: the new replica and the incoming entries that changed it, in order."""
    merged = dict(replica)
    changed: list[Entry] = []
    for entry in incoming:
        current = merged.get(entry.id)
        winner = join(current, entry)
        if winner is not current:
            merged[entry.id] = entry
            changed.append(entry)
    return merged, changed
