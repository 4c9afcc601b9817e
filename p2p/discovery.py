"""Resource discovery over the DHT: publish our signed record, find everyone else's.

Sans-IO in the sense of DESIGN.md: it only talks to a `Network`, so the same code runs over
libp2p in the daemon and over `p2p.testing.memnet` in simulations on trio's virtual clock.

How it scales (issue 19, "Finding nodes at internet scale"):

- Whom to look up. A node's routing table holds O(K log N) peers (k-buckets), so the peers it
  knows are not the network. `refresh_forever` also sweeps and walks the DHT
  (`p2p.walks`: iterative Kademlia FIND_NODE walks, `Network.dht_find_peers`, toward one
  target in each subtree of the key space, then toward a random target now and then), and
  looks up the record of every node they meet, and of every peer connected to it. Walks were
  chosen over a directory kept in the DHT (a key listing members): its K holders serve
  everyone, and a hostile holder can hide members; walks load every node alike.
- How much a node holds. Every node does not need every record at internet scale, and cannot
  fetch them all every few seconds. `find()` (`nodes_find`) answers from the records this
  node has found, verified and unexpired: at most `max_peers` (4096 by default). Each is
  refreshed lazily, asked of its own node (one round trip) once past half its validity, so a
  node's steady work is about `max_peers` look-ups per publish interval (a record is fetched
  ~15 s old on average: 30 s by default) plus one walk every `walk_interval_s`, whatever N
  is. Up to `max_peers` nodes, every node lists every live node (bench/discovery_sim.py and
  tests/p2p/test_discovery_scale.py check it); beyond, it lists the nodes its walks met
  last, the peers of its routing table first (kept whatever the cap).
- Who is gone: `p2p.liveness` (closed connections, unanswered pings: at most
  `liveness_max_pings` pings a round however many peers are connected), and `p2p.gone`
  (what one node saw go, it tells the others by gossip; each checks with one request).
"""

from __future__ import annotations

import heapq
import logging
import math
from collections import deque
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import trio

from p2p import identity, records
from p2p.addrs import dial_order, for_everyone, local_only
from p2p.gone import GoneNotices
from p2p.liveness import Liveness
from p2p.network import Network
from p2p.walks import Walker

log = logging.getLogger(__name__)

# a look-up walks the DHT too when the node itself has not answered within this
WALK_AFTER_S = 0.5
# A walk while the node is connected to us is a hedge against a slow answer, and a walk is
# ~15 DHT streams where asking the node is one (FIND_NODE rounds, a GET_VALUE to each of the
# key's closest nodes, a PUT_VALUE to those missing it; each runs to its end: p2p.dhtops).
# On a loaded machine every node answers late, so every look-up walked: 5 daemons on the
# tests' config opened ~870 DHT streams a minute each, KadDHT's 12 inbound handlers stayed
# full for minutes, it reset the rest (~300 a minute a node), which failed more asks and
# puts, and so more walks; records expired and nodes went missing from `nodes_find`. Such
# hedges are budgeted: HEDGE_PER_LOOKUP walks per look-up, HEDGE_BURST at most saved up. A
# node not connected is walked for as before (it may not be reachable at all).
HEDGE_PER_LOOKUP = 0.1
HEDGE_BURST = 3.0
# the refresher wakes for look-ups falling due (each at its own time) at most once per this
# fraction of its interval, and handles all that fell due meanwhile at once
BATCH_FRACTION = 1 / 32

# (reason) -> None; the daemon counts these in /metrics
RejectHook = Callable[[str], None]
# () -> (listen addrs, resources) as they are now
Describe = Callable[[], tuple[list[str], dict[str, Any]]]


