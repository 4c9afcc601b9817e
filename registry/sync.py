"""Anti-entropy: compare compact digests with one peer and exchange only what differs.

Entries are grouped per kind into BUCKETS key ranges (by hash of the key). A bucket's digest
is the XOR of the hashes of its entries' exact states, so it is order-free and cheap, and a
replica keeps it as entries change (`Entries`, which also holds each bucket's keys in order):
a round costs what the buckets it compares and lists hold, not the registry's size. A round:
1. A sends its digests; B answers with one page of the (key, claim, version) of its entries in
   the buckets that differ, in (kind, key) order, bounded in count and in bytes; when it
   stopped early (`truncated`) it names where the next page starts (`next`), and A asks for
   that page with the same digests and `after` = `next`, until the listing is complete;
2. per page, A pulls the entries where B's state wins, and pushes those where its own wins or
   that B lacks (in the id range the page covered).
Pull replies and pushes are paged by bytes as well (`registry.replication`), so a registry of
any size syncs completely under any frame limit.
Everything here is pure; `registry.replication` moves the messages and `registry.wire` holds
their typed forms.
"""

from __future__ import annotations

import bisect
import hashlib
import heapq
from collections.abc import ItemsView, Iterable, Iterator, KeysView, Mapping, ValuesView
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from registry import wire
from registry.entry import Entry, EntryId

BUCKETS = wire.BUCKETS
DIGEST_BYTES = wire.DIGEST_BYTES
MAX_LISTING = wire.MAX_LISTING
MAX_TRANSFER = wire.MAX_TRANSFER
SUMMARY_OVERHEAD = 48  # msgpack framing and integers of one summary, at most

Summary = tuple[str, str, list[Any], list[Any]]  # kind, key, claim, version


class SyncError(wire.WireError):
    """A peer's sync message is malformed (or a peer refused ours)."""

    def __init__(self, detail: str, reason: str = "malformed") -> None:
        super().__init__(reason, detail)


@lru_cache(maxsize=1 << 16)  # every round asks it of every entry; keys are few and stable
def bucket_of(kind: str, key: str) -> int:
    return hashlib.sha256(f"{kind}\0{key}".encode()).digest()[0] % BUCKETS


def state_hash(entry: Entry) -> bytes:
    return entry.state_hash.to_bytes(DIGEST_BYTES, "big")


def digests(entries: Iterable[Entry]) -> dict[str, list[bytes]]:
    """The digests of `entries` computed from scratch (`Entries.digests` keeps them as
    entries change; this is what they must equal)."""
    out: dict[str, list[int]] = {}
    for entry in entries:
        row = out.setdefault(entry.kind, [0] * BUCKETS)
        row[bucket_of(entry.kind, entry.key)] ^= entry.state_hash
    return {kind: _encode_row(row) for kind, row in out.items()}


def _encode_row(row: list[int]) -> list[bytes]:
    return [v.to_bytes(DIGEST_BYTES, "big") for v in row]


_NONE: dict[EntryId, Entry] = {}


