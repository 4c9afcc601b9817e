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
from functools import cached_property
from typing import Any

from p2p import codec, identity
from registry import wire
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

    # An entry never changes once made (its value is not mutated either: replicas replace
    # entries whole), so what merge and anti-entropy compare is computed once per entry:
    # a sync round compares every entry's state, every round, with every peer.
    @cached_property
    def claim(self) -> Claim:
        return (self.created.wall_ms, self.created.counter, self.owner)

    @cached_property
    def digest(self) -> bytes:
        return hashlib.sha256(codec.encode(self.value)).digest()[:8]

    @cached_property
    def version(self) -> Version:
        return (self.ts.wall_ms, self.ts.counter, self.author, self.digest)

    @cached_property
    def state_hash(self) -> int:
        """A hash of the exact state (claim, version), as anti-entropy digests XOR it."""
        state = codec.encode([list(self.claim), list(self.version)])
        return int.from_bytes(hashlib.sha256(state).digest()[: wire.DIGEST_BYTES], "big")

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


def entry_from_wire(raw: Any) -> Entry:
    """Build an Entry from decoded wire data through its typed form (`registry.wire.WireEntry`);
    EntryError on any shape or bound problem (the signature is checked by the replica)."""
    try:
        typed = wire.convert(raw, wire.WireEntry)
    except wire.WireError as exc:
        raise EntryError("malformed", exc.detail) from None
    return Entry(
        kind=typed.kind,
        key=typed.key,
        value=typed.value,
        ts=Timestamp(*typed.ts),
        author=typed.author,
        created=Timestamp(*typed.created),
        owner=typed.owner,
        signature=typed.sig,
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
