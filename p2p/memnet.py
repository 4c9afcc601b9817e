"""An in-memory `Network` on trio's clock, for tests and simulations of up to ~1,000 nodes.

`MemoryNetwork` is the hub (latency, jitter, loss, partitions, counters); each `MemoryNode` is
one node's view and implements `p2p.network.Network`. Run it under
`trio.testing.MockClock(autojump_threshold=0)` and minutes of virtual time pass in seconds.

The DHT is a small Kademlia carried over the same request path as every other message
(`/memdht/find_node`, `/memdht/get`, `/memdht/put`), so loss, partitions and crashes affect
it as they would on a real network; there is no global dict.

How failures look to a caller (callers bound every call with `move_on_after`/`fail_after`):

| cause                                   | the caller sees                              |
|-----------------------------------------|----------------------------------------------|
| message lost (`loss`)                   | hangs (until the caller's deadline)          |
| peer in another partition               | hangs                                        |
| peer removed (a crashed machine)        | hangs                                        |
| peer removed with `refuse=True`         | `NetworkError` after one round trip          |
| peer id never added to the hub          | `NetworkError` at once (no address to dial)  |
| no handler for the protocol, or the     | `NetworkError` after one round trip          |
| handler raised                          |                                              |
| the calling node itself was removed     | `NetworkError` at once                       |

DHT calls use the same links but bound each RPC by RPC_TIMEOUT_S of virtual time; a lost or
unanswered RPC counts as a failure against the peer.

Gossip (`publish`/`subscribe`) is an epidemic broadcast over the same lossy links, one hop per
message: the publisher sends to `fanout` random known peers subscribed to the topic; a
subscriber that has not seen the message id (a hash of origin and data, kept in a bounded
seen-cache) hands it to its handlers and forwards it to `fanout` random subscribed known peers,
never back to the peer it came from nor to the origin. Loss, partitions, latency and crashes
apply per hop; nothing is retransmitted (anti-entropy is the caller's business). The hub knows
who subscribes to what; real GossipSub learns it from its peers and keeps a stable mesh of
`fanout` peers instead of picking at random per message. Handlers run one message at a time in
one task per subscribed topic; an exception is counted (`gossip_handler_errors`) and dropped.
Since the id is a hash of origin and data, publishing the same bytes twice is one message to
the receivers (GossipSub ids carry a sequence number too).

Simplifications: a handler runs in the caller's task, so it is cancelled when the caller gives
up; loss and jitter come from one `random.Random(seed)`, so a run is reproducible only up to
trio's (randomised) scheduling order; `now()` is `epoch + trio.current_time()`, which starts
at `epoch` only under a MockClock.

Routing: a node's table holds every peer it has heard from or heard of (no k-buckets), kept
sorted by id so the K closest to a target cost O(log n + K). A peer leaves it after
MAX_FAILURES consecutive failed RPCs; a lookup adds the peers named in answers, as py-libp2p
does, except recently evicted ones. `known_peers()` is that table.

`dht_get` returns the local copy first, as py-libp2p does, but only if the node's validator
still accepts it: a copy the validator now rejects (an expired record) is dropped and the
network is asked instead. py-libp2p 0.8.1 keeps local copies for 24 h regardless, so a stale
copy there hides the fresh one for that long; the libp2p adapter must do the same re-check.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import heapq
import math
import random
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from p2p.network import DHTValidator, GossipHandler, NetworkError, RequestHandler
from p2p.streams import ChannelStream, stream_pair

__all__ = ["ChannelStream", "stream_pair"]  # re-exported for tests

K = 20  # replication factor and lookup width
ALPHA = 3  # parallel RPCs per lookup
RPC_TIMEOUT_S = 1.0  # virtual seconds before one DHT RPC counts as failed
DIAL_TIMEOUT_S = 5.0
MAX_FAILURES = 5  # consecutive failed RPCs before a peer leaves the routing table
EVICTION_BACKOFF_S = 60.0  # an evicted peer named by others is ignored this long
ID_BITS = 256
_HEADER_BYTES = 64  # rough per-message framing overhead, for the byte counter
_DHT_PREFIX = "/memdht/"
FIND_NODE = "/memdht/find_node"
GET = "/memdht/get"
PUT = "/memdht/put"
GOSSIP_FANOUT = 6  # peers each publisher and forwarder sends a gossip message to (GossipSub's D)
SEEN_CACHE_SIZE = 8192  # message ids a node remembers, to drop gossip it has already seen


@functools.lru_cache(maxsize=1 << 16)
def dht_id(name: str) -> int:
    """The 256-bit Kademlia id of a peer id or a DHT key."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest(), "big")


def _ids_size(peers: list[str]) -> int:
    return sum(map(len, peers)) + 2