class Entries(Mapping[EntryId, Entry]):
    """A replica's entries, indexed for anti-entropy, read as a mapping of id to entry.

    A sync round asks for the digests and lists or plans a few buckets; under a fill flood
    the registry holds thousands of entries while one honest write changes one bucket. So
    this keeps, as entries change, each kind's bucket digests (the XOR of their entries'
    state hashes: XOR-ing the old state out and the new one in is the same digest
    `digests` computes from scratch) and each (kind, bucket)'s keys in order: reading the
    digests costs O(kinds x buckets) and a listing or plan of some buckets reads only
    their entries, from the first id it wants.

    Changed only through `put` and `remove` (the replica's writes, loads and garbage
    collection), so no change can miss the index; a read-only mapping otherwise."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._by_id: dict[EntryId, Entry] = {}
        self._xor: dict[str, list[int]] = {}  # kind -> each bucket's XOR of state hashes
        self._count: dict[str, int] = {}  # kind -> entries held (a kind with none has no row)
        self._keys: dict[tuple[str, int], list[str]] = {}  # (kind, bucket) -> sorted keys
        self._by_kind: dict[str, dict[EntryId, Entry]] = {}  # kind -> its entries
        self._tombstones: set[EntryId] = set()
        self._encoded: dict[str, list[bytes]] = {}  # `digests()`, kept up to date lazily
        self._stale: set[str] = set()  # kinds whose encoded row is out of date
        for entry in entries:
            self.put(entry)

    # -- the mapping (a dict's speed: every check of every entry reads it) -----------------

    def __getitem__(self, entry_id: EntryId) -> Entry:
        return self._by_id[entry_id]

    def __iter__(self) -> Iterator[EntryId]:
        return iter(self._by_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def __contains__(self, entry_id: object) -> bool:
        return entry_id in self._by_id

    def get(self, entry_id: EntryId, default: Entry | None = None) -> Entry | None:  # type: ignore[override]
        return self._by_id.get(entry_id, default)

    def keys(self) -> KeysView[EntryId]:
        return self._by_id.keys()

    def values(self) -> ValuesView[Entry]:
        return self._by_id.values()

    def items(self) -> ItemsView[EntryId, Entry]:
        return self._by_id.items()

    # -- changes ---------------------------------------------------------------------------

    def put(self, entry: Entry) -> Entry | None:
        """Hold `entry` in place of what its id held (returned, None if nothing). Unchecked:
        the replica checks and merges before it puts."""
        kind, key = entry_id = entry.id
        bucket = bucket_of(kind, key)
        old = self._by_id.get(entry_id)
        if old is None:
            row = self._xor.setdefault(kind, [0] * BUCKETS)
            self._count[kind] = self._count.get(kind, 0) + 1
            bisect.insort(self._keys.setdefault((kind, bucket), []), key)
        else:
            row = self._xor[kind]
            row[bucket] ^= old.state_hash
        row[bucket] ^= entry.state_hash
        self._by_id[entry_id] = entry
        self._by_kind.setdefault(kind, {})[entry_id] = entry
        if entry.deleted:
            self._tombstones.add(entry_id)
        else:
            self._tombstones.discard(entry_id)
        self._stale.add(kind)
        return old

    def remove(self, entry_id: EntryId) -> Entry:
        """Forget the entry held under `entry_id` (KeyError if none) and return it."""
        entry = self._by_id.pop(entry_id)
        kind, key = entry_id
        bucket = bucket_of(kind, key)
        self._tombstones.discard(entry_id)
        self._stale.add(kind)
        keys = self._keys[(kind, bucket)]
        del keys[bisect.bisect_left(keys, key)]
        if not keys:
            del self._keys[(kind, bucket)]
        self._count[kind] -= 1
        del self._by_kind[kind][entry_id]
        if self._count[kind] == 0:  # as `digests` computes it: no row for a kind with none
            del self._count[kind], self._xor[kind], self._by_kind[kind]
        else:
            self._xor[kind][bucket] ^= entry.state_hash
        return entry

    # -- what anti-entropy reads -----------------------------------------------------------

    def digests(self) -> dict[str, list[bytes]]:
        """Every kind's bucket digests, equal to `digests(self.values())`; the same object
        until an entry changes (callers must not change it)."""
        if self._stale:
            encoded = dict(self._encoded)  # a new object: one handed out before stays as it was
            for kind in self._stale:
                row = self._xor.get(kind)
                if row is None:
                    encoded.pop(kind, None)
                else:
                    encoded[kind] = _encode_row(row)
            self._encoded = encoded
            self._stale.clear()
        return self._encoded

    def of_kind(self, kind: str) -> ValuesView[Entry]:
        """The entries of one kind (deleted ones too), without reading the others: the
        daemon reads the `blocks` announcements on every route and stream, and a fill
        flood's thousands of entries are of another kind."""
        return self._by_kind.get(kind, _NONE).values()

    def kinds(self) -> list[str]:
        """The kinds of the entries held, in order."""
        return sorted(self._count)

    def tombstones(self) -> list[Entry]:
        """The deleted entries held (what garbage collection looks at)."""
        return [self._by_id[entry_id] for entry_id in self._tombstones]

    def ids_in(
        self,
        buckets: Iterable[tuple[str, int]],
        after: EntryId | None = None,
        end: EntryId | None = None,
    ) -> Iterator[EntryId]:
        """The ids held in `buckets` that come after `after` and not after `end`, in (kind,
        key) order: only those buckets' keys are read, from `after` on."""
        by_kind: dict[str, set[int]] = {}
        for kind, bucket in buckets:
            by_kind.setdefault(kind, set()).add(bucket)
        for kind in sorted(by_kind):
            if after is not None and kind < after[0]:
                continue
            if end is not None and kind > end[0]:
                return
            runs = []
            for bucket in sorted(by_kind[kind]):
                keys = self._keys.get((kind, bucket))
                if not keys:
                    continue
                lo = bisect.bisect_right(keys, after[1]) if after and kind == after[0] else 0
                hi = bisect.bisect_right(keys, end[1]) if end and kind == end[0] else len(keys)
                if lo < hi:
                    runs.append(keys[lo:hi])
            ordered = runs[0] if len(runs) == 1 else heapq.merge(*runs)
            for key in ordered:
                yield (kind, key)


