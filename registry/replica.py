"""A node's replica of the registries: verified, authorized, merged, durable.

Every entry, from a local user or from a peer, goes through `apply`: signature, clock, schema,
authorization and admission checks, then the pure merge of `registry.entry`, then one sqlite
transaction for the whole batch. Nothing here touches the network.

Who may write:
- an entry's owner (the author of the write that created the key) may update or delete it;
- entries of a cluster (the `clusters` entry itself and any entry whose value names a
  `cluster_id`) may be written only by that cluster's admins, as listed in the cluster entry
  this replica holds; the cluster's creator is its first admin;
- a cluster's `members` entries follow its admission rule (`registry.clusters.member_refusal`):
  admins write any, a peer may join by its own entry as the rule allows, and leave;
- each kind's admission hook may refuse a write with a reason.
An entry whose cluster this replica does not know yet is refused (`unknown_cluster`); anti-
entropy offers it again later, once the cluster entry has arrived.
"""

from __future__ import annotations

import base64
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import trio

from p2p import codec, identity
from registry import clusters, schemas, sync
from registry.entry import Entry, EntryId, join, sign_entry, verify_entry
from registry.hlc import ClockError, HybridClock
from registry.store import RegistryStore

MAX_VALUE_BYTES = 64 * 1024
MAX_LIST_LIMIT = 1000
# defaults of `Limits` (daemon config [registry]): an honest node stays far below them
MAX_ENTRY_BYTES = 64 * 1024
AUTHOR_MAX_ENTRIES = 10_000
AUTHOR_MAX_BYTES = 4 << 20
# bytes of entries one author may have accepted here, per second and at once (a token bucket):
# an honest author writes a few KB at a time; an author writing its whole quota at once lands
# it over seconds, so its replication (checks, sqlite writes, gossip, pulls) is spread out
# instead of stalling every node together
AUTHOR_BYTES_PER_S = 256 << 10
AUTHOR_BYTES_BURST = 1 << 20
MAX_RATE_AUTHORS = 4096  # authors whose byte budget is remembered (the least recent forgotten)
# `apply` commits a batch in parts of at most this many bytes or entries, each under the
# apply lock alone (one sqlite transaction each): a write queued behind a large batch (a 1 MiB
# pull page, a 2 MB push) waits for one part, not for all of it (the lock is fair)
APPLY_PART_BYTES = 256 << 10
APPLY_PART_ENTRIES = 64
# how recent a competing (earlier) claim on an already-owned key must be to take it over
CLAIM_WINDOW_MS = 60_000
# quota refusals of one author in one batch after which the rest of its new keys in that
# batch are refused at once (a flood of one author's entries costs a few checks per message)
QUOTA_STRIKES = 4

# (source, reason): where a refused entry came from ("local", "gossip", "sync") and why
RejectHook = Callable[[str, str], None]


