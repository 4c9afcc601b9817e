"""Anti-entropy: compare compact digests with one peer and exchange only what differs.

Entries are grouped per kind into BUCKETS key ranges (by hash of the key). A bucket's digest
is the XOR of the hashes of its entries' exact states, so it is order-free and cheap. A round:
1. A sends its digests; B answers with the (key, claim, version) of its entries in the
   buckets that differ (bounded; `truncated` says when it stopped early);
2. A pulls the entries where B's state wins, and pushes those where its own wins or that B
   lacks (only for buckets B listed completely).
Everything here is pure; `registry.replication` moves the messages.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from p2p import codec
from registry.entry import Entry, EntryId

BUCKETS = 16
DIGEST_BYTES = 8
MAX_LISTING = 2000
MAX_TRANSFER = 256

Summary = tuple[str, str, list[Any], list[Any]]  # kind, key, claim, version


class SyncError(ValueError):
    """A peer's sync message is malformed."""


def bucket_of(kind: str, key: str) -> int:
    return hashlib.sha256(f"{kind}\0{key}".encode()).digest()[0] % BUCKETS


def state_hash(entry: Entry) -> bytes:
    return hashlib.sha256(codec.encode([list(entry.claim), list(entry.version)])).digest()[
        :DIGEST_BYTES
    ]


def digests(entries: Iterable[Entry]) -> dict[str, list[bytes]]:
    out: dict[str, list[int]] = {}
    for entry in entries:
        row = out.setdefault(entry.kind, [0] * BUCKETS)
        row[bucket_of(entry.kind, entry.key)] ^= int.from_bytes(state_hash(entry), "big")
    return {kind: [v.to_bytes(DIGEST_BYTES, "big") for v in row] for kind, row in out.items()}


def differing_buckets(
    mine: Mapping[str, list[bytes]], theirs: Mapping[str, list[bytes]]
) -> list[tuple[str, int]]:
    empty = [bytes(DIGEST_BYTES)] * BUCKETS
    out = []
    for kind in sorted(set(mine) | set(theirs)):
        a, b = mine.get(kind, empty), theirs.get(kind, empty)
        out.extend((kind, i) for i in range(BUCKETS) if a[i] != b[i])
    return out


def summary(entry: Entry) -> Summary:
    return (entry.kind, entry.key, list(entry.claim), list(entry.version))


@dataclass(frozen=True)
class Listing:
    buckets: list[tuple[str, int]]
    summaries: list[Summary]
    truncated: bool


def listing(entries: Mapping[EntryId, Entry], buckets: list[tuple[str, int]]) -> Listing:
    wanted = set(buckets)
    out: list[Summary] = []
    for entry_id in sorted(entries):
        if (entry_id[0], bucket_of(*entry_id)) in wanted:
            if len(out) == MAX_LISTING:
                return Listing(buckets, out, truncated=True)
            out.append(summary(entries[entry_id]))
    return Listing(buckets, out, truncated=False)


def _rank(claim: Any, version: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (tuple(claim), tuple(version))


def _beats(a: tuple[tuple[Any, ...], ...], b: tuple[tuple[Any, ...], ...]) -> bool:
    """The same order as `registry.entry.better`: smaller claim, then larger version."""
    if a[0] != b[0]:
        return a[0] < b[0]
    return a[1] > b[1]


def plan(mine: Mapping[EntryId, Entry], theirs: Listing) -> tuple[list[EntryId], list[Entry]]:
    """What to pull from the peer, and what to push to it, bounded by MAX_TRANSFER each."""
    pull: list[EntryId] = []
    push: list[Entry] = []
    listed: set[EntryId] = set()
    for kind, key, claim, version in theirs.summaries:
        entry_id = (kind, key)
        listed.add(entry_id)
        current = mine.get(entry_id)
        if current is None:
            pull.append(entry_id)
            continue
        theirs_rank, mine_rank = _rank(claim, version), _rank(current.claim, current.version)
        if theirs_rank == mine_rank:
            continue
        if _beats(theirs_rank, mine_rank):
            pull.append(entry_id)
        else:
            push.append(current)
    if not theirs.truncated:
        wanted = set(theirs.buckets)
        for entry_id, entry in sorted(mine.items()):
            if entry_id not in listed and (entry_id[0], bucket_of(*entry_id)) in wanted:
                push.append(entry)
    return pull[:MAX_TRANSFER], push[:MAX_TRANSFER]


# -- wire forms (bounded, validated) ---------------------------------------------------


def encode_digests(d: Mapping[str, list[bytes]]) -> dict[str, Any]:
    return {"op": "digests", "digests": {k: list(v) for k, v in d.items()}}


def parse_digests(msg: Any) -> dict[str, list[bytes]]:
    raw = msg.get("digests") if isinstance(msg, dict) else None
    if not isinstance(raw, dict) or len(raw) > 64:
        raise SyncError("digests must be a map of at most 64 kinds")
    out = {}
    for kind, row in raw.items():
        if (
            not isinstance(row, list)
            or len(row) != BUCKETS
            or not all(isinstance(d, bytes) and len(d) == DIGEST_BYTES for d in row)
        ):
            raise SyncError(f"digest row for {str(kind)[:32]!r} is malformed")
        out[kind] = row
    return out


def encode_listing(lst: Listing) -> dict[str, Any]:
    return {
        "buckets": [list(b) for b in lst.buckets],
        "summaries": [list(s) for s in lst.summaries],
        "truncated": lst.truncated,
    }


def parse_listing(msg: Any) -> Listing:
    if not isinstance(msg, dict):
        raise SyncError("listing must be a map")
    buckets, summaries = msg.get("buckets"), msg.get("summaries")
    if not isinstance(buckets, list) or len(buckets) > 64 * BUCKETS:
        raise SyncError("buckets must be a bounded list")
    if not isinstance(summaries, list) or len(summaries) > MAX_LISTING:
        raise SyncError("summaries must be a bounded list")
    parsed_buckets = []
    for b in buckets:
        if not (isinstance(b, list) and len(b) == 2 and isinstance(b[0], str)):
            raise SyncError("a bucket is [kind, index]")
        if not (isinstance(b[1], int) and 0 <= b[1] < BUCKETS):
            raise SyncError("bucket index out of range")
        parsed_buckets.append((b[0], b[1]))
    parsed: list[Summary] = []
    for s in summaries:
        if not (
            isinstance(s, list)
            and len(s) == 4
            and isinstance(s[0], str)
            and isinstance(s[1], str)
            and _shape(s[2], (int, int, str))
            and _shape(s[3], (int, int, str, bytes))
        ):
            raise SyncError("a summary is [kind, key, claim, version]")
        parsed.append((s[0], s[1], s[2], s[3]))
    return Listing(parsed_buckets, parsed, bool(msg.get("truncated")))


def _shape(value: Any, types: tuple[type, ...]) -> bool:
    return (
        isinstance(value, list)
        and len(value) == len(types)
        and all(
            isinstance(v, t) and not isinstance(v, bool) for v, t in zip(value, types, strict=True)
        )
    )