def message_id(origin: str, data: bytes) -> bytes:
    """The id of a gossip message: receivers drop ids they have seen."""
    return hashlib.sha256(origin.encode() + b"\0" + data).digest()[:16]


class RoutingTable:
    """Every peer a node knows, kept sorted by id.

    Peers sharing a longer id prefix with a target are closer to it (XOR metric) and lie
    contiguously in id order, so the `count` closest are found by bisecting for the smallest
    prefix subtree around the target that holds `count` peers: O(log n + count) per query
    instead of a scan of every known peer.
    """

    def __init__(self) -> None:
        self._ids: list[int] = []
        self._by_id: dict[int, str] = {}
        self._by_peer: dict[str, int] = {}
        self.version = 0  # bumped on every change, so views of the table can be cached

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, peer_id: object) -> bool:
        return peer_id in self._by_peer

    def peers(self) -> set[str]:
        return set(self._by_peer)

    def add(self, peer_id: str) -> bool:
        if peer_id in self._by_peer:
            return False
        pid = dht_id(peer_id)
        bisect.insort(self._ids, pid)
        self._by_id[pid] = peer_id
        self._by_peer[peer_id] = pid
        self.version += 1
        return True

    def discard(self, peer_id: str) -> None:
        pid = self._by_peer.pop(peer_id, None)
        if pid is None:
            return
        del self._ids[bisect.bisect_left(self._ids, pid)]
        del self._by_id[pid]
        self.version += 1

    def clear(self) -> None:
        self._ids.clear()
        self._by_id.clear()
        self._by_peer.clear()
        self.version += 1

    def members(self, peers: set[str]) -> set[str]:
        """The peers of `peers` that this table holds."""
        return peers & self._by_peer.keys()

    def closest(self, target: int, count: int, exclude: str | None = None) -> list[str]:
        """The `count` known peers closest to `target`, nearest first, without `exclude`."""
        want = count + 1 if exclude is not None and exclude in self._by_peer else count
        ids = self._ids
        if len(ids) <= 4 * want:  # sorting a few dozen ints beats the search below
            pool: list[int] = ids
        else:

            def span(bits: int) -> tuple[int, int]:  # the subtree of ids sharing all but `bits`
                start = (target >> bits) << bits
                return bisect.bisect_left(ids, start), bisect.bisect_left(ids, start + (1 << bits))

            # the smallest subtree around the target holding `want` peers; ids are uniform, so
            # start from the size where `want` are expected and walk a step or two
            bits = max(0, ID_BITS - (len(ids) // want).bit_length() + 1)
            lo, hi = span(bits)
            while hi - lo < want:
                bits += 1
                lo, hi = span(bits)
            while bits > 0:
                smaller = span(bits - 1)
                if smaller[1] - smaller[0] < want:
                    break
                bits -= 1
                lo, hi = smaller
            pool = ids[lo:hi]
        by_id = self._by_id
        nearest = sorted([pid ^ target for pid in pool])[:want]  # XOR distances
        peers = [by_id[distance ^ target] for distance in nearest]
        if want > count:
            peers = [peer for peer in peers if peer != exclude][:count]
        return peers


class _Reply:
    """Completes one DHT RPC exactly once: with the response, or as failed (lost, timed out)."""

    __slots__ = ("callback", "done", "timer")

    def __init__(self, callback: Callable[[bool, Any], None]) -> None:
        self.callback = callback
        self.done = False
        self.timer: list[Any] | None = None

    def finish(self, ok: bool, response: Any = None) -> None:
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer[2] = None  # cancel the pending timeout
        self.callback(ok, response)


class MemoryNetwork:
    """The hub: every node, the links between them, and the counters.

    Message deliveries are events on one timer (a trio system task started on first use),
    not one `trio.sleep` per message: a sleep costs ~20 µs of trio's cancellation machinery,
    and a 1,000-node DHT sends millions of messages.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        latency_s: float = 0.005,
        jitter_s: float = 0.0,
        loss: float = 0.0,
        epoch: float = 1_700_000_000.0,
        fanout: int = GOSSIP_FANOUT,
        seen_cache: int = SEEN_CACHE_SIZE,
    ) -> None:
        if latency_s < 0 or jitter_s < 0 or not 0.0 <= loss <= 1.0:
            raise ValueError("latency and jitter must be >= 0 and loss in [0, 1]")
        if fanout < 1 or seen_cache < 1:
            raise ValueError("fanout and seen_cache must be >= 1")
        # latency, jitter and loss may be changed between steps of a simulation; `rng` also
        # picks the targets of random refresh lookups
        self.latency_s = latency_s
        self.jitter_s = jitter_s
        self.loss = loss
        self.epoch = epoch
        self.rng = random.Random(seed)
        self.fanout = fanout
        self.seen_cache = seen_cache
        self.messages_sent = 0  # every message, gossip hops included
        self.messages_dropped = 0
        self.bytes_sent = 0
        self.gossip_sent = 0  # gossip hops (each also counts in messages_sent)
        self.gossip_bytes = 0  # their share of bytes_sent
        self._subscribers: dict[str, set[str]] = {}  # topic -> peer ids
        self._subscriptions_version = 0
        self._nodes: dict[str, MemoryNode] = {}
        self._removed: dict[str, bool] = {}  # peer id -> refuses connections
        self._groups: dict[str, int] = {}
        self._heap: list[list[Any]] = []  # [when, seq, fn or None when cancelled, args]
        self._seq = 0
        self._wake: trio.CancelScope | None = None
        self._timer_token: trio.lowlevel.TrioToken | None = None

    def now(self) -> float:
        """UNIX time as every node sees it: `epoch` plus trio's (virtual) clock."""
        return self.epoch + trio.current_time()

    def add_node(self, peer_id: str, validator: DHTValidator | None = None) -> MemoryNode:
        if peer_id in self._nodes:
            raise ValueError(f"{peer_id} is already on the network")
        self._removed.pop(peer_id, None)
        node = MemoryNode(self, peer_id, validator)
        self._nodes[peer_id] = node
        return node

    def remove_node(self, peer_id: str, *, refuse: bool = False) -> None:
        """Crash a node: its store and routing table are gone and it answers nothing.

        By default messages to it vanish (a dead machine); with `refuse=True` they fail with
        `NetworkError` after a round trip (a live machine whose daemon is gone).
        """
        node = self._nodes.pop(peer_id)
        node._crash()
        self._removed[peer_id] = refuse
        for subscribers in self._subscribers.values():
            subscribers.discard(peer_id)
        self._subscriptions_version += 1

    def node(self, peer_id: str) -> MemoryNode:
        return self._nodes[peer_id]

    def peer_ids(self) -> list[str]:
        return list(self._nodes)

    def partition(self, groups: list[set[str]]) -> None:
        """Split the network: only nodes in the same group reach each other.

        Nodes in no group form one more group together. Replaces any earlier partition.
        """
        assignment: dict[str, int] = {}
        for index, group in enumerate(groups):
            for peer_id in group:
                if peer_id in assignment:
                    raise ValueError(f"{peer_id} is in more than one group")
                assignment[peer_id] = index
        self._groups = assignment

    def heal(self) -> None:
        self._groups = {}

    def _hopeless(self, peer_id: str) -> bool:
        """True when dialling `peer_id` fails at once: no such peer, or it refuses."""
        return peer_id not in self._nodes and self._removed.get(peer_id, True)

    def reachable(self, src: str, dst: str) -> bool:
        return not self._groups or self._groups.get(src, -1) == self._groups.get(dst, -1)

    def stall_s(self) -> float:
        """How long a lookup waits for an RPC before asking another peer in its place."""
        return max(4 * (2 * self.latency_s + self.jitter_s), 0.001)

    # -- links -----------------------------------------------------------------------------

    def _send(self, src: str, dst: str, size: int) -> float | None:
        """Count one message; its delay, or None when it is lost or blocked."""
        self.messages_sent += 1
        self.bytes_sent += size + _HEADER_BYTES
        if not self.reachable(src, dst) or (self.loss > 0 and self.rng.random() < self.loss):
            self.messages_dropped += 1
            return None
        if self.jitter_s > 0:
            return self.latency_s + self.rng.uniform(0.0, self.jitter_s)
        return self.latency_s

    async def _leg(self, src: str, dst: str, size: int) -> None:
        delay = self._send(src, dst, size)
        if delay is None:
            await trio.sleep_forever()  # a lost message: the caller's deadline ends the wait
        await self._sleep(delay)

    async def _transmit(self, src: MemoryNode, dst_id: str, protocol: str, payload: bytes) -> bytes:
        """One application request and its response, in the caller's task."""
        if not src.alive:
            raise NetworkError(f"{src.peer_id} was removed from the network")
        dst = self._nodes.get(dst_id)
        if dst is None:
            if dst_id not in self._removed:
                raise NetworkError(f"no address known for peer {dst_id}")
            if self._removed[dst_id]:
                await self._sleep(2 * self.latency_s)
                raise NetworkError(f"connection to {dst_id} refused")
        await self._leg(src.peer_id, dst_id, len(payload))
        if dst is None or self._nodes.get(dst_id) is not dst:  # dead on arrival
            self.messages_dropped += 1
            await trio.sleep_forever()
        dst._heard_from(src.peer_id)
        error: Exception | None = None
        response = b""
        try:
            response = await dst._serve(src.peer_id, protocol, payload)
        except Exception as exc:  # the stream is reset; the caller sees a failed request
            error = exc
        await self._leg(dst_id, src.peer_id, len(response))
        if not src.alive:
            raise NetworkError(f"{src.peer_id} was removed from the network")
        if error is not None:
            raise NetworkError(f"{protocol} on {dst_id} failed: {error!r}") from error
        return response

    def _call(
        self,
        src: MemoryNode,
        dst_id: str,
        protocol: str,
        payload: Any,
        size: int,
        timeout_s: float,
        callback: Callable[[bool, Any], None],
    ) -> None:
        """Send one DHT RPC; `callback(ok, response)` runs once, from the timer task."""
        self._ensure_timer()
        reply = _Reply(callback)
        now = trio.current_time()
        dst = self._nodes.get(dst_id)
        if not src.alive or (dst is None and dst_id not in self._removed):
            self._at(now, reply.finish, False)
            return
        if dst is None and self._removed[dst_id]:
            self._at(now + min(timeout_s, 2 * self.latency_s), reply.finish, False)
            return
        reply.timer = self._at(now + timeout_s, reply.finish, False)
        delay = self._send(src.peer_id, dst_id, size)
        if delay is not None:
            self._at(now + delay, self._arrive, reply, src, dst, dst_id, protocol, payload)

    def _arrive(
        self,
        reply: _Reply,
        src: MemoryNode,
        dst: MemoryNode | None,
        dst_id: str,
        protocol: str,
        payload: Any,
    ) -> None:
        if dst is None or self._nodes.get(dst_id) is not dst:  # dead on arrival
            self.messages_dropped += 1
            return
        dst._heard_from(src.peer_id)
        response, size = dst._serve_dht(src.peer_id, protocol, payload)
        if reply.done:  # the caller gave up: nobody is listening for the answer
            return
        delay = self._send(dst_id, src.peer_id, size)
        if delay is not None:
            self._at(trio.current_time() + delay, reply.finish, True, response)

    # -- gossip ----------------------------------------------------------------------------

    def subscribers(self, topic: str) -> set[str]:
        """The live peers subscribed to `topic` (a copy)."""
        return set(self._subscribers.get(topic, ()))

    def _subscribe(self, peer_id: str, topic: str) -> None:
        subscribers = self._subscribers.setdefault(topic, set())
        if peer_id not in subscribers:
            subscribers.add(peer_id)
            self._subscriptions_version += 1

    def _forward(
        self,
        src: MemoryNode,
        topic: str,
        msg_id: bytes,
        origin: str,
        data: bytes,
        came_from: str | None,
    ) -> None:
        """Send a gossip message from `src` to `fanout` random subscribed peers it knows."""
        peers = src._gossip_peers(topic)
        if not peers:
            return
        fanout = self.fanout
        # a random sample with room for the two peers that must not get it: still uniform
        pool = self.rng.sample(peers, min(len(peers), fanout + 2))
        size = len(topic) + len(origin) + len(msg_id) + len(data)
        now = trio.current_time()
        sent = 0
        src_id = src.peer_id
        for peer_id in pool:
            if peer_id in (came_from, origin):
                continue
            self.gossip_sent += 1
            self.gossip_bytes += size + _HEADER_BYTES
            delay = self._send(src_id, peer_id, size)
            if delay is not None:
                dst = self._nodes.get(peer_id)
                self._at(
                    now + delay,
                    self._gossip_arrive,
                    dst,
                    peer_id,
                    src_id,
                    topic,
                    msg_id,
                    origin,
                    data,
                )
            sent += 1
            if sent == fanout:
                break

    def _gossip_arrive(
        self,
        dst: MemoryNode | None,
        dst_id: str,
        sender: str,
        topic: str,
        msg_id: bytes,
        origin: str,
        data: bytes,
    ) -> None:
        if dst is None or self._nodes.get(dst_id) is not dst:  # dead on arrival
            self.messages_dropped += 1
            return
        dst._receive_gossip(sender, topic, msg_id, origin, data)

    # -- the timer -------------------------------------------------------------------------

    def _ensure_timer(self) -> None:
        token = trio.lowlevel.current_trio_token()
        if token is not self._timer_token:  # first use in this trio.run
            self._timer_token = token
            self._heap = []
            self._wake = None
            trio.lowlevel.spawn_system_task(self._run_timer, name="memnet timer")

    def _at(self, when: float, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """Run `fn(*args)` in the timer task at virtual time `when`; returns the entry.

        Only after `_ensure_timer()` in this run; setting the entry's fn to None cancels it.
        """
        self._seq += 1
        entry = [when, self._seq, fn, args]
        heapq.heappush(self._heap, entry)
        wake = self._wake
        if wake is not None and when < wake.deadline:
            wake.deadline = when
        return entry

    async def _sleep(self, delay: float) -> None:
        """`trio.sleep` on the hub's timer."""
        self._ensure_timer()
        entry = self._at(
            trio.current_time() + delay, trio.lowlevel.reschedule, trio.lowlevel.current_task()
        )

        def abort(_: Any) -> trio.lowlevel.Abort:
            entry[2] = None
            return trio.lowlevel.Abort.SUCCEEDED

        await trio.lowlevel.wait_task_rescheduled(abort)

    async def _run_timer(self) -> None:
        heap = self._heap
        while True:
            while heap and heap[0][2] is None:
                heapq.heappop(heap)
            with trio.CancelScope(deadline=heap[0][0] if heap else math.inf) as wake:
                self._wake = wake
                await trio.sleep_forever()
            self._wake = None
            now = trio.current_time()
            while heap and heap[0][0] <= now:
                _, _, fn, args = heapq.heappop(heap)
                if fn is not None:
                    fn(*args)


class MemoryNode:
    """One node on a `MemoryNetwork`; implements `p2p.network.Network`."""

    def __init__(self, hub: MemoryNetwork, peer_id: str, validator: DHTValidator | None) -> None:
        self._hub = hub
        self._peer_id = peer_id
        self._id = dht_id(peer_id)
        self._validator = validator
        self._table = RoutingTable()
        self._failures: dict[str, int] = {}
        self._evicted: dict[str, float] = {}  # peer id -> when it was dropped
        self._store: dict[str, bytes] = {}
        self._handlers: dict[str, RequestHandler] = {}
        self._alive = True
        self._bootstrap_pending = False
        self.puts_rejected = 0  # values from peers that this node's validator refused
        # gossip: handlers and the queue feeding each topic's delivery task
        self._topics: dict[str, tuple[list[GossipHandler], trio.MemorySendChannel[Any]]] = {}
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()
        self._gossip_cache: dict[str, tuple[int, int, list[str]]] = {}
        self.gossip_received = 0  # first copies of messages on subscribed topics
        self.gossip_duplicates = 0  # copies dropped as already seen
        self.gossip_handler_errors = 0  # handler calls that raised

    # -- the Network protocol --------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def alive(self) -> bool:
        return self._alive

    def now(self) -> float:
        return self._hub.now()

    def known_peers(self) -> set[str]:
        return self._table.peers()

    def set_validator(self, validator: DHTValidator | None) -> None:
        self._validator = validator

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None:
        if protocol.startswith(_DHT_PREFIX):
            raise ValueError(f"{_DHT_PREFIX} protocols are the DHT's own")
        self._handlers[protocol] = handler

    async def request(self, peer_id: str, protocol: str, payload: bytes) -> bytes:
        if protocol.startswith(_DHT_PREFIX):
            raise ValueError(f"{_DHT_PREFIX} protocols are the DHT's own")
        if not isinstance(payload, bytes):
            raise TypeError(f"a request payload is bytes, not {type(payload).__name__}")
        response = await self._hub._transmit(self, peer_id, protocol, payload)
        self._learn(peer_id)
        return response

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store locally, then at the K closest nodes to the key that answer.

        An invalid value raises the validator's own exception; refusals by remote nodes are
        not reported (as in py-libp2p).
        """
        self._check_alive()
        if self._validator is not None:
            self._validator.validate(key, value)
        self._keep(key, value)
        await self._ensure_bootstrapped()
        closest, _ = await _Lookup(self, dht_id(key), None).run()
        if not closest:
            return
        pending = len(closest)
        stored = trio.Event()

        def on_reply(ok: bool, response: Any) -> None:
            nonlocal pending
            pending -= 1
            if pending == 0:
                stored.set()

        for peer_id in closest:
            self._call_dht(peer_id, PUT, (key, value), len(key) + len(value), on_reply)
        await stored.wait()

    async def dht_get(self, key: str) -> bytes | None:
        """The local value if it is still valid, else the best valid value the network has."""
        self._check_alive()
        local = self._valid_local(key)
        if local is not None:
            return local
        await self._ensure_bootstrapped()
        _, found = await _Lookup(self, dht_id(key), key).run()
        valid = [v for v in dict.fromkeys(found) if self._accepts(key, v)]
        return valid[self._select(key, valid)] if valid else None

    async def publish(self, topic: str, data: bytes) -> None:
        """Send `data` to `fanout` random subscribed known peers; they pass it on.

        Returns at once (the sends are in flight); never delivered back to this node.
        """
        self._check_alive()
        if not isinstance(data, bytes):
            raise TypeError(f"gossip data is bytes, not {type(data).__name__}")
        msg_id = message_id(self._peer_id, data)
        self._remember(msg_id)
        self._hub._ensure_timer()
        self._hub._forward(self, topic, msg_id, self._peer_id, data, None)
        await trio.lowlevel.checkpoint()

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        """Call `handler(origin, data)` for each message on `topic` from now on, in order."""
        self._check_alive()
        subscription = self._topics.get(topic)
        if subscription is not None:
            subscription[0].append(handler)
        else:
            send, receive = trio.open_memory_channel[Any](math.inf)
            self._topics[topic] = ([handler], send)
            trio.lowlevel.spawn_system_task(
                self._deliver, topic, receive, name=f"memnet gossip {self._peer_id} {topic}"
            )
            self._hub._subscribe(self._peer_id, topic)
        await trio.lowlevel.checkpoint()

    # -- beyond the protocol: bootstrap, maintenance, inspection -----------------------------

    async def connect(self, peer_id: str, *, timeout_s: float = DIAL_TIMEOUT_S) -> None:
        """Dial a peer as one dials a bootstrap address: both sides learn each other.

        The dial is resent every RPC_TIMEOUT_S (as TCP resends a lost SYN); raises
        `NetworkError` when the peer has not answered within `timeout_s`, or refused. The next
        DHT call (or `refresh()`) first looks up this node's own id, so chained bootstraps
        converge.
        """
        if peer_id == self._peer_id:
            raise ValueError("a node cannot connect to itself")
        self._check_alive()
        deadline = trio.current_time() + timeout_s
        while (remaining := deadline - trio.current_time()) > 0:
            attempt_s = min(RPC_TIMEOUT_S, remaining)  # a lost dial is resent, as TCP does
            if await self._ask(peer_id, FIND_NODE, self._id, 32, timeout_s=attempt_s):
                self._bootstrap_pending = True
                return
            if self._hub._hopeless(peer_id):
                break  # unknown or refusing: resending cannot help
        raise NetworkError(f"could not reach {peer_id} within {timeout_s} s")

    async def refresh(self) -> None:
        """Look up our own id and a random one: finds neighbours and keeps the table fresh."""
        self._check_alive()
        self._bootstrap_pending = False
        await _Lookup(self, self._id, None).run()
        await _Lookup(self, self._hub.rng.getrandbits(ID_BITS), None).run()

    async def run_maintenance(self, interval_s: float) -> None:
        """Refresh now and every `interval_s`; returns once the node is removed."""
        while self._alive:
            try:
                await self.refresh()
            except NetworkError:
                if self._alive:
                    raise
                return
            await trio.sleep(interval_s)

    def local_value(self, key: str) -> bytes | None:
        """What this node's own store holds for `key`, unvalidated (for tests)."""
        return self._store.get(key)

    # -- internals -------------------------------------------------------------------------

    def _check_alive(self) -> None:
        if not self._alive:
            raise NetworkError(f"{self._peer_id} was removed from the network")

    def _crash(self) -> None:
        self._alive = False
        self._store.clear()
        self._table.clear()
        self._failures.clear()
        self._evicted.clear()
        for _, send in self._topics.values():
            send.close()  # ends the delivery tasks
        self._topics.clear()
        self._seen.clear()
        self._seen_order.clear()
        self._gossip_cache.clear()

    # -- gossip internals ------------------------------------------------------------------

    def _remember(self, msg_id: bytes) -> None:
        self._seen.add(msg_id)
        self._seen_order.append(msg_id)
        if len(self._seen_order) > self._hub.seen_cache:
            self._seen.discard(self._seen_order.popleft())

    def _gossip_peers(self, topic: str) -> list[str]:
        """Known peers subscribed to `topic`, sorted; cached until the table or topic changes."""
        table_version, subs_version = self._table.version, self._hub._subscriptions_version
        cached = self._gossip_cache.get(topic)
        if cached is not None and cached[0] == table_version and cached[1] == subs_version:
            return cached[2]
        subscribers = self._hub._subscribers.get(topic)
        peers = sorted(self._table.members(subscribers)) if subscribers else []
        self._gossip_cache[topic] = (table_version, subs_version, peers)
        return peers

    def _receive_gossip(
        self, sender: str, topic: str, msg_id: bytes, origin: str, data: bytes
    ) -> None:
        """One gossip hop arrived (in the timer task): drop it if seen, else forward and queue."""
        self._heard_from(sender)
        if msg_id in self._seen:
            self.gossip_duplicates += 1
            return
        self._remember(msg_id)
        subscription = self._topics.get(topic)
        if subscription is None:  # not subscribed (any more): neither delivered nor forwarded
            return
        self.gossip_received += 1
        self._hub._forward(self, topic, msg_id, origin, data, sender)
        subscription[1].send_nowait((origin, data))

    async def _deliver(self, topic: str, receive: trio.MemoryReceiveChannel[Any]) -> None:
        """The delivery task of one topic: runs the handlers, one message at a time."""
        async with receive:
            async for origin, data in receive:
                subscription = self._topics.get(topic)
                if not self._alive or subscription is None:
                    return
                for handler in tuple(subscription[0]):
                    try:
                        await handler(origin, data)
                    except Exception:  # a handler's bug must not stop delivery
                        self.gossip_handler_errors += 1

    def _learn(self, peer_id: str) -> None:
        """A peer proved alive: (re)admit it to the routing table."""
        if self._alive and peer_id != self._peer_id:
            self._table.add(peer_id)
            self._failures.pop(peer_id, None)
            self._evicted.pop(peer_id, None)

    def _discover(self, peer_id: str) -> None:
        """A peer named in a lookup answer joins the table, as in py-libp2p.

        Hearsay is weaker than contact: a peer we dropped for failing is not taken back from
        others' answers for EVICTION_BACKOFF_S, or a dead peer that others still name would
        keep coming back.
        """
        if self._alive and peer_id != self._peer_id and peer_id not in self._table:
            evicted_at = self._evicted.get(peer_id)
            if evicted_at is not None:
                if trio.current_time() - evicted_at < EVICTION_BACKOFF_S:
                    return
                del self._evicted[peer_id]
            self._table.add(peer_id)

    def _heard_from(self, peer_id: str) -> None:
        """Receiving any request teaches the receiver its sender (as Kademlia does)."""
        self._learn(peer_id)

    def _rpc_failed(self, peer_id: str) -> None:
        failures = self._failures.get(peer_id, 0) + 1
        if failures >= MAX_FAILURES:
            self._table.discard(peer_id)
            self._failures.pop(peer_id, None)
            self._evicted[peer_id] = trio.current_time()
        else:
            self._failures[peer_id] = failures

    async def _ensure_bootstrapped(self) -> None:
        if self._bootstrap_pending:
            self._bootstrap_pending = False
            await _Lookup(self, self._id, None).run()

    def _accepts(self, key: str, value: bytes) -> bool:
        if self._validator is None:
            return True
        try:
            self._validator.validate(key, value)
        except Exception:
            return False
        return True

    def _select(self, key: str, values: list[bytes]) -> int:
        if self._validator is None:
            return len(values) - 1
        index = self._validator.select(key, values)
        return index if 0 <= index < len(values) else len(values) - 1

    def _keep(self, key: str, value: bytes) -> None:
        """Store an already validated value unless the stored one is better."""
        current = self._store.get(key)
        if current is None or current == value:
            self._store[key] = value
        else:
            self._store[key] = (current, value)[self._select(key, [current, value])]

    def _valid_local(self, key: str) -> bytes | None:
        value = self._store.get(key)
        if value is not None and not self._accepts(key, value):
            del self._store[key]
            return None
        return value

    def _call_dht(
        self,
        peer_id: str,
        protocol: str,
        payload: Any,
        size: int,
        on_reply: Callable[[bool, Any], None],
        *,
        timeout_s: float = RPC_TIMEOUT_S,
    ) -> None:
        def done(ok: bool, response: Any) -> None:
            if self._alive:
                if ok:
                    self._learn(peer_id)
                else:
                    self._rpc_failed(peer_id)
            on_reply(ok and self._alive, response)

        self._hub._call(self, peer_id, protocol, payload, size, timeout_s, done)

    async def _ask(
        self, peer_id: str, protocol: str, payload: Any, size: int, *, timeout_s: float
    ) -> bool:
        """One DHT RPC, awaited: True when it was answered in time."""
        answered = trio.Event()
        outcome: list[bool] = []

        def on_reply(ok: bool, response: Any) -> None:
            outcome.append(ok)
            answered.set()

        self._call_dht(peer_id, protocol, payload, size, on_reply, timeout_s=timeout_s)
        await answered.wait()
        return outcome[0]

    def _serve_dht(self, sender: str, protocol: str, payload: Any) -> tuple[Any, int]:
        """Answer one DHT RPC; returns (response, approximate size in bytes)."""
        if protocol == FIND_NODE:
            peers = self._table.closest(payload, K, exclude=sender)
            return peers, _ids_size(peers)
        if protocol == GET:
            peers = self._table.closest(dht_id(payload), K, exclude=sender)
            value = self._store.get(payload)
            return (value, peers), len(value or b"") + _ids_size(peers)
        key, value = payload  # PUT
        try:
            if not self._accepts(key, value):
                raise ValueError("rejected by the validator")
            self._keep(key, value)
        except Exception:  # a refused or unselectable value is not stored
            self.puts_rejected += 1
            return False, 1
        return True, 1

    async def _serve(self, sender: str, protocol: str, payload: bytes) -> bytes:
        handler = self._handlers.get(protocol)
        if handler is None:
            raise NetworkError(f"protocol {protocol} is not supported")
        response = await handler(sender, payload)
        if not isinstance(response, bytes):
            raise TypeError(f"handler returned {type(response).__name__}, not bytes")
        return response


class _Lookup:
    """One iterative Kademlia lookup, driven by RPC replies in the timer task.

    Keeps ALPHA RPCs in flight to the closest unqueried candidates. An RPC unanswered after
    a few round trips (`MemoryNetwork.stall_s`) gives up its slot but may still answer until
    RPC_TIMEOUT_S, as libtorrent's DHT does; otherwise three lost messages would stall a
    lookup for a whole timeout. It is done when the K closest candidates that neither failed
    nor are still in flight have all answered, or when nothing is left to ask but stalled
    RPCs; those are not waited for (their failures still count against the peer when they
    time out). py-libp2p 0.8.1 has no such shortcuts: it waits for every query it started,
    each up to 10 s.

    `run()` returns the K closest peers that answered, nearest first, and every value
    received (unvalidated) when looking up a key.
    """

    def __init__(self, node: MemoryNode, target: int, key: str | None) -> None:
        self._node = node
        self._target = target
        self._key = key
        if key is None:
            self._request: tuple[str, Any, int] = (FIND_NODE, target, 32)
        else:
            self._request = (GET, key, len(key))
        self._candidates: list[tuple[int, str]] = []  # sorted by distance to the target
        self._seen: set[str] = {node.peer_id}
        self._queried: set[str] = set()
        self._in_flight: set[str] = set()
        self._stalled: set[str] = set()  # in flight, but no longer holding a slot
        self._stall_timers: dict[str, list[Any]] = {}
        self._failed: set[str] = set()
        self._answered: list[tuple[int, str]] = []
        self._values: list[bytes] = []
        self._done = trio.Event()
        node._check_alive()
        for peer_id in node._table.closest(target, K):
            self._consider(peer_id)

    async def run(self) -> tuple[list[str], list[bytes]]:
        self._schedule()
        try:
            await self._done.wait()
        finally:
            self._done.set()  # replies still in flight are ignored from now on
        return [peer_id for _, peer_id in self._answered[:K]], self._values

    def _consider(self, peer_id: str) -> None:
        if peer_id not in self._seen:
            self._seen.add(peer_id)
            bisect.insort(self._candidates, (dht_id(peer_id) ^ self._target, peer_id))

    def _schedule(self) -> None:
        protocol, payload, size = self._request
        in_flight, queried, failed = self._in_flight, self._queried, self._failed
        hub = self._node._hub
        counted = 0
        waiting = False  # an unqueried candidate among the K closest usable ones
        for _, peer_id in self._candidates:
            if peer_id in failed or peer_id in in_flight:
                continue
            if peer_id not in queried:
                waiting = True
                if len(in_flight) - len(self._stalled) >= ALPHA:
                    break
                queried.add(peer_id)
                in_flight.add(peer_id)
                on_reply = functools.partial(self._on_reply, peer_id)
                self._node._call_dht(peer_id, protocol, payload, size, on_reply)
                self._stall_timers[peer_id] = hub._at(
                    trio.current_time() + hub.stall_s(), self._on_stall, peer_id
                )
            counted += 1
            if counted >= K:
                break
        if not waiting and (counted >= K or len(in_flight) == len(self._stalled)):
            self._done.set()

    def _on_stall(self, peer_id: str) -> None:
        if peer_id in self._in_flight and not self._done.is_set():
            self._stalled.add(peer_id)
            self._schedule()

    def _on_reply(self, peer_id: str, ok: bool, response: Any) -> None:
        self._in_flight.discard(peer_id)
        self._stalled.discard(peer_id)
        timer = self._stall_timers.pop(peer_id, None)
        if timer is not None:
            timer[2] = None
        if self._done.is_set():
            return
        if not ok:
            self._failed.add(peer_id)
        else:
            bisect.insort(self._answered, (dht_id(peer_id) ^ self._target, peer_id))
            if self._key is None:
                closer = response
            else:
                value, closer = response
                if value is not None:
                    self._values.append(value)
            node, seen = self._node, self._seen
            table = node._table
            for peer in closer:
                if peer not in table:
                    node._discover(peer)
                if peer not in seen:
                    seen.add(peer)
                    bisect.insort(self._candidates, (dht_id(peer) ^ self._target, peer))
        self._schedule()
