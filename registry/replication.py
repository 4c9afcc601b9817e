"""Replication of a `Replica` over a `Network`: gossip for new entries, anti-entropy for the rest.

- Every write that changes the local replica is published on the network's registry topic;
  receivers apply it (the gossip layer never echoes a message to its sender).
- Every `sync_interval_s`, anti-entropy with one random known peer (`registry.sync`): digests
  out, listing back, then pull what the peer has better and push what we have better. This is
  how a node that was offline, partitioned or just started catches up; bulk transfer goes over
  request/response, never gossip.
- The digests and pull requests of a round are hedged: one still unanswered after a few round
  trips (`Replicator.hedge_delay`) is sent to another random peer as well, up to `sync_hedges`
  more, and the first answer wins. A lost message then costs about a round trip, not
  `sync_timeout_s`; a node that missed a write's gossip catches up in its next round even on a
  lossy network, and only requests that are slow cost extra bytes.
Malformed gossip or sync messages are dropped and counted; they never reach the replica.
Gossip is validated before the network delivers or forwards it (`validate_gossip`): a message
none of whose entries this replica would take goes no further than this node.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
import trio

from p2p import codec
from p2p.network import GossipVerdict, Network, NetworkError
from registry import sync, wire
from registry.entry import Entry, EntryError, EntryId, entry_from_wire
from registry.replica import QUOTA_STRIKES, Rejected, Replica, wire_size

# refusals of a gossiped entry that only a faulty or hostile author earns (the rest, such as
# `unknown_cluster` or `stale_claim`, honest writes meet in passing)
HARMFUL_REASONS = frozenset(
    {"too_large", "quota", "unknown_kind", "bad_timestamp", "schema", "bad_signature"}
)
log = logging.getLogger(__name__)

SYNC_PROTOCOL = "/gridmesh/registry/sync/1.0.0"
WIRE_VERSION = wire.WIRE_VERSION
MAX_GOSSIP_BYTES = 512 * 1024
MAX_GOSSIP_ENTRIES = 64
MAX_SYNC_BYTES = 4 << 20  # the libp2p frame limit (p2p.host.MAX_FRAME_BYTES)
REPLY_MARGIN = 4096  # room for a reply's own framing beside its entries

_R = TypeVar("_R")
MAX_REFUSED = 10_000  # refused entry states remembered (the oldest are forgotten first)
MAX_PUSH_PEERS = 4096  # peers whose push budget is remembered (the least recent forgotten)
MAX_GOSSIP_AUTHORS = 4096  # authors whose gossip budget is remembered (the least recent forgotten)
# refusals that may pass later without a new version: the entry is fetched again next round
RETRY_REASONS = frozenset({"unknown_cluster", "bad_timestamp", "rate_limited"})


def _refusal(peer_id: str, entry_id: EntryId, claim: Any, version: Any) -> tuple[Any, ...]:
    """The key of a remembered refusal: by this replica (peer_id "") or by a peer."""
    return (peer_id, entry_id, tuple(claim), tuple(version))


def topic_for(network_id: str) -> str:
    return f"/gridmesh/{network_id}/registry/1"


@dataclass(frozen=True)
class ReplicationSettings:
    """How a replica syncs with its peers. The `msgspec.Meta` bounds are what a config may
    set (daemon.settings checks them at load; construction does not)."""

    network_id: str
    sync_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # one request of a round; a round whose requests all go unanswered this long fails, and
    # another peer is tried
    sync_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 0.5
    # extra peers a round's digests or pull request may also go to while it goes unanswered
    sync_hedges: Annotated[int, msgspec.Meta(ge=0)] = 2
    # the least wait before a hedge (the wait follows the measured round-trip time)
    hedge_min_s: Annotated[float, msgspec.Meta(gt=0)] = 0.05
    # entries pulled by anti-entropy are gossiped on only if written this recently (older ones
    # are what a returning or new node catches up on: re-flooding them helps no one)
    reannounce_window_s: Annotated[float, msgspec.Meta(ge=0)] = 5.0
    gc_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 60.0
    # deleted entries are forgotten after this long (a node offline longer may bring one back)
    tombstone_horizon_s: Annotated[float, msgspec.Meta(ge=60)] = 7 * 24 * 3600.0
    # the largest sync message (request or reply) sent or accepted: listings, pull replies
    # and pushes are paged under it, so a registry of any size syncs
    max_message_bytes: Annotated[int, msgspec.Meta(ge=1024)] = MAX_SYNC_BYTES
    # what one page (listing, pull reply, push) fills: small enough to cross a slow link
    # within sync_timeout_s, large enough that a big sync takes few round trips
    sync_page_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    # listing pages one round walks through; a larger registry continues next round
    max_pages_per_round: Annotated[int, msgspec.Meta(ge=1)] = 64
    # an entry refused when pulled (over quota, bad signature...) is not pulled again from
    # any peer for this long, unless its state changes
    refused_ttl_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # bytes of sync pushes one peer may have this node check, per second and at once (a token
    # bucket); a push over it is refused whole (`sync`/`rate_limited`, once per entry) and
    # answered `applied: 0`, so an honest pusher moves on: this node pulls what it lacks
    push_bytes_per_s: Annotated[float, msgspec.Meta(gt=0)] = float(4 << 20)
    push_bytes_burst: Annotated[int, msgspec.Meta(ge=1)] = 16 << 20
    # bytes of one author's new entries this node takes (and so relays) by gossip, per second
    # and at once (a token bucket, under the author's rate of `registry.replica.Limits`): an
    # author writing more comes by anti-entropy, one pull per node on its own stream. A
    # relayed message goes out whole on every mesh link, ahead of whatever is queued behind
    # it on that link: each ~480 KB message of the abuse bench's fill, taken every ~2 s at
    # the author's rate, held honest gossip behind it for 100-250 ms on the links it crossed
    gossip_author_bytes_per_s: Annotated[float, msgspec.Meta(gt=0)] = float(16 << 10)
    gossip_author_bytes_burst: Annotated[int, msgspec.Meta(ge=1)] = 512 << 10


class Replicator:
    def __init__(
        self,
        net: Network,
        replica: Replica,
        settings: ReplicationSettings,
        *,
        rng: random.Random | None = None,
        on_reject: Callable[[str, str], None] | None = None,
        on_entries: Callable[[str, str, str, int], None] | None = None,
    ) -> None:
        """`on_entries(via, stage, kind, count)`: entries from peers, `received` (decoded)
        and `applied` (changed the replica), via `gossip`, `sync_pull` or `sync_push`."""
        self.net = net
        self.replica = replica
        self.settings = settings
        self.topic = topic_for(settings.network_id)
        self._rng = rng or random.Random()
        self._on_reject = on_reject or (lambda source, reason: None)
        self._on_entries = on_entries
        self.stats: Counter[str] = Counter()
        # smoothed round-trip time of answered sync requests and its mean deviation (as TCP's
        # retransmission timer keeps them); None until the first answer
        self._srtt: float | None = None
        self._rttvar = 0.0
        # the listing page the next round starts at (None: the first)
        self._resume: EntryId | None = None
        # entry states refused when pulled, and until when not to pull them again
        self._refused: OrderedDict[tuple[Any, ...], float] = OrderedDict()
        # push budget per sending peer: peer id -> (tokens, when last refilled)
        self._push_tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()
        # gossip budget per author: author -> (tokens, when last refilled)
        self._gossip_tokens: OrderedDict[str, tuple[float, float]] = OrderedDict()

    # -- outgoing ----------------------------------------------------------------------

    async def write(self, kind: str, key: str, value: dict[str, Any] | None) -> Entry:
        """A local write: applied durably first, then gossiped. Returns once acknowledged."""
        entry = await self.replica.put(kind, key, value)
        await self.announce([entry])
        return entry

    async def announce(self, entries: Iterable[Entry]) -> None:
        """Gossip `entries` in messages of at most MAX_GOSSIP_ENTRIES entries and
        MAX_GOSSIP_BYTES (what every receiver accepts)."""
        batch: list[dict[str, Any]] = []
        size = 0
        for entry in entries:
            item = entry.to_wire()
            cost = len(codec.encode(item))
            if batch and (
                len(batch) == MAX_GOSSIP_ENTRIES or size + cost > MAX_GOSSIP_BYTES - REPLY_MARGIN
            ):
                await self._publish(batch)
                batch, size = [], 0
            batch.append(item)
            size += cost
        if batch:
            await self._publish(batch)

    async def _publish(self, batch: list[dict[str, Any]]) -> None:
        data = codec.encode({"v": WIRE_VERSION, "entries": batch})
        try:
            await self.net.publish(self.topic, data)
            self.stats["gossip_sent"] += 1
        except NetworkError as exc:  # anti-entropy delivers it later
            log.debug("gossip publish failed: %s", exc)

    # -- incoming ----------------------------------------------------------------------

    def _reject(self, source: str, reason: str) -> None:
        self.stats[f"rejected_{source}"] += 1
        self._on_reject(source, reason)

    def _tally(self, via: str, stage: str, entries: list[Entry]) -> None:
        if self._on_entries is not None:
            for kind, count in Counter(e.kind for e in entries).items():
                self._on_entries(via, stage, kind, count)

    def _entries(self, raw: list[Any], source: str) -> list[Entry]:
        """The entries of a message, each through its typed form; a bad one is counted."""
        out = []
        for item in raw:
            try:
                out.append(entry_from_wire(item))
            except EntryError as exc:
                self._reject(source, exc.reason)
        return out

    @property
    def _budget(self) -> int:
        """Bytes a listing, pull reply or push may fill: `sync_page_bytes`, and always the
        message limit less room for the envelope."""
        limit = self.settings.max_message_bytes - REPLY_MARGIN
        return max(1024, min(self.settings.sync_page_bytes, limit))

    def validate_gossip(self, sender: str, data: bytes) -> GossipVerdict:
        """The registry topic's gossip validator (`Gossip.subscribe`): take a message only if
        it decodes and at least one entry in it would be accepted and change this replica.
        The network neither delivers nor forwards a refused message, so an entry over its
        author's quota, badly signed or already held here costs the rest of the mesh nothing.
        A message refused for what only a faulty or hostile author writes (HARMFUL_REASONS,
        or an entry that does not decode) is a REJECT, held against its origin; one that is
        only old news here (every entry held already, losing the merge, or refused for what
        honest writes meet in passing: a cluster not known here yet, a raced claim) is an
        IGNORE. (Until session 11 both were held against the origin: every node's duplicate
        copies of honest writes banned their authors, and a node itself, in bench/abuse.py.)

        Synchronous and cheap: it stops at the first entry that would change the replica,
        checks each cheapest first (`Replica.check`: size and quota before the signature),
        and, as `Replica.apply` does, refuses an author's further new keys of a kind unchecked
        after QUOTA_STRIKES quota refusals. It changes nothing but counts: a refused message's
        refusals are counted here exactly as `on_gossip` would have counted them (an accepted
        message's, by `on_gossip`)."""
        try:
            msg = wire.decode_gossip(data, MAX_GOSSIP_BYTES)
        except wire.WireError as exc:
            self.stats["gossip_refused"] += 1
            self._reject("gossip", exc.reason)
            return GossipVerdict.REJECT
        malformed: list[str] = []
        refused: list[str] = []
        over_quota: Counter[tuple[str, str]] = Counter()
        entries: list[Entry] = []
        for item in msg.entries:
            try:
                entries.append(entry_from_wire(item))
            except EntryError as exc:
                malformed.append(exc.reason)
        need = self._new_bytes(entries)
        over_rate = self._over_rate(need)
        for entry in entries:
            if entry.author in over_rate:
                if self.replica.entries.get(entry.id) != entry:  # (held: old news)
                    refused.append("rate_limited")
                continue
            if over_rate:  # taken for another author's entry, it would go on whole: not taken
                continue
            slot = (entry.author, entry.kind)
            if over_quota[slot] >= QUOTA_STRIKES and entry.id not in self.replica.entries:
                refused.append("quota")
                continue
            try:
                if self.replica.would_change(entry):
                    for author, size in need.items():
                        self._spend_gossip(author, size)
                    return GossipVerdict.ACCEPT
            except Rejected as exc:
                over_quota[slot] += exc.reason == "quota"
                refused.append(exc.reason)
        self.stats["gossip_refused"] += 1
        for reason in malformed:
            self._reject("gossip", reason)
        for reason in refused:  # as Replica.apply counts what it refuses
            self.replica._count_reject("gossip", reason)
        if malformed or HARMFUL_REASONS.intersection(refused):
            return GossipVerdict.REJECT
        return GossipVerdict.IGNORE

    def _new_bytes(self, entries: list[Entry]) -> Counter[str]:
        """Bytes of new entries (not held here as they are) in one message, by author."""
        need: Counter[str] = Counter()
        for entry in entries:
            if self.replica.entries.get(entry.id) != entry:
                need[entry.author] += wire_size(entry)
        return need

    def _over_rate(self, need: Counter[str]) -> set[str]:
        """The authors whose new entries in one gossip message (`need`, `_new_bytes`) do not
        all fit their rate budget here (`Replica.rate_room`) or their gossip budget
        (`gossip_author_bytes_per_s`). Such a message is not taken at all, though some of it
        would fit, nor for another author's entries in it (one fresh entry of a second
        identity would otherwise carry the rest past every budget): taken, it would be
        forwarded whole, and every node would decode and refuse the rest, message after
        message, for as long as the author keeps writing faster than its rate (a fill); what
        fits comes by anti-entropy instead. The gossip
        budget is the smaller: an author's writes past it are not relayed on every mesh
        link (where each large message delays the honest gossip queued behind it) but
        pulled, once per node, at the author's rate."""
        return {
            a
            for a, size in need.items()
            if size > min(self.replica.rate_room(a), self._gossip_room(a))
        }

    def _gossip_room(self, author: str) -> float:
        """Bytes of `author`'s new entries this node would take by gossip now."""
        burst = float(self.settings.gossip_author_bytes_burst)
        now = self.replica.clock.now_ms() / 1000  # the replica's clock, as its rate's
        tokens, last = self._gossip_tokens.get(author, (burst, now))
        return min(burst, tokens + max(0.0, now - last) * self.settings.gossip_author_bytes_per_s)

    def _spend_gossip(self, author: str, size: int) -> None:
        """Take `size` bytes from `author`'s gossip budget (a message taken)."""
        tokens = self._gossip_room(author) - size
        self._gossip_tokens.pop(author, None)
        self._gossip_tokens[author] = (tokens, self.replica.clock.now_ms() / 1000)
        while len(self._gossip_tokens) > MAX_GOSSIP_AUTHORS:
            self._gossip_tokens.popitem(last=False)  # forgotten: a full bucket again

    async def on_gossip(self, sender: str, data: bytes) -> None:
        try:
            msg = wire.decode_gossip(data, MAX_GOSSIP_BYTES)
        except wire.WireError as exc:
            self._reject("gossip", exc.reason)
            return
        entries = self._entries(msg.entries, "gossip")
        self._tally("gossip", "received", entries)
        if entries:
            changed = await self.replica.apply(entries, "gossip")
            self.stats["gossip_applied"] += len(changed)
            self._tally("gossip", "applied", changed)

    async def on_sync(self, sender: str, payload: bytes) -> bytes:
        """Serve one anti-entropy step for a peer."""
        try:
            op = wire.decode_sync_op(payload, self.settings.max_message_bytes)
            if isinstance(op, wire.DigestsOp):
                theirs = sync.parse_digests(op)
                mine = self.replica.digests()
                after = (op.after.kind, op.after.key) if op.after is not None else None
                lst = sync.listing(
                    self.replica.entries,
                    sync.differing_buckets(mine, theirs),
                    after,
                    max_bytes=self._budget,
                )
                reply: dict[str, Any] = sync.encode_listing(lst)
            elif isinstance(op, wire.PullOp):
                found: list[dict[str, Any]] = []
                size, more = 0, False
                for entry_id in op.ids:
                    entry = self.replica.entries.get(entry_id)
                    if entry is None:
                        continue
                    item = entry.to_wire()
                    cost = len(codec.encode(item))
                    if found and size + cost > self._budget:
                        more = True  # the puller asks again for what it did not get
                        break
                    found.append(item)
                    size += cost
                reply = {"entries": found, "more": more}
            elif not self._push_allowed(sender, len(payload)):
                for _ in op.entries:
                    self._reject("sync", "rate_limited")
                self.stats["sync_push_rate_limited"] += 1
                reply = {"applied": 0}
            else:
                entries = self._entries(op.entries, "sync")
                self._tally("sync_push", "received", entries)
                changed = await self.replica.apply(entries, "sync")
                self.stats["sync_applied"] += len(changed)
                self._tally("sync_push", "applied", changed)
                reply = {"applied": len(changed)}
        except wire.WireError as exc:
            self._reject("sync", exc.reason)
            return codec.encode({"v": WIRE_VERSION, "error": str(exc)[:200]})
        reply["v"] = WIRE_VERSION
        return codec.encode(reply)

    def _push_allowed(self, peer_id: str, size: int) -> bool:
        """Take `size` bytes from `peer_id`'s push budget, if it holds that many."""
        now = trio.current_time()
        rate = self.settings.push_bytes_per_s
        # one push of the largest message always fits a full bucket
        burst = float(max(self.settings.push_bytes_burst, self.settings.max_message_bytes))
        tokens, last = self._push_tokens.pop(peer_id, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        allowed = tokens >= size
        self._push_tokens[peer_id] = (tokens - size if allowed else tokens, now)
        while len(self._push_tokens) > MAX_PUSH_PEERS:
            self._push_tokens.popitem(last=False)
        return allowed

    def hedge_delay(self) -> float:
        """How long a sync request may go unanswered before it also goes to another peer: a
        few smoothed round trips (srtt + 4 * rttvar), at least `hedge_min_s`, at most half
        of `sync_timeout_s` (that half too before any request was answered)."""
        cap = self.settings.sync_timeout_s / 2
        if self._srtt is None:
            return cap
        return min(cap, max(self.settings.hedge_min_s, self._srtt + 4 * self._rttvar))

    def _observe_rtt(self, sample: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - sample)
            self._srtt = 0.875 * self._srtt + 0.125 * sample

    async def _call(self, peer_id: str, message: dict[str, Any], reply_type: type[_R]) -> _R:
        message["v"] = WIRE_VERSION
        sent = trio.current_time()
        try:
            with trio.fail_after(self.settings.sync_timeout_s):
                raw = await self.net.request(peer_id, SYNC_PROTOCOL, codec.encode(message))
        except trio.TooSlowError:
            raise NetworkError(f"sync {message.get('op')} to {peer_id} timed out") from None
        self._observe_rtt(trio.current_time() - sent)
        return wire.decode_reply(raw, reply_type, self.settings.max_message_bytes)

    async def _call_any(
        self, peers: list[str], message: dict[str, Any], reply_type: type[_R]
    ) -> tuple[str, _R]:
        """`message` to `peers[0]`, then to each next peer too once no answer came within
        `hedge_delay()`, or at once when a request failed: (the first peer to answer, its
        answer); the other requests are cancelled. Raises the last error if all failed."""
        send, receive = trio.open_memory_channel[tuple[str, Any]](len(peers))

        async def attempt(peer_id: str) -> None:
            try:
                outcome: Any = await self._call(peer_id, dict(message), reply_type)
            except (NetworkError, wire.WireError) as exc:
                outcome = exc
            send.send_nowait((peer_id, outcome))

        waiting = list(peers)
        running = 0
        error: Exception = NetworkError("no peer to ask")
        async with trio.open_nursery() as nursery:
            while waiting or running:
                if waiting:
                    if running:
                        self.stats["sync_hedged"] += 1
                    nursery.start_soon(attempt, waiting.pop(0))
                    running += 1
                with trio.move_on_after(self.hedge_delay() if waiting else math.inf):
                    peer_id, outcome = await receive.receive()
                    running -= 1
                    if not isinstance(outcome, Exception):
                        nursery.cancel_scope.cancel()
                        return peer_id, outcome
                    error = outcome
        raise error

    async def sync_with(self, peer_id: str, hedges: list[str] | None = None) -> tuple[int, int]:
        """One anti-entropy round with `peer_id`: (entries pulled and applied, entries pushed).

        Its first digests request and its pulls are hedged to the peers in `hedges`
        (`_call_any`); the round goes on with the first peer that answers the digests, page
        after listing page (at most `max_pages_per_round`), pulling and pushing each page's
        differences in byte-bounded messages."""
        hedges = [p for p in hedges or [] if p != peer_id]
        mine = self.replica.digests()
        after = self._resume  # where the last round stopped, when it ran out of pages
        applied = pushed = pages = 0
        while True:
            message = sync.encode_digests(mine, after)
            if pages == 0:
                peer_id, reply = await self._call_any(
                    [peer_id, *hedges], message, wire.ListingReply
                )
            else:
                reply = await self._call(peer_id, message, wire.ListingReply)
            lst = sync.parse_listing(reply)
            pull_ids, push = sync.plan(self.replica.entries, lst, after)
            authors = {(k, key): v[2] for k, key, _, v in lst.summaries if len(v) > 2}
            pull_ids = self._by_rate(authors, self._not_refused(lst, pull_ids))
            # another peer that answers first may lack some: they come in a later round
            peers = [peer_id, *(p for p in hedges if p != peer_id)]
            applied += await self._pull(peers, pull_ids, authors)
            pushed += await self._push(peer_id, push)
            pages += 1
            self.stats["sync_pages"] += 1
            if not lst.truncated or lst.next is None:
                self._resume = None
                break
            if after is not None and lst.next <= after:
                raise sync.SyncError("a listing page did not advance")
            after = lst.next
            if pages >= self.settings.max_pages_per_round:
                self._resume = after  # the next round goes on from here
                break
        self.stats["sync_rounds"] += 1
        return applied, pushed

    def _not_refused(self, lst: sync.Listing, ids: list[EntryId]) -> list[EntryId]:
        """`ids` less those whose listed state this replica refused within
        `refused_ttl_s`: an entry refused for good (a bad signature, over quota...) is not
        fetched again every round from a peer that accepted it."""
        if not self._refused:
            return ids
        now = trio.current_time()
        listed = {(k, key): (tuple(c), tuple(v)) for k, key, c, v in lst.summaries}
        out = []
        for entry_id in ids:
            claim, version = listed.get(entry_id, ((), ()))
            expiry = self._refused.get(_refusal("", entry_id, claim, version))
            if expiry is not None and expiry > now:
                self.stats["sync_skipped_refused"] += 1
                continue
            out.append(entry_id)
        return out

    def _by_rate(self, authors: dict[EntryId, Any], ids: list[EntryId]) -> list[EntryId]:
        """`ids` less those whose listed author (`authors`) has no room left in this
        replica's rate (`Replica.rate_room`: they would be refused; a later round pulls
        them), and of an author whose budget is not full, no more than its room holds of
        entries of the largest size, plus one; the ids of authors with a full budget first
        (else in the listing's order): an honest author's few entries are not pulled behind
        pages of one author's fill, nor refused with it, and a fill is not fetched whole
        every round to be refused but for the room its author has."""
        full = self.replica.rate_burst
        largest = self.replica.limits.max_entry_bytes
        room: dict[Any, float] = {}
        for author in set(authors.values()):
            room[author] = self.replica.rate_room(author) if isinstance(author, str) else 0.0
        left = {a: int(r // largest) + 1 for a, r in room.items() if 0 < r < full}
        kept = []
        for entry_id in ids:
            author = authors.get(entry_id)
            if room.get(author, full) <= 0:
                continue
            if author in left:
                if left[author] <= 0:
                    continue
                left[author] -= 1
            kept.append(entry_id)
        self.stats["sync_skipped_rate"] += len(ids) - len(kept)
        kept.sort(key=lambda i: room.get(authors.get(i), full) < full)
        return kept

    async def _pull(
        self, peers: list[str], ids: list[EntryId], authors: dict[EntryId, Any] | None = None
    ) -> int:
        """Fetch `ids` in requests of at most MAX_TRANSFER ids, asking again for the ids a
        reply left out for lack of room; returns how many changed the replica. Before each
        request, the ids of listed authors (`authors`) whose rate has no room left are left
        for a later round (`_by_rate`): a round fetches at most a page of what it refuses."""
        applied = 0
        remaining = list(ids)
        while remaining:
            chunk, remaining = remaining[: sync.MAX_TRANSFER], remaining[sync.MAX_TRANSFER :]
            while chunk:
                if authors:
                    chunk = self._by_rate(authors, chunk)
                    if not chunk:
                        break
                _, got = await self._call_any(
                    peers, {"op": "pull", "ids": [list(i) for i in chunk]}, wire.PullReply
                )
                wanted = set(chunk)
                entries = []
                for entry in self._entries(got.entries, "sync"):
                    if entry.id in wanted:
                        entries.append(entry)
                    else:
                        self._reject("sync", "unrequested")
                # a cluster before the entries it governs: they are judged by its admins
                entries.sort(key=lambda e: e.kind != "clusters")
                self._tally("sync_pull", "received", entries)
                applied += await self._apply_pulled(entries)
                received = {e.id for e in entries}
                if not got.more or not received:
                    break  # what is still missing, the peer lacks (or sent broken)
                chunk = [i for i in chunk if i not in received]
        return applied

    async def _apply_pulled(self, entries: list[Entry]) -> int:
        changed = await self.replica.apply(entries, "sync")
        self._tally("sync_pull", "applied", changed)
        self._remember("", self._refused_for_good(entries, changed))
        recent_ms = self.replica.clock.now().wall_ms - self.settings.reannounce_window_s * 1000
        fresh = [e for e in changed if e.ts.wall_ms >= recent_ms]
        # ... but not an author's that has spent half its rate budget here: it writes more
        # at once than nodes accept (a fill), so its entries reach the others as they reach
        # us, by anti-entropy at its rate; gossiped again by every node that pulled them,
        # they would cross every link several times over, mostly to be refused
        half = self.replica.rate_burst / 2
        room = {a: self.replica.rate_room(a) for a in {e.author for e in fresh}}
        spread = [e for e in fresh if room[e.author] >= half]
        self.stats["reannounce_skipped_rate"] += len(fresh) - len(spread)
        if spread:  # a write that gossip missed here was likely missed elsewhere too
            await self.announce(spread)
        return len(changed)

    def _refused_for_good(self, entries: list[Entry], changed: list[Entry]) -> list[Entry]:
        """The pulled entries the replica refused for a reason that a later round cannot
        change without a new version (checked again: `apply` reports only what changed)."""
        applied = {e.id for e in changed}
        out = []
        for entry in entries:
            if entry.id in applied or self.replica.entries.get(entry.id) == entry:
                continue
            try:
                self.replica.check(entry)
            except Rejected as exc:
                if exc.reason not in RETRY_REASONS:
                    out.append(entry)
        return out

    def _remember(self, peer_id: str, entries: list[Entry]) -> None:
        until = trio.current_time() + self.settings.refused_ttl_s
        for entry in entries:
            key = _refusal(peer_id, entry.id, entry.claim, entry.version)
            self._refused[key] = until
            self._refused.move_to_end(key)
        while len(self._refused) > MAX_REFUSED:
            self._refused.popitem(last=False)

    async def _push(self, peer_id: str, entries: list[Entry]) -> int:
        """Push `entries` in messages under the byte budget (and MAX_TRANSFER entries).

        A state pushed to a peer is not pushed to it again for `refused_ttl_s`: the peer
        holds it durably once it answered, so a state planned again is one it refused."""
        now = trio.current_time()
        fresh = [
            e
            for e in entries
            if self._refused.get(_refusal(peer_id, e.id, e.claim, e.version), 0.0) <= now
        ]
        self.stats["sync_skipped_refused"] += len(entries) - len(fresh)
        batch: list[Entry] = []
        size = 0
        for entry in fresh:
            cost = len(codec.encode(entry.to_wire()))
            if batch and (size + cost > self._budget or len(batch) == sync.MAX_TRANSFER):
                await self._push_batch(peer_id, batch)
                batch, size = [], 0
            batch.append(entry)
            size += cost
        if batch:
            await self._push_batch(peer_id, batch)
        return len(fresh)

    async def _push_batch(self, peer_id: str, batch: list[Entry]) -> None:
        message = {"op": "push", "entries": [e.to_wire() for e in batch]}
        await self._call(peer_id, message, wire.PushReply)
        self._remember(peer_id, batch)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Register the handlers; call once the network runs, before writes arrive."""
        self.net.set_request_handler(SYNC_PROTOCOL, self.on_sync)
        await self.net.subscribe(self.topic, self.on_gossip, self.validate_gossip)

    async def run_anti_entropy(self) -> None:
        """One round per interval with a random peer (hedged to `sync_hedges` other random
        ones); a failed round is retried at once with other peers (a lost message must not
        cost a whole interval)."""
        failed_last = False
        while True:
            interval = self.settings.sync_interval_s
            await trio.sleep((0.05 if failed_last else interval) * (0.5 + self._rng.random()))
            peers = sorted(self.net.known_peers())
            if not peers:
                continue
            peer, *hedges = self._rng.sample(peers, min(len(peers), 1 + self.settings.sync_hedges))
            try:
                await self.sync_with(peer, hedges)
                failed_last = False
            except (NetworkError, wire.WireError) as exc:
                self.stats["sync_failed"] += 1
                failed_last = not failed_last  # retry once quickly, then back to the interval
                log.debug("anti-entropy with %s failed: %s", peer, exc)

    async def run_gc(self) -> None:
        while True:
            await trio.sleep(self.settings.gc_interval_s)
            await self.replica.collect_garbage(int(self.settings.tombstone_horizon_s * 1000))