def _indexed(entries: Mapping[EntryId, Entry]) -> Entries:
    """`entries` as an index (a replica's already is; any other mapping is indexed once)."""
    return entries if isinstance(entries, Entries) else Entries(entries.values())


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


def summary_bytes(entry: Entry) -> int:
    """An upper bound of one summary's encoded size."""
    return (
        SUMMARY_OVERHEAD
        + len(entry.kind.encode())
        + len(entry.key.encode())
        + len(entry.owner.encode())
        + len(entry.author.encode())
        + DIGEST_BYTES
    )


@dataclass(frozen=True)
class Listing:
    buckets: list[tuple[str, int]]
    summaries: list[Summary]
    truncated: bool
    # where the next page starts (the last id listed) when truncated
    next: EntryId | None = None


def listing(
    entries: Mapping[EntryId, Entry],
    buckets: list[tuple[str, int]],
    after: EntryId | None = None,
    *,
    max_items: int = MAX_LISTING,
    max_bytes: int = 1 << 20,
) -> Listing:
    """One page of the summaries of `entries` in `buckets` with ids after `after`, at most
    `max_items` of them and about `max_bytes` (always at least one)."""
    index = _indexed(entries)
    out: list[Summary] = []
    size = 0
    for entry_id in index.ids_in(buckets, after):
        entry = index[entry_id]
        cost = summary_bytes(entry)
        if out and (len(out) == max_items or size + cost > max_bytes):
            return Listing(buckets, out, truncated=True, next=(out[-1][0], out[-1][1]))
        out.append(summary(entry))
        size += cost
    return Listing(buckets, out, truncated=False)


def _rank(claim: Any, version: Any) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    return (tuple(claim), tuple(version))


def _beats(a: tuple[tuple[Any, ...], ...], b: tuple[tuple[Any, ...], ...]) -> bool:
    """The same order as `registry.entry.better`: smaller claim, then larger version."""
    if a[0] != b[0]:
        return a[0] < b[0]
    return a[1] > b[1]


def plan(
    mine: Mapping[EntryId, Entry], theirs: Listing, after: EntryId | None = None
) -> tuple[list[EntryId], list[Entry]]:
    """What to pull from the peer, and what to push to it, for one listing page: the page
    covers the ids after `after` up to its `next` (to the end when it is the last page)."""
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
    end = theirs.next if theirs.truncated else None
    if theirs.truncated and end is None:
        return pull, push  # an old-style truncated page: its range is unknown, push nothing
    index = _indexed(mine)
    for entry_id in index.ids_in(theirs.buckets, after, end):
        if entry_id not in listed:
            push.append(index[entry_id])
    return pull, push


# -- wire forms (bounded, validated through registry.wire) ------------------------------


def encode_digests(d: Mapping[str, list[bytes]], after: EntryId | None = None) -> dict[str, Any]:
    msg: dict[str, Any] = {"op": "digests", "digests": {k: list(v) for k, v in d.items()}}
    if after is not None:
        msg["after"] = {"kind": after[0], "key": after[1]}
    return msg


def parse_digests(msg: Any) -> dict[str, list[bytes]]:
    """The digests of a digests op (a `wire.DigestsOp` or its raw map)."""
    if not isinstance(msg, wire.DigestsOp):
        if not isinstance(msg, dict):
            raise SyncError("digests must be a map")
        try:
            msg = wire.convert({"v": wire.WIRE_VERSION, **msg, "op": "digests"}, wire.DigestsOp)
        except wire.WireError as exc:
            raise SyncError(exc.detail) from None
    return {kind: list(row) for kind, row in msg.digests.items()}


def encode_listing(lst: Listing) -> dict[str, Any]:
    msg: dict[str, Any] = {
        "buckets": [list(b) for b in lst.buckets],
        "summaries": [list(s) for s in lst.summaries],
        "truncated": lst.truncated,
    }
    if lst.next is not None:
        msg["next"] = {"kind": lst.next[0], "key": lst.next[1]}
    return msg


def parse_listing(msg: Any) -> Listing:
    """A listing reply (a `wire.ListingReply` or its raw map) as a `Listing`."""
    if not isinstance(msg, wire.ListingReply):
        if not isinstance(msg, dict):
            raise SyncError("listing must be a map")
        try:
            msg = wire.convert({"v": wire.WIRE_VERSION, **msg}, wire.ListingReply)
        except wire.WireError as exc:
            raise SyncError(exc.detail) from None
    summaries: list[Summary] = [(k, key, list(c), list(v)) for k, key, c, v in msg.summaries]
    nxt = (msg.next.kind, msg.next.key) if msg.next is not None else None
    return Listing(list(msg.buckets), summaries, msg.truncated, nxt)