@dataclass(frozen=True)
class DiscoverySettings:
    """How discovery publishes and finds records. The `msgspec.Meta` bounds are what a
    config may set (daemon.settings checks them at load; construction does not)."""

    network_id: str
    record_validity_s: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 90.0
    publish_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    max_clock_skew_s: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    dht_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    max_parallel_gets: Annotated[int, msgspec.Meta(ge=1)] = 16
    find_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    # A peer whose look-up found no record (or did not finish) is looked up again after
    # `absent_retry_s` (at most `publish_interval_s`: an honest node has published by then),
    # doubling each time it is still absent up to `absent_retry_max_s`. Those look-ups run in
    # `refresh_forever`, off find()'s path: a record-less or silent peer (a hostile one
    # answering no DHT queries) costs find() nothing after the first time.
    absent_retry_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    absent_retry_max_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0
    # a connected peer is pinged every `liveness_probe_s`; one missing `liveness_misses` pings
    # in a row, or whose connection closed and cannot be dialled again, leaves find() until
    # it answers again or publishes anew (p2p.liveness)
    liveness_probe_s: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    liveness_misses: Annotated[int, msgspec.Meta(ge=1)] = 3
    # pings a liveness round sends at most (suspects first, then the longest unpinged)
    liveness_max_pings: Annotated[int, msgspec.Meta(ge=1)] = 16
    # a gone peer is dialled again at once, then 5 s later, the gap doubling up to
    # `liveness_recheck_max_s`; after `liveness_max_rechecks` dials it is forgotten (not
    # dialled until it connects, answers or publishes anew: p2p.liveness)
    liveness_recheck_max_s: Annotated[float, msgspec.Meta(gt=0)] = 300.0
    liveness_max_rechecks: Annotated[int, msgspec.Meta(ge=1, le=64)] = 6
    # how many nodes' records a node holds and lists at most (see the module's docstring)
    max_peers: Annotated[int, msgspec.Meta(ge=1)] = 4096
    # walks of the DHT meet nodes beyond the known ones (p2p.walks): one toward a random
    # target every `walk_interval_s`, a sweep of the key space every `sweep_interval_s`
    walk_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    sweep_interval_s: Annotated[float, msgspec.Meta(gt=0)] = 600.0


class RecordValidator:
    """The DHT validator for our namespace: every node runs it on every value it stores."""

    def __init__(
        self,
        settings: DiscoverySettings,
        now: Callable[[], float],
        on_reject: RejectHook,
        on_valid: Callable[[records.ResourceRecord], None] | None = None,
    ) -> None:
        self._settings = settings
        self._now = now
        self._on_reject = on_reject
        self._on_valid = on_valid

    def validate(self, key: str, value: bytes) -> None:
        try:
            record = records.validate_record(
                key,
                value,
                now=self._now(),
                network_id=self._settings.network_id,
                max_skew=self._settings.max_clock_skew_s,
            )
        except records.RecordError as exc:
            if exc.reason != "stale":  # expired copies are normal traffic, not an attack
                self._on_reject(exc.reason)
            raise
        if self._on_valid is not None:
            self._on_valid(record)

    def select(self, key: str, values: list[bytes]) -> int:
        return records.select_newest(values)


