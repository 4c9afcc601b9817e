"""The hub of the in-memory network: every node, the links between them, the counters, and
one timer that delivers every message (see `p2p.testing.memnet`)."""

from __future__ import annotations

import heapq
import math
import random
from collections import Counter
from collections.abc import Callable
from typing import Any

import trio

from p2p.network import DHTValidator, FrameBound, NetworkError
from p2p.streams import ChannelStream, stream_pair
from p2p.testing.kademlia import _Reply
from p2p.testing.node import MemoryNode

_HEADER_BYTES = 64  # rough per-message framing overhead, for the byte counter
GOSSIP_FANOUT = 6  # peers each publisher and forwarder sends a gossip message to (GossipSub's D)
SEEN_CACHE_SIZE = 8192  # message ids a node remembers, to drop gossip it has already seen
STREAM_CAPACITY = 8  # frames buffered in each direction of a stream before a send waits


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
        bucket_size: int | None = None,
    ) -> None:
        """`bucket_size`: each node's routing table keeps at most that many peers per k-bucket
        (real Kademlia's K, as py-libp2p's); None keeps every peer heard of (see `memnet`)."""
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
        self.bucket_size = bucket_size
        self.lookup_rounds: Counter[int] = Counter()  # rounds an iterative lookup took -> how many
        self.messages_sent = 0  # every message, gossip hops included
        self.messages_dropped = 0
        self.bytes_sent = 0
        self.gossip_sent = 0  # gossip hops (each also counts in messages_sent)
        self.gossip_bytes = 0  # their share of bytes_sent
        self.streams_opened = 0
        self.stream_capacity = STREAM_CAPACITY
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

    def add_node(
        self, peer_id: str, validator: DHTValidator | None = None, network_id: str | None = None
    ) -> MemoryNode:
        """A node; with `network_id`, its protocols, topics and keys are that network's
        (`p2p.network.NetworkScope`) and nodes of other networks are refused (`_reach`)."""
        if peer_id in self._nodes:
            raise ValueError(f"{peer_id} is already on the network")
        self._removed.pop(peer_id, None)
        node = MemoryNode(self, peer_id, validator, network_id)
        self._nodes[peer_id] = node
        return node

    def remove_node(self, peer_id: str, *, refuse: bool = False) -> None:
        """Crash a node: its store and routing table are gone and it answers nothing.

        By default messages to it vanish (a dead machine); with `refuse=True` they fail with
        `NetworkError` after a round trip (a live machine whose daemon is gone). Either way its
        stream handlers stop; with `refuse=True` its streams are also reset (the kernel of a
        live machine resets the connections of a killed process), else they go silent.
        """
        node = self._nodes.pop(peer_id)
        node._crash(reset_streams=refuse)
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

    async def _reach(self, src: MemoryNode, dst_id: str, size: int) -> MemoryNode:
        """Carry one message of `size` bytes from `src` to `dst_id`: the live node it reached.

        Raises NetworkError at once for an unknown peer, after a round trip for a refusing
        one; hangs (until the caller's deadline) when the message is lost or the peer dead.
        """
        if not src.alive:
            raise NetworkError(f"{src.peer_id} was removed from the network")
        dst = self._nodes.get(dst_id)
        if dst is None:
            if dst_id not in self._removed:
                raise NetworkError(f"no address known for peer {dst_id}")
            if self._removed[dst_id]:
                await self._sleep(2 * self.latency_s)
                raise NetworkError(f"connection to {dst_id} refused")
        await self._leg(src.peer_id, dst_id, size)
        if dst is None or self._nodes.get(dst_id) is not dst:  # dead on arrival
            self.messages_dropped += 1
            await trio.sleep_forever()
        if dst.network_id != src.network_id:  # as libp2p's hello gate: refused, both ways
            dst._refuse(src.peer_id, src.network_id)
            await self._leg(dst_id, src.peer_id, 1)
            raise NetworkError(src._refuse(dst_id, dst.network_id))
        dst._heard_from(src.peer_id)
        return dst

    async def _transmit(self, src: MemoryNode, dst_id: str, protocol: str, payload: bytes) -> bytes:
        """One application request and its response, in the caller's task."""
        dst = await self._reach(src, dst_id, len(payload))
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

    async def _open_stream(
        self, src: MemoryNode, dst_id: str, protocol: str, max_frame_bytes: FrameBound
    ) -> ChannelStream:
        """Open a stream in one round trip: the handler starts as the request arrives."""
        dst = await self._reach(src, dst_id, len(protocol))
        served = dst._stream_handlers.get(protocol)
        ours: ChannelStream | None = None
        if served is not None:
            handler, bound = served
            ours, theirs = stream_pair(
                src.peer_id,
                dst_id,
                self.stream_capacity,
                max_frame_bytes=(max_frame_bytes, bound),
            )
            src._own_stream(ours)
            dst._start_stream_handler(handler, theirs)
            self.streams_opened += 1
        try:
            await self._leg(dst_id, src.peer_id, 1)
            if not src.alive:
                raise NetworkError(f"{src.peer_id} was removed from the network")
        except BaseException:
            if ours is not None:
                ours.abort()
            raise
        if ours is None:
            raise NetworkError(f"protocol {protocol} is not supported by {dst_id}")
        return ours

    async def _round_trip(self, src: MemoryNode, dst_id: str) -> None:
        """A ping and its answer."""
        await self._reach(src, dst_id, 8)
        await self._leg(dst_id, src.peer_id, 8)

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
        if (dst is None and self._removed[dst_id]) or (
            dst is not None and dst.network_id != src.network_id  # the hello refuses it
        ):
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
