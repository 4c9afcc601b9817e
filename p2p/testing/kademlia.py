"""The Kademlia of the in-memory network: ids, the routing table, and iterative lookups.

The DHT is carried over the hub's lossy links (`/memdht/find_node`, `/memdht/get`,
`/memdht/put`); see `p2p.testing.memnet` for how failures look to a caller.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import trio

# a p2p.testing.node.MemoryNode: not imported, since that module builds on this one
Node = Any

K = 20  # replication factor and lookup width
ALPHA = 3  # parallel RPCs per lookup
RPC_TIMEOUT_S = 1.0  # virtual seconds before one DHT RPC counts as failed
MAX_FAILURES = 5  # consecutive failed RPCs before a peer leaves the routing table
EVICTION_BACKOFF_S = 60.0  # an evicted peer named by others is ignored this long
ID_BITS = 256
_DHT_PREFIX = "/memdht/"
FIND_NODE = "/memdht/find_node"
GET = "/memdht/get"
PUT = "/memdht/put"


@functools.lru_cache(maxsize=1 << 16)
def dht_id(name: str) -> int:
    """The 256-bit Kademlia id of a peer id or a DHT key."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest(), "big")


def target_id(target: bytes) -> int:
    """The 256-bit Kademlia id of a walk's target (`dht_id(key)` is `target_id(key.encode())`)."""
    return int.from_bytes(hashlib.sha256(target).digest(), "big")


def _ids_size(peers: list[str]) -> int:
    return sum(map(len, peers)) + 2


class RoutingTable:
    """Every peer a node knows, kept sorted by id; with `bucket_size`, at most that many per
    k-bucket (peers whose id shares exactly i leading bits with `own`), as real Kademlia
    keeps: a full bucket keeps its old peers and refuses newcomers until one fails.

    Peers sharing a longer id prefix with a target are closer to it (XOR metric) and lie
    contiguously in id order, so the `count` closest are found by bisecting for the smallest
    prefix subtree around the target that holds `count` peers: O(log n + count) per query
    instead of a scan of every known peer. The last answers are kept until the table changes:
    a node is asked for its own record by every other (GET answers carry the closest peers
    too), many times over with the same target.
    """

    def __init__(self, own: int = 0, bucket_size: int | None = None) -> None:
        self._own = own
        self._bucket_size = bucket_size
        self._buckets: dict[int, int] = {}  # bucket (bit length of the XOR) -> peers in it
        self._ids: list[int] = []
        self._by_id: dict[int, str] = {}
        self._by_peer: dict[str, int] = {}
        self.version = 0  # bumped on every change, so views of the table can be cached
        self._answers: dict[tuple[int, int], list[str]] = {}  # (target, n) -> n closest
        self._answers_version = 0

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
        if self._bucket_size is not None:
            bucket = (pid ^ self._own).bit_length()
            if self._buckets.get(bucket, 0) >= self._bucket_size:
                return False
            self._buckets[bucket] = self._buckets.get(bucket, 0) + 1
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
        if self._bucket_size is not None:
            self._buckets[(pid ^ self._own).bit_length()] -= 1
        self.version += 1

    def clear(self) -> None:
        self._ids.clear()
        self._by_id.clear()
        self._by_peer.clear()
        self._buckets.clear()
        self.version += 1

    def members(self, peers: set[str]) -> set[str]:
        """The peers of `peers` that this table holds."""
        return peers & self._by_peer.keys()

    def closest(self, target: int, count: int, exclude: str | None = None) -> list[str]:
        """The `count` known peers closest to `target`, nearest first, without `exclude`."""
        want = count + 1 if exclude is not None and exclude in self._by_peer else count
        if self._answers_version != self.version or len(self._answers) >= 1024:
            self._answers.clear()
            self._answers_version = self.version
        kept = self._answers.get((target, count + 1))
        if kept is None:
            kept = self._answers[(target, count + 1)] = self._closest(target, count + 1)
        if want > count:
            return [peer for peer in kept if peer != exclude][:count]
        return kept[:count]

    def _closest(self, target: int, want: int) -> list[str]:
        """The `want` known peers closest to `target`, nearest first."""
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
        return [by_id[distance ^ target] for distance in nearest]


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
    received (unvalidated) when looking up a key. `rounds`: how many steps deep it went (a
    peer from the node's own table is one step away, a peer named in the answer of a peer n
    steps away is n + 1), the deepest query it sent; the hub counts them (`lookup_rounds`).
    """

    def __init__(self, node: Node, target: int, key: str | None) -> None:
        self._node = node
        self._target = target
        self._key = key
        if key is None:
            self._request: tuple[str, Any, int] = (FIND_NODE, target, 32)
        else:
            self._request = (GET, key, len(key))
        self._candidates: list[tuple[int, str]] = []  # sorted by distance to the target
        self._depth: dict[str, int] = {}  # candidate -> steps from this node
        self.rounds = 0
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
            self._consider(peer_id, 1)

    async def run(self) -> tuple[list[str], list[bytes]]:
        self._schedule()
        try:
            await self._done.wait()
        finally:
            self._done.set()  # replies still in flight are ignored from now on
        self._node._hub.lookup_rounds[self.rounds] += 1
        return [peer_id for _, peer_id in self._answered[:K]], self._values

    def _consider(self, peer_id: str, depth: int) -> None:
        if peer_id not in self._seen:
            self._seen.add(peer_id)
            self._depth[peer_id] = depth
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
                self.rounds = max(self.rounds, self._depth[peer_id])
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
            depth = self._depth[peer_id] + 1
            for peer in closer:
                if peer not in table:
                    node._discover(peer)
                if peer not in seen:
                    seen.add(peer)
                    self._depth[peer] = depth
                    bisect.insort(self._candidates, (dht_id(peer) ^ self._target, peer))
        self._schedule()