class ResourceDirectory:
    def __init__(
        self,
        net: Network,
        ident: identity.NodeIdentity,
        settings: DiscoverySettings,
        describe: Describe,
        on_reject: RejectHook | None = None,
        price_per_unit: int | None = None,
    ) -> None:
        """`price_per_unit`: this node's price, signed into its record (None: declares none)."""
        self._net = net
        self._ident = ident
        self._self_id = ident.peer_id  # derived from the key on each read: read it once
        self._settings = settings
        self._describe = describe
        self._price_per_unit = price_per_unit
        self._on_reject = on_reject or (lambda reason: None)
        # a record stored with us (its publisher put it here) is verified: cache it at once
        self.validator = RecordValidator(settings, net.now, self._on_reject, self._offer)
        self._cache: dict[str, records.ResourceRecord] = {}  # at most max_peers (_trim)
        # peer id -> when it may be looked up again; set when a look-up starts, cleared when
        # one finds a record, so a look-up that fails or is cancelled counts as a miss
        self._retry_at: dict[str, float] = {}
        self._backoff: dict[str, float] = {}  # peer id -> its current retry delay
        self._attempted: set[str] = set()  # peers looked up at least once
        self._refreshers = 0  # running refresh_forever tasks
        # when each peer's next look-up falls due (`_due_at`): a heap, one live entry a peer
        # (`_queued`), so a wake costs what fell due, not a scan of all (O(N**2) a period)
        self._queue: list[tuple[float, str]] = []
        self._queued: dict[str, float] = {}
        self._scan_all = False  # set with `_wake` by find(): look at every candidate
        # meets nodes beyond the network's known peers (p2p.walks)
        self.walker = Walker(
            net,
            timeout_s=settings.dht_timeout_s,
            interval_s=settings.walk_interval_s,
            sweep_interval_s=settings.sweep_interval_s,
            max_nodes=settings.max_peers,
            known=self._knows,
            view=lambda: len(self._candidates()),
            on_new=self._met_new,
        )
        self.lookups = 0  # records looked up (asked of their node, walked if need be)
        self.hedge_budget = HEDGE_BURST  # walks left for look-ups of connected nodes
        self.hedges_skipped = 0  # look-ups of a connected node that did not walk (no budget)
        self._wake = trio.Event()  # set by find() when it saw peers never looked up
        # who is gone, from closed connections and unanswered pings (runs in refresh_forever)
        self.liveness = Liveness(
            net,
            probe_interval_s=settings.liveness_probe_s,
            misses=settings.liveness_misses,
            max_pings=settings.liveness_max_pings,
            recheck_max_s=settings.liveness_recheck_max_s,
            max_rechecks=settings.liveness_max_rechecks,
            on_lost=self._saw_gone,
        )
        # tells the others whom this node saw go, checks whom they saw go (p2p.gone)
        self.gone = GoneNotices(
            net, self.liveness, probe=self._answers, lists=self.lists, on_reject=self._on_reject
        )
        self.published = 0
        self.publish_failures = 0

    def key_for(self, peer_id: str) -> str:
        return records.record_key(self._settings.network_id, peer_id)

    def make_own_record(self) -> bytes:
        addrs, resources = self._describe()
        # read by anyone: loopback addresses only while every peer known is on our host
        addrs = for_everyone(addrs, self._peers_addrs())
        return records.make_record(
            self._ident,
            network_id=self._settings.network_id,
            now=self._net.now(),
            valid_for=self._settings.record_validity_s,
            addrs=addrs[: records.MAX_ADDRS],  # more would have the record refused whole
            resources=resources,
            price_per_unit=self._price_per_unit,
        )

    def _peers_addrs(self) -> Iterator[list[str]]:
        """What this node knows of where its peers are: their records' addresses, and the
        transport's for the peers connected (`p2p.addrs.for_everyone` reads them)."""
        for peer_id, record in self._cache.items():
            if peer_id != self._self_id:
                yield list(record.addrs)
        for peer_id in self._net.connected_peers():
            yield self._net.peer_addrs(peer_id)

    def _own(self, value: bytes) -> records.ResourceRecord:
        return records.validate_record(
            self.key_for(self._self_id),
            value,
            now=self._net.now(),
            network_id=self._settings.network_id,
            max_skew=self._settings.max_clock_skew_s,
        )

    async def publish_once(self) -> bool:
        """Put our record; True when the put finished within the deadline."""
        value = self.make_own_record()
        try:  # find() answers with our own record at once, whatever the put's fate
            self._offer(self._own(value))
        except records.RecordError as exc:  # the network's validators refuse it too
            log.warning("our own resource record is invalid: %s", exc)
        with trio.move_on_after(self._settings.dht_timeout_s):
            try:
                await self._net.dht_put(self.key_for(self._self_id), value)
            except Exception as exc:  # a failed put is retried at the next interval
                log.debug("publishing resource record failed: %r", exc)
                self.publish_failures += 1
                return False
            self.published += 1
            return True
        self.publish_failures += 1
        return False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish now and then every `publish_interval_s`, well before the record expires."""
        await self.publish_once()
        task_status.started()
        while True:
            await trio.sleep(self._settings.publish_interval_s)
            await self.publish_once()

    async def lookup(self, peer_id: str) -> records.ResourceRecord | None:
        """Fetch and verify one node's record; None if absent, invalid, expired or too slow.

        The node itself is asked (it holds its own record, the freshest there is: one round
        trip), and a DHT walk starts too once that has failed or taken `WALK_AFTER_S`; the
        first valid record wins, all within `dht_timeout_s`. A walk alone waits on every one
        of the key's closest peers, so one connected peer that answered no DHT query
        (bench/abuse.py's idle hostile peer) made honest look-ups time out, and their
        records expired from `nodes_find`. The walk for a node connected to us comes out of
        a budget (`HEDGE_PER_LOOKUP`).
        """
        key = self.key_for(peer_id)
        self.lookups += 1
        self.hedge_budget = min(HEDGE_BURST, self.hedge_budget + HEDGE_PER_LOOKUP)
        found: list[records.ResourceRecord] = []
        owner_done = trio.Event()

        async def ask(how: str, get: Callable[[], Awaitable[bytes | None]]) -> None:
            try:
                record = self._verified(peer_id, await get())
            except Exception as exc:
                log.debug("%s for the record of %s failed: %r", how, peer_id, exc)
                record = None
            if record is not None:
                found.append(record)
                nursery.cancel_scope.cancel()

        async def ask_owner() -> None:
            try:
                await ask("asking the node", lambda: self._net.dht_get_from(peer_id, key))
            finally:
                owner_done.set()

        with trio.move_on_after(self._settings.dht_timeout_s):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_owner)
                # the walk, in this task: a task of its own, spawned for each look-up, was
                # nearly always cancelled before it walked (the node answers first)
                with trio.move_on_after(WALK_AFTER_S):
                    await owner_done.wait()
                if not found and self._may_walk(peer_id):
                    await ask("a DHT walk", lambda: self._net.dht_get(key))
        return found[0] if found else None

    def _may_walk(self, peer_id: str) -> bool:
        """Whether a look-up of `peer_id` whose node has not answered walks the DHT too: yes
        for a node not connected to us; for a connected one, if the hedge budget allows."""
        if peer_id not in self._net.connected_peers():
            return True
        if self.hedge_budget >= 1:
            self.hedge_budget -= 1
            return True
        self.hedges_skipped += 1
        return False

    def _saw_gone(self, peer_id: str) -> None:
        self.gone.saw_gone(peer_id)

    async def _answers(self, peer_id: str) -> bool:
        """Whether `peer_id` itself answers with its valid record (kept if it does)."""
        value = await self._net.dht_get_from(peer_id, self.key_for(peer_id))
        record = self._verified(peer_id, value)
        if record is not None:
            self._offer(record)
        return record is not None

    def _verified(self, peer_id: str, value: bytes | None) -> records.ResourceRecord | None:
        """`value` as `peer_id`'s valid record, or None (refusals counted, stale ones not)."""
        if value is None:
            return None
        try:
            record = records.validate_record(
                self.key_for(peer_id),
                value,
                now=self._net.now(),
                network_id=self._settings.network_id,
                max_skew=self._settings.max_clock_skew_s,
            )
        except records.RecordError as exc:
            if exc.reason != "stale":  # stale copies in local stores are expected, not hostile
                self._on_reject(exc.reason)
            return None
        return record if record.peer_id == peer_id else None

    def _offer(self, record: records.ResourceRecord) -> None:
        """Cache a verified record if it is the newest we have; its peer stops backing off."""
        current = self._cache.get(record.peer_id)
        if current is None or record.issued_at > current.issued_at:  # once per record
            for reason in record.dropped_addrs:  # unusable addresses: never dialled
                self._on_reject(f"addr_{reason}")
        if current is None or record.issued_at >= current.issued_at:
            self._cache[record.peer_id] = record
            if current is None and len(self._cache) > self._settings.max_peers:
                self._trim()
        self._retry_at.pop(record.peer_id, None)
        self._backoff.pop(record.peer_id, None)
        self._schedule(record.peer_id)

    def _base_retry_s(self) -> float:
        return min(self._settings.absent_retry_s, self._settings.publish_interval_s)

    def _due(self, peer_id: str, now: float) -> bool:
        """Whether `peer_id` needs a look-up: no usable cached record, or one past half its
        validity, and it is not backing off or already being looked up."""
        return now >= self._due_at(peer_id)

    def _due_at(self, peer_id: str) -> float:
        """When `peer_id` falls due (`_due`): -inf for a peer never looked up."""
        record = self._cache.get(peer_id)
        due = -math.inf if record is None else record.issued_at + record.valid_for / 2
        return max(due, self._retry_at.get(peer_id, -math.inf))

    def _schedule(self, peer_id: str) -> None:
        """Queue `peer_id` for the refresher at its due time, unless queued earlier already
        (an entry that finds its peer not yet due queues it again: `_pop_due`)."""
        when = self._due_at(peer_id)
        queued = self._queued.get(peer_id)
        if queued is None or when < queued:
            self._queued[peer_id] = when
            heapq.heappush(self._queue, (when, peer_id))

    def _pop_due(self, now: float) -> list[str]:
        """The queued peers due by `now` (those found not yet due are queued anew)."""
        due: list[str] = []
        queue, queued = self._queue, self._queued
        while queue and queue[0][0] <= now:
            when, peer_id = heapq.heappop(queue)
            if queued.get(peer_id) != when:
                continue  # superseded by an earlier entry, already handled
            del queued[peer_id]
            if self._due_at(peer_id) > now:
                self._schedule(peer_id)  # refreshed or backing off since
            else:
                due.append(peer_id)
        return due

    async def _refresh_one(self, peer_id: str, limiter: trio.CapacityLimiter) -> None:
        """Look `peer_id` up (bounded by `dht_timeout_s`) and cache what verifies."""
        now = self._net.now()
        self._attempted.add(peer_id)
        cached = self._cache.get(peer_id)
        if cached is not None and cached.expires_at > now:
            delay = self._base_retry_s()  # a failed refresh: try again well before it expires
        else:
            previous = self._backoff.get(peer_id)
            delay = (
                self._base_retry_s()
                if previous is None
                else min(2 * previous, self._settings.absent_retry_max_s)
            )
            self._backoff[peer_id] = delay
        self._retry_at[peer_id] = now + delay  # until a look-up finds a record
        try:
            async with limiter:
                record = await self.lookup(peer_id)
            if record is not None:
                self._offer(record)
        finally:
            self._schedule(peer_id)  # its next look-up: the record's refresh, or the retry

    def _candidates(self) -> list[str]:
        """Whose records to hold: ourselves, the network's known and connected peers, and the
        nodes whose records we hold or our walks met (`_trim`: at most `max_peers` beyond the
        known). A node that joined after our last sweep (into full k-buckets) is met by our
        walks only by chance, but its own sweep connected to nearly every node: without the
        connected, 15 of 22,500 listings were missing after 90 s at 150 nodes."""
        return list(
            self._net.known_peers()
            | self._net.connected_peers()
            | self.walker.met.keys()
            | self._cache.keys()
            | {self._self_id}
        )

    def _trim(self) -> None:
        """Keep at most `max_peers` nodes beyond the known ones: those met longest ago go first,
        those without a record before those with one."""
        cap = self._settings.max_peers
        known = self._net.known_peers()
        if len(self.walker.met) + len(self._cache) < cap - len(known):
            return  # within the cap however they overlap: no set built (a walk calls this)
        extra = (self.walker.met.keys() | self._cache.keys()) - known
        extra.discard(self._self_id)
        excess = len(extra) - max(0, cap - len(known) - 1)
        if excess <= 0:
            return
        order = sorted(extra, key=lambda p: (p in self._cache, self.walker.met.get(p, -math.inf)))
        for peer_id in order[:excess]:
            self.walker.drop(peer_id)
            self._cache.pop(peer_id, None)

    def _knows(self, peer_id: str) -> bool:
        return peer_id in self._cache or peer_id in self._net.known_peers()

    def _met_new(self, peers: list[str]) -> None:
        """A walk met nodes we did not know: keep within the cap, look them up now."""
        self._trim()
        for peer_id in peers:
            self._schedule(peer_id)
        self._wake.set()

    def _forget_expired(self) -> None:
        now = self._net.now()
        for peer_id, record in list(self._cache.items()):
            if record.expires_at < now:
                del self._cache[peer_id]
        # met a record's lifetime ago and no record since: hearsay of a node that left
        self.walker.forget(now - self._settings.record_validity_s, self._cache.__contains__)
        # a peer that left is forgotten once its back-off has run out, not before: leaving
        # and reconnecting must not earn a silent peer another wait in find()
        known = set(self._candidates())
        for peer_id in [p for p in self._retry_at if p not in known and self._retry_at[p] <= now]:
            del self._retry_at[peer_id]
        keep = known | set(self._cache) | set(self._retry_at)
        self._backoff = {p: d for p, d in self._backoff.items() if p in keep}
        self._attempted &= keep
        self.liveness.forget(set(self._cache))

    def _addrs_of(self, peer_id: str) -> list[str]:
        """Where to dial `peer_id` again: the addresses its signed record advertises, or,
        where none of them may be dialled from here, what the transport knows (which may
        hold the ephemeral ports of its own dials: each such address dialled in vain costs
        a redial its timeout, and a cut-off node would stay listed for longer).

        All are the peer's word: only usable ones naming it are dialled, and loopback or
        link-local ones only when this node too is reachable on such addresses alone, so is
        on the peer's host (the reader judges "a remote peer": see p2p.addrs)."""
        record = self._cache.get(peer_id)
        local = local_only(self._net.listen_addrs())
        advertised = dial_order(list(record.addrs), peer_id, local=local) if record else []
        return advertised or dial_order(self._net.peer_addrs(peer_id), peer_id, local=local)

    def _listed(self, record: records.ResourceRecord) -> bool:
        """Whether find() lists `record`: ours always, another's unless its node is gone."""
        if record.peer_id == self._self_id:
            return True
        return not self.liveness.hides(record.peer_id, record.issued_at)

    def lists(self, peer_id: str) -> bool:
        """Whether find() lists `peer_id` now (its record held, unexpired, its node not gone)."""
        record = self._cache.get(peer_id)
        return record is not None and record.expires_at >= self._net.now() and self._listed(record)

    async def refresh_once(self) -> int:
        """Look up, in parallel, every known peer whose record is due; how many were due."""
        now = self._net.now()
        due = [p for p in self._candidates() if self._due(p, now)]
        limiter = trio.CapacityLimiter(self._settings.max_parallel_gets)
        async with trio.open_nursery() as nursery:
            for peer_id in due:
                nursery.start_soon(self._refresh_one, peer_id, limiter)
        self._forget_expired()
        return len(due)

    async def refresh_forever(self, interval_s: float | None = None) -> None:
        """Keep cached records fresh in the background, so find() need not wait on the DHT.

        It starts a look-up of each peer whose record is missing or past half its validity,
        except those backing off (see `absent_retry_s`) or being looked up already, as each
        falls due (`_queue`; in batches at most `BATCH_FRACTION` of the interval apart), and
        looks at every known peer every `interval_s` (default: the smaller of
        `publish_interval_s` and a quarter of `record_validity_s`; the routing table's a few
        times as often, and all at once when find() saw a peer never looked up). Look-ups run
        on their own: a silent peer's, which takes `dht_timeout_s`, never holds back the
        others (it once let honest records expire while a record-less peer was connected).
        """
        if interval_s is None:
            interval_s = min(
                self._settings.publish_interval_s, self._settings.record_validity_s / 4
            )
        batch_s = interval_s * BATCH_FRACTION
        limiter = trio.CapacityLimiter(self._settings.max_parallel_gets)
        in_flight: set[str] = set()  # queued or being looked up
        queued: deque[str] = deque()
        workers = 0  # at most max_parallel_gets, each looking up the queued peers in turn

        async def work() -> None:
            # (a task a look-up, most parked on the limiter, cost more than the look-ups)
            nonlocal workers
            try:
                while queued:
                    peer_id = queued.popleft()
                    try:
                        await self._refresh_one(peer_id, limiter)
                    finally:
                        in_flight.discard(peer_id)
            finally:
                workers -= 1

        self._refreshers += 1
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.liveness.run, self._cache.__contains__, self._addrs_of)
                nursery.start_soon(self.walker.run)
                nursery.start_soon(self.gone.run)
                next_scan = next_forget = -math.inf  # (the network's clock)
                while True:
                    now = self._net.now()
                    known = self._net.known_peers()
                    due = self._pop_due(now)
                    if self._scan_all or now >= next_scan:
                        # all: a peer that became a candidate unqueued is not missed
                        self._scan_all = False
                        next_scan = now + interval_s
                        due += [p for p in self._candidates() if self._due(p, now)]
                    else:  # the routing table's newcomers (none of them queued)
                        due += [p for p in known if self._due(p, now)]
                    connected: set[str] | None = None  # built only if needed
                    for peer_id in due:
                        if peer_id in in_flight:
                            continue
                        if not self._holds(peer_id, known):
                            if connected is None:
                                connected = self._net.connected_peers()
                            if peer_id not in connected:
                                continue  # no longer a candidate
                        in_flight.add(peer_id)
                        queued.append(peer_id)
                    while queued and workers < self._settings.max_parallel_gets:
                        workers += 1
                        nursery.start_soon(work)
                    if now >= next_forget:  # O(held): not at every wake
                        self._forget_expired()
                        next_forget = now + interval_s / 4
                    soonest = min(next_scan, self._queue[0][0] if self._queue else math.inf)
                    with trio.move_on_after(max(batch_s, min(soonest - now, interval_s / 4))):
                        await self._wake.wait()
                    self._wake = trio.Event()
        finally:
            self._refreshers -= 1

    def _holds(self, peer_id: str, known: set[str]) -> bool:
        """Whether `peer_id` is still a candidate (`_candidates`) on other grounds than being
        connected, without building them."""
        return (
            peer_id in self._cache
            or peer_id in self.walker.met
            or peer_id in known
            or peer_id == self._self_id
        )

    async def find(
        self, predicate: Callable[[records.ResourceRecord], bool] | None = None
    ) -> list[records.ResourceRecord]:
        """Valid records of this node and every node it knows, filtered, sorted by peer id.

        With `refresh_forever` running it never waits: it answers from the records cached
        (verified, unexpired) and wakes the refresher for peers never looked up before, so a
        new peer shows up in a later find, and a hostile peer that answers no DHT query never
        slows one. Without a refresher it looks up every due peer itself, in parallel and
        within `find_timeout_s`.
        """
        now = self._net.now()
        wanted = [p for p in self._candidates() if self._due(p, now)]
        if self._refreshers:
            if any(p not in self._attempted for p in wanted):
                self._scan_all = True
                self._wake.set()
        elif wanted:
            limiter = trio.CapacityLimiter(self._settings.max_parallel_gets)
            with trio.move_on_after(self._settings.find_timeout_s):
                async with trio.open_nursery() as nursery:
                    for peer_id in wanted:
                        nursery.start_soon(self._refresh_one, peer_id, limiter)
        self._forget_expired()
        matching = [
            r
            for r in self._cache.values()
            if self._listed(r) and (predicate is None or predicate(r))
        ]
        return sorted(matching, key=lambda r: r.peer_id)