class Rejected(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Limits:
    """What one entry and one author may take in this replica.

    `max_entry_bytes` bounds an entry as it travels (msgpack of its wire form, signature and
    all). The author quotas count every entry an author wrote that this replica holds (its
    current version, tombstones included, until collected), over all kinds; `per_kind`
    adds a stricter (entries, bytes) quota per author for single kinds. A write that would
    take its author over a quota is refused with reason `quota`, from any source; a write
    that does not grow its author's usage (an update in place, a delete) is always let
    through, so an author over quota can still shrink.

    `author_bytes_per_s` and `author_bytes_burst` bound how fast one author's entries are
    accepted (a token bucket of their wire sizes, every accepted write counted, from any
    source): a write over it is refused with reason `rate_limited` and taken later (anti-
    entropy offers it again; a local client is told to retry).

    The `msgspec.Meta` bounds are what a config may set (daemon.settings checks them at load,
    and that `author_max_bytes` is at least `max_entry_bytes`; construction does not).
    """

    max_entry_bytes: Annotated[int, msgspec.Meta(ge=1024, le=256 * 1024)] = MAX_ENTRY_BYTES
    author_max_entries: Annotated[int, msgspec.Meta(ge=1)] = AUTHOR_MAX_ENTRIES
    author_max_bytes: Annotated[int, msgspec.Meta(ge=1024)] = AUTHOR_MAX_BYTES
    per_kind: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    author_bytes_per_s: Annotated[float, msgspec.Meta(gt=0)] = float(AUTHOR_BYTES_PER_S)
    author_bytes_burst: Annotated[int, msgspec.Meta(ge=1024)] = AUTHOR_BYTES_BURST


def wire_size(entry: Entry) -> int:
    """An entry's size as it travels and is counted against quotas."""
    return len(codec.encode(entry.to_wire()))


@dataclass(frozen=True)
class Page:
    items: list[Entry]
    next_cursor: str | None


def encode_cursor(entry_id: EntryId) -> str:
    return base64.urlsafe_b64encode(codec.encode(list(entry_id))).decode()


def decode_cursor(cursor: str) -> EntryId:
    try:
        kind, key = codec.decode(base64.urlsafe_b64decode(cursor.encode()), max_bytes=1024)
        if isinstance(kind, str) and isinstance(key, str):
            return (kind, key)
    except (ValueError, TypeError, codec.CodecError):
        pass
    raise Rejected("bad_cursor", "cursor is not one returned by registry_list")


class Replica:
    def __init__(
        self,
        ident: identity.NodeIdentity,
        *,
        clock: HybridClock | None = None,
        store: RegistryStore | None = None,
        hooks: dict[str, schemas.AdmissionHook] | None = None,
        on_reject: RejectHook | None = None,
        claim_window_ms: int = CLAIM_WINDOW_MS,
        limits: Limits | None = None,
    ) -> None:
        self.ident = ident
        self.limits = limits or Limits()
        self.claim_window_ms = claim_window_ms
        self.clock = clock or HybridClock()
        self.store = store
        self.hooks = schemas.default_hooks if hooks is None else hooks
        self._on_reject = on_reject or (lambda source, reason: None)
        # read-only to all but this class, which changes it only through `put` / `remove`
        # (they keep the anti-entropy index: digests, keys by bucket, tombstones)
        self.entries = sync.Entries()
        self._mutations = 0  # counts changes to `entries`: a cache over them is keyed on it
        self._apply_lock = trio.Lock()
        self.applied = 0
        self.rejected: Counter[str] = Counter()
        # quota accounting: (author, kind or "*") -> [entries, bytes], and each held entry's size
        self.usage: dict[tuple[str, str], list[int]] = {}
        self._sizes: dict[EntryId, int] = {}
        self._size_memo: dict[int, tuple[Entry, int]] = {}  # entries being checked or applied
        # accepted-bytes budget per author: author -> (tokens, when last refilled, in s)
        self._rate: OrderedDict[str, tuple[float, float]] = OrderedDict()

    async def load(self) -> None:
        """Read the store. An entry that no longer passes the shape, schema and admission
        checks (one stored by an older version, or a damaged row) is left out and counted
        (`bad_entry`, source `store`): it must not reach the readers of the replica.

        Entries over the size limit or their author's quota (stored before the limits, or
        under larger ones) are left out too (`too_large` / `quota`, source `store`), the
        earliest written kept first; their rows stay in the store, so raising the limits
        brings them back."""
        if self.store is None:
            return
        loaded = await self.store.load_all()
        for _ in range(self.store.bad_rows):
            self._count_reject("store", "bad_entry")
        loaded.sort(key=lambda e: (e.ts, e.kind, e.key))
        for entry in loaded:
            try:
                self._check_stored(entry)
            except Rejected:
                self._count_reject("store", "bad_entry")
                continue
            try:
                self._check_size_and_quota(entry, self.entries.get(entry.id), None)
            except Rejected as exc:
                self._count_reject("store", exc.reason)
                continue
            self._account(entry, self.entries.get(entry.id))
            self.entries.put(entry)
            self.clock.advance(entry.ts)
        self._mutations += 1
        self._size_memo.clear()

    @property
    def changes(self) -> int:
        """How many times `entries` changed: a cache over them is stale once this moved."""
        return self._mutations

    def _check_stored(self, entry: Entry) -> None:
        if entry.kind not in schemas.KINDS:
            raise Rejected("bad_entry", f"unknown kind {entry.kind!r}")
        try:
            schemas.validate_key(entry.kind, entry.key)
            if entry.value is not None:
                schemas.validate_value(entry.kind, entry.key, entry.value)
        except (schemas.SchemaError, TypeError, ValueError) as exc:
            raise Rejected("bad_entry", str(exc)) from None
        write = schemas.Write(entry.kind, entry.key, entry.value, entry.author, entry.owner)
        reason = schemas.admit(write, self.hooks)
        if reason:
            raise Rejected("bad_entry", reason)

    def _count_reject(self, source: str, reason: str) -> None:
        self.rejected[reason] += 1
        self._on_reject(source, reason)

    # -- quotas ------------------------------------------------------------------------

    def _size(self, entry: Entry) -> int:
        held = self.entries.get(entry.id)
        if held is entry and entry.id in self._sizes:
            return self._sizes[entry.id]
        memo = self._size_memo.get(id(entry))
        if memo is not None and memo[0] is entry:
            return memo[1]
        if len(self._size_memo) >= 4096:
            self._size_memo.clear()
        size = wire_size(entry)
        self._size_memo[id(entry)] = (entry, size)  # the entry is held: its id stays its own
        return size

    def _deltas(
        self, entry: Entry, current: Entry | None
    ) -> dict[tuple[str, str], tuple[int, int]]:
        """How replacing `current` with `entry` changes each (author, scope) usage."""
        size = self._size(entry)
        out: dict[tuple[str, str], tuple[int, int]] = {}
        for scope in ("*", entry.kind):
            out[(entry.author, scope)] = (1, size)
        if current is not None:
            old = self._size(current)
            for scope in ("*", current.kind):
                n, b = out.get((current.author, scope), (0, 0))
                out[(current.author, scope)] = (n - 1, b - old)
        return out

    def _account(self, entry: Entry, current: Entry | None) -> None:
        size = self._size(entry)
        for slot, (n, b) in self._deltas(entry, current).items():
            row = self.usage.setdefault(slot, [0, 0])
            row[0] += n
            row[1] += b
            if row == [0, 0]:
                del self.usage[slot]
        self._sizes[entry.id] = size

    def _forget(self, entry: Entry) -> None:
        size = self._sizes.pop(entry.id, None)
        if size is None:
            size = wire_size(entry)
        for scope in ("*", entry.kind):
            row = self.usage.get((entry.author, scope))
            if row is not None:
                row[0] -= 1
                row[1] -= size
                if row[0] <= 0:
                    del self.usage[(entry.author, scope)]

    def _check_size_and_quota(
        self,
        entry: Entry,
        current: Entry | None,
        pending_usage: Mapping[tuple[str, str], list[int]] | None,
    ) -> None:
        limits = self.limits
        size = self._size(entry)
        if size > limits.max_entry_bytes:
            raise Rejected(
                "too_large",
                f"{entry.kind}/{entry.key} takes {size} bytes (limit {limits.max_entry_bytes}, "
                "registry.max_entry_bytes)",
            )
        for (author, scope), (n, b) in self._deltas(entry, current).items():
            if author != entry.author or (n <= 0 and b <= 0):
                continue  # only a write that grows its author's usage can break a quota
            if scope == "*":
                max_n, max_b = limits.author_max_entries, limits.author_max_bytes
            elif scope in limits.per_kind:
                max_n, max_b = limits.per_kind[scope]
            else:
                continue
            held = (pending_usage or {}).get((author, scope)) or self.usage.get(
                (author, scope), [0, 0]
            )
            if held[0] + n > max_n or held[1] + b > max_b:
                what = "all kinds" if scope == "*" else f"kind {scope}"
                raise Rejected(
                    "quota",
                    f"author {author} is at its quota for {what}: {held[0]} entries, "
                    f"{held[1]} bytes (limits {max_n} entries, {max_b} bytes; "
                    "registry.author_max_entries / author_max_bytes)",
                )

    # -- the accepted-bytes rate ---------------------------------------------------------

    @property
    def rate_burst(self) -> float:
        """A full token bucket: an author's budget before it writes (at least one entry of
        the largest size)."""
        return float(max(self.limits.author_bytes_burst, self.limits.max_entry_bytes))

    def rate_room(self, author: str) -> float:
        """Bytes of `author`'s entries this replica would accept now (its token bucket)."""
        limits = self.limits
        burst = self.rate_burst
        now = self.clock.now_ms() / 1000
        tokens, last = self._rate.get(author, (burst, now))
        return min(burst, tokens + max(0.0, now - last) * limits.author_bytes_per_s)

    def _spend(self, author: str, size: int) -> None:
        """Take `size` bytes from `author`'s bucket (an accepted write)."""
        tokens = self.rate_room(author) - size
        self._rate[author] = (tokens, self.clock.now_ms() / 1000)
        self._rate.move_to_end(author)
        while len(self._rate) > MAX_RATE_AUTHORS:
            self._rate.popitem(last=False)  # forgotten: a full bucket again

    def _check_rate(self, entry: Entry, pending_spent: Mapping[str, int] | None) -> None:
        size = self._size(entry)
        spent = (pending_spent or {}).get(entry.author, 0)
        if self.rate_room(entry.author) - spent < size:
            limits = self.limits
            raise Rejected(
                "rate_limited",
                f"author {entry.author} wrote more than this node accepts at once "
                f"({self.rate_burst:.0f} bytes, then "
                f"{limits.author_bytes_per_s:.0f} bytes/s; registry.author_bytes_burst / "
                f"author_bytes_per_s): {entry.kind}/{entry.key} ({size} bytes) is taken later",
            )

    # -- checks ------------------------------------------------------------------------

    def admins_of(
        self, cluster_id: str, pending: Mapping[EntryId, Entry] | None = None
    ) -> set[str] | None:
        cluster_id_ = ("clusters", cluster_id)
        cluster = (pending or {}).get(cluster_id_) or self.entries.get(cluster_id_)
        if cluster is None or cluster.value is None:
            return None
        admins = cluster.value.get("admins")
        return {a for a in admins if isinstance(a, str)} if isinstance(admins, list) else set()

    def governing_cluster(self, entry: Entry, current: Entry | None) -> str | None:
        if entry.kind == "clusters":
            return entry.key
        if entry.kind == "members":
            return entry.key.split("/", 1)[0]
        for source in (entry.value, current.value if current else None):
            if isinstance(source, dict) and isinstance(source.get("cluster_id"), str):
                return source["cluster_id"]
        return None

    def check(
        self,
        entry: Entry,
        pending: Mapping[EntryId, Entry] | None = None,
        pending_usage: Mapping[tuple[str, str], list[int]] | None = None,
        pending_spent: Mapping[str, int] | None = None,
    ) -> None:
        """Raise Rejected unless `entry` may be merged into this replica (plus `pending`,
        the earlier entries of the same batch, `pending_usage`, their quota usage, and
        `pending_spent`, their bytes by author, not yet taken from the author's rate).

        The checks run cheapest first, so a flood costs little: size, the claimed author's
        quota and rate (dict lookups and one encoding), then kind, clock and schema, and only
        then the signature. Checking a quota or rate before the signature is safe: a refused
        entry changes nothing and never counts towards anyone's quota or rate, so a forger
        naming another author can only get its own entry refused."""
        current = (pending or {}).get(entry.id) or self.entries.get(entry.id)
        self._check_size_and_quota(entry, current, pending_usage)
        self._check_rate(entry, pending_spent)
        if entry.kind not in schemas.KINDS:
            raise Rejected("unknown_kind", f"unknown kind {entry.kind!r}")
        try:
            self.clock.check(entry.ts)
        except ClockError as exc:
            raise Rejected("bad_timestamp", str(exc)) from None
        if entry.created > entry.ts:
            raise Rejected("bad_timestamp", "an entry cannot be created after it was written")
        try:
            schemas.validate_key(entry.kind, entry.key)
            if entry.value is not None:
                if len(codec.encode(entry.value)) > MAX_VALUE_BYTES:
                    raise schemas.SchemaError(f"value exceeds {MAX_VALUE_BYTES} bytes")
                schemas.validate_value(entry.kind, entry.key, entry.value)
        except schemas.SchemaError as exc:
            raise Rejected("schema", str(exc)) from None
        if not verify_entry(entry):
            raise Rejected("bad_signature", "entry signature does not match its author")
        self._check_claim(entry, current)
        self._check_authorized(entry, current, pending)
        reason = schemas.admit(
            schemas.Write(
                kind=entry.kind,
                key=entry.key,
                value=entry.value,
                author=entry.author,
                existing_author=current.owner if current else None,
            ),
            self.hooks,
        )
        if reason:
            raise Rejected("admission", reason)

    def would_change(self, entry: Entry) -> bool:
        """Whether `entry` alone would be accepted and change this replica: raises Rejected
        as `check` does, False when it is held already or loses the merge. Changes and
        keeps nothing (a gossip validator asks it of entries it then drops)."""
        current = self.entries.get(entry.id)
        if current == entry:
            return False
        try:
            self.check(entry)
        finally:
            self._size_memo.pop(id(entry), None)  # `check` memoises the size of what it holds
        return join(current, entry) is entry

    def _check_claim(self, entry: Entry, current: Entry | None) -> None:
        """Refuse a takeover: a smaller (earlier) claim on a key held here under another claim
        is taken only if it was made within `claim_window_ms` of now.

        Two nodes creating one key at about the same time still converge on the earlier claim
        everywhere; a claim backdated to steal a key created more than the window ago is
        refused by every replica that holds the key. (A replica that never saw the key can
        still be fed a backdated claim first; closing that needs attested creation times.)
        """
        if current is None or entry.claim >= current.claim:
            return  # nothing held, the same claim, or a claim that loses the merge anyway
        if entry.created.wall_ms < self.clock.now_ms() - self.claim_window_ms:
            raise Rejected(
                "stale_claim",
                f"{entry.kind}/{entry.key} is already owned by {current.owner}; a competing "
                "claim must be recent",
            )

    def _check_authorized(
        self, entry: Entry, current: Entry | None, pending: Mapping[EntryId, Entry] | None
    ) -> None:
        cluster_id = self.governing_cluster(entry, current)
        if cluster_id is None:
            if entry.author != entry.owner:
                raise Rejected(
                    "unauthorized", f"{entry.kind}/{entry.key} is owned by {entry.owner}"
                )
            return
        admins = self.admins_of(cluster_id, pending)
        if entry.kind == "clusters" and admins is None:
            # creating a cluster (or re-creating one deleted): its creator must be an admin
            new_admins = (entry.value or {}).get("admins") or []
            if entry.author != entry.owner or entry.author not in new_admins:
                raise Rejected("unauthorized", "a cluster's creator must list itself in admins")
            return
        if admins is None:
            raise Rejected("unknown_cluster", f"cluster {cluster_id!r} is not known here (yet)")
        if entry.kind == "members":  # self-joins and leaves, by the cluster's admission rule
            cluster_ = ("clusters", cluster_id)
            cluster = (pending or {}).get(cluster_) or self.entries[cluster_]
            refusal = clusters.member_refusal(
                cluster.value or {}, entry.key, entry.value, entry.author, entry.ts.wall_ms
            )
            if refusal is not None:
                raise Rejected(refusal.reason, str(refusal))
            return
        if entry.author not in admins:
            raise Rejected("unauthorized", f"only admins of cluster {cluster_id!r} may write this")

    # -- writes ------------------------------------------------------------------------

    async def apply(self, entries: Iterable[Entry], source: str = "local") -> list[Entry]:
        """Check, merge and persist a batch; returns the entries that changed the replica.

        Batches apply one at a time: a batch merged against a state that another batch is
        still committing could write an older entry over a newer one. A large batch is
        applied in parts (APPLY_PART_BYTES, APPLY_PART_ENTRIES), each under the lock alone
        and committed in its own transaction, so that a write queued behind it (an honest
        user's, a small gossip message) waits for one part, not for the whole batch; the
        parts go in the batch's order, so a cluster entry still precedes what it governs."""
        changed: list[Entry] = []
        over_quota: Counter[tuple[str, str]] = Counter()  # quota refusals, by (author, kind)
        part: list[Entry] = []
        size = 0
        for entry in entries:
            cost = self._size(entry)
            if part and (size + cost > APPLY_PART_BYTES or len(part) >= APPLY_PART_ENTRIES):
                async with self._apply_lock:
                    changed += await self._apply(part, source, over_quota)
                part, size = [], 0
            part.append(entry)
            size += cost
        async with self._apply_lock:
            changed += await self._apply(part, source, over_quota)
        return changed

    async def _apply(
        self, entries: Iterable[Entry], source: str, over_quota: Counter[tuple[str, str]]
    ) -> list[Entry]:
        changed: dict[EntryId, Entry] = {}
        replaced: dict[EntryId, Entry | None] = {}  # what each changed id held before the batch
        pending_usage: dict[tuple[str, str], list[int]] = {}
        pending_spent: Counter[str] = Counter()  # bytes accepted in this batch, by author
        for entry in entries:
            current = changed.get(entry.id) or self.entries.get(entry.id)
            if current == entry:
                continue
            if current is None and over_quota[(entry.author, entry.kind)] >= QUOTA_STRIKES:
                # the author's further new keys of this kind in this batch: refused unchecked
                # (a new key always grows its usage); anti-entropy offers them again later
                self._count_reject(source, "quota")
                continue
            try:
                self.check(entry, changed, pending_usage, pending_spent)
            except Rejected as exc:
                if exc.reason == "quota":
                    over_quota[(entry.author, entry.kind)] += 1
                self._count_reject(source, exc.reason)
                continue
            if join(current, entry) is entry:
                for slot, (n, b) in self._deltas(entry, current).items():
                    row = pending_usage.setdefault(slot, list(self.usage.get(slot, [0, 0])))
                    row[0] += n
                    row[1] += b
                pending_spent[entry.author] += self._size(entry)
                replaced.setdefault(entry.id, self.entries.get(entry.id))
                changed[entry.id] = entry
                self.clock.observe(entry.ts)
        if changed:
            if self.store is not None:
                await self.store.apply(changed.values())
            for entry_id, entry in changed.items():
                self._account(entry, replaced[entry_id])
            for author, spent in pending_spent.items():
                self._spend(author, spent)
            for entry in changed.values():
                self.entries.put(entry)
            self.applied += len(changed)
            self._mutations += 1
        self._size_memo.clear()
        return list(changed.values())

    async def put(self, kind: str, key: str, value: dict[str, Any] | None) -> Entry:
        """A local write (value None deletes). Raises Rejected with a reason users can read."""
        current = self.entries.get((kind, key))
        ts = self.clock.now()
        reclaim = current is not None and current.deleted and kind == "members"
        if current is None or (
            current.deleted and current.owner != self.ident.peer_id and not reclaim
        ):
            if value is None:
                raise Rejected("not_found", f"{kind}/{key} does not exist")
            if current is not None:
                raise Rejected(
                    "unauthorized",
                    f"{kind}/{key} was deleted by its owner {current.owner}; the key is free "
                    "again once the tombstone is collected",
                )
            created, owner = ts, self.ident.peer_id
        else:
            created, owner = current.created, current.owner
        entry = sign_entry(
            self.ident, kind=kind, key=key, value=value, ts=ts, created=created, owner=owner
        )
        self.check(entry)  # raises with the reason; local refusals are not counted as attacks
        await self.apply([entry])
        return entry

    async def collect_garbage(self, horizon_ms: int) -> int:
        """Forget tombstones older than the horizon (a peer offline longer may resurrect)."""
        cutoff = self.clock.now().wall_ms - horizon_ms
        old = [e.id for e in self.entries.tombstones() if e.ts.wall_ms < cutoff]
        for entry_id in old:
            self._forget(self.entries.remove(entry_id))
        self._mutations += 1
        if old and self.store is not None:
            await self.store.purge_tombstones(cutoff)
        return len(old)

    # -- reads -------------------------------------------------------------------------

    def digests(self) -> dict[str, list[bytes]]:
        """Anti-entropy digests of every entry (`sync.digests`): every sync round, served or
        started, asks for them, so they are kept as entries change (`sync.Entries`), not
        recomputed over the whole registry."""
        return self.entries.digests()

    def get(self, kind: str, key: str) -> Entry | None:
        return self.entries.get((kind, key))

    def list(
        self,
        kind: str | None,
        predicate: Callable[[dict[str, Any]], bool] | None = None,
        *,
        limit: int = 100,
        cursor: str | None = None,
        include_deleted: bool = False,
    ) -> Page:
        after = decode_cursor(cursor) if cursor else None
        limit = max(1, min(limit, MAX_LIST_LIMIT))
        items: list[Entry] = []
        kinds = self.entries.kinds() if kind is None else [kind]
        # in id order from the cursor on, the kind's entries only (the index holds them sorted)
        buckets = [(k, b) for k in kinds for b in range(sync.BUCKETS)]
        for entry_id in self.entries.ids_in(buckets, after):
            entry = self.entries[entry_id]
            if entry.deleted and not include_deleted:
                continue
            if predicate is not None and not predicate(entry.to_json()):
                continue
            if len(items) == limit:
                return Page(items, encode_cursor(items[-1].id))
            items.append(entry)
        return Page(items, None)

    def stats(self) -> dict[str, Any]:
        by_kind: dict[str, dict[str, int]] = {k: {"live": 0, "deleted": 0} for k in schemas.KINDS}
        for entry in self.entries.values():
            bucket = by_kind.setdefault(entry.kind, {"live": 0, "deleted": 0})
            bucket["deleted" if entry.deleted else "live"] += 1
        return {
            "entries": len(self.entries),
            "live": sum(k["live"] for k in by_kind.values()),
            "deleted": sum(k["deleted"] for k in by_kind.values()),
            "by_kind": by_kind,
            "applied": self.applied,
            "rejected": dict(self.rejected),
            "clock": str(self.clock.last),
            "quota": self.quota_stats(),
        }

    def quota_stats(self, top: int = 5) -> dict[str, Any]:
        """The limits, and the authors holding the most bytes here (who a `quota` refusal
        is about, for an operator)."""
        totals = sorted(
            ((author, n, b) for (author, scope), (n, b) in self.usage.items() if scope == "*"),
            key=lambda row: (-row[2], row[0]),
        )
        return {
            "max_entry_bytes": self.limits.max_entry_bytes,
            "author_max_entries": self.limits.author_max_entries,
            "author_max_bytes": self.limits.author_max_bytes,
            "authors": len(totals),
            "top_authors": [
                {"author": author, "entries": n, "bytes": b} for author, n, b in totals[:top]
            ],
        }
