"""One node of the in-memory network: the `p2p.network.Network` it implements."""

from __future__ import annotations

import hashlib
import math
from collections import deque
from collections.abc import Callable
from typing import Any

import trio

from p2p.network import (
    DHTValidator,
    GossipHandler,
    GossipValidator,
    GossipVerdict,
    NetworkError,
    NetworkScope,
    RequestHandler,
    gossip_verdict,
)
from p2p.testing.kademlia import (
    _DHT_PREFIX,
    EVICTION_BACKOFF_S,
    FIND_NODE,
    GET,
    ID_BITS,
    MAX_FAILURES,
    PUT,
    RPC_TIMEOUT_S,
    K,
    RoutingTable,
    _ids_size,
    _Lookup,
    dht_id,
    target_id,
)
from p2p.testing.peering import Peering, peer_of

# a p2p.testing.hub.MemoryNetwork: not imported, since that module builds on this one
Hub = Any

DIAL_TIMEOUT_S = 5.0


def message_id(origin: str, data: bytes) -> bytes:
    """The id of a gossip message: receivers drop ids they have seen."""
    return hashlib.sha256(origin.encode() + b"\0" + data).digest()[:16]


class MemoryNode(Peering):
    """One node on a `MemoryNetwork`; implements `p2p.network.Network` (streams,
    connections and peer tracking come from `Peering`)."""

    def __init__(
        self, hub: Hub, peer_id: str, validator: DHTValidator | None, network_id: str | None = None
    ) -> None:
        self._hub = hub
        self._peer_id = peer_id
        self.scope = NetworkScope(network_id)  # protocols, topics, keys: this network's
        self.refused: dict[str, str] = {}  # peers of other networks refused, and why
        self._id = dht_id(peer_id)
        self._validator = validator
        self._table = RoutingTable(self._id, hub.bucket_size)
        self._failures: dict[str, int] = {}
        self._evicted: dict[str, float] = {}  # peer id -> when it was dropped
        self._store: dict[str, bytes] = {}
        self._handlers: dict[str, RequestHandler] = {}
        self._alive = True
        self._bootstrap_pending = False
        self.puts_rejected = 0  # values from peers that this node's validator refused
        # gossip: handlers and the queue feeding each topic's delivery task
        self._topics: dict[str, tuple[list[GossipHandler], trio.MemorySendChannel[Any]]] = {}
        self._validators: dict[str, list[GossipValidator]] = {}  # topic -> all must accept
        self._seen: set[bytes] = set()
        self._seen_order: deque[bytes] = deque()
        self._gossip_cache: dict[str, tuple[Any, int, list[str]]] = {}
        self.gossip_received = 0  # first copies of messages on subscribed topics
        self.gossip_duplicates = 0  # copies dropped as already seen
        self.gossip_handler_errors = 0  # handler calls that raised
        self.gossip_refused = 0  # first copies a validator refused (neither delivered nor sent on)
        self.gossip_validator_errors = 0  # validator calls that raised (each also refused)
        self._handler_timeouts: dict[str, float] = {}
        self._init_peering()

    # -- the Network protocol --------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._peer_id

    @property
    def alive(self) -> bool:
        return self._alive

    @property
    def network_id(self) -> str | None:
        return self.scope.network_id

    def refused_peers(self) -> dict[str, str]:
        """Peers of other networks this node was refused by or refused, and why."""
        return dict(self.refused)

    def _refuse(self, peer_id: str, theirs: str | None) -> str:
        """A peer of network `theirs` met this node: remember why neither serves the other."""
        why = f"peer {peer_id} is on network {theirs!r}, not {self.network_id!r}"
        self.refused[peer_id] = why
        return why

    def now(self) -> float:
        return self._hub.now()

    def known_peers(self) -> set[str]:
        return self._table.peers()

    def set_validator(self, validator: DHTValidator | None) -> None:
        self._validator = validator

    def set_request_handler(
        self, protocol: str, handler: RequestHandler, *, timeout_s: float | None = None
    ) -> None:
        """`timeout_s`: an answer taking longer fails the request (by default, unbounded)."""
        if protocol.startswith(_DHT_PREFIX):
            raise ValueError(f"{_DHT_PREFIX} protocols are the DHT's own")
        protocol = self.scope.protocol(protocol)
        self._handlers[protocol] = handler
        if timeout_s is None:
            self._handler_timeouts.pop(protocol, None)
        else:
            self._handler_timeouts[protocol] = timeout_s

    async def request(
        self, peer_id: str, protocol: str, payload: bytes, *, timeout_s: float | None = None
    ) -> bytes:
        """`timeout_s`: NetworkError when no answer came in time (by default, unbounded:
        a lost message hangs until the caller's own deadline)."""
        if protocol.startswith(_DHT_PREFIX):
            raise ValueError(f"{_DHT_PREFIX} protocols are the DHT's own")
        if not isinstance(payload, bytes):
            raise TypeError(f"a request payload is bytes, not {type(payload).__name__}")
        protocol = self.scope.protocol(protocol)
        if timeout_s is None:
            response = await self._hub._transmit(self, peer_id, protocol, payload)
        else:
            with trio.move_on_after(timeout_s):
                response = await self._hub._transmit(self, peer_id, protocol, payload)
                self._learn(peer_id)
                self._contacts.add(peer_id)
                return response
            raise NetworkError(f"request {protocol} to {peer_id} timed out after {timeout_s} s")
        self._learn(peer_id)
        self._contacts.add(peer_id)
        return response

    async def dht_put(self, key: str, value: bytes) -> None:
        """Store locally, then at the K closest nodes to the key that answer.

        An invalid value raises the validator's own exception; refusals by remote nodes are
        not reported (as in py-libp2p).
        """
        self._check_alive()
        key = self.scope.dht_key(key)
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
        key = self.scope.dht_key(key)
        local = self._valid_local(key)
        if local is not None:
            return local
        await self._ensure_bootstrapped()
        _, found = await _Lookup(self, dht_id(key), key).run()
        valid = [v for v in dict.fromkeys(found) if self._accepts(key, v)]
        return valid[self._select(key, valid)] if valid else None

    async def dht_get_from(self, peer_id: str, key: str) -> bytes | None:
        self._check_alive()
        key = self.scope.dht_key(key)
        if peer_id == self.peer_id:
            return self._valid_local(key)
        answered = trio.Event()
        replies: list[Any] = []

        def on_reply(ok: bool, response: Any) -> None:
            replies.append(response if ok else None)
            answered.set()

        self._call_dht(peer_id, GET, key, len(key), on_reply)
        await answered.wait()
        value = replies[0][0] if replies[0] else None
        return value if value is not None and self._accepts(key, value) else None

    async def dht_find_peers(self, target: bytes) -> list[str]:
        self._check_alive()
        await self._ensure_bootstrapped()
        closest, _ = await _Lookup(self, target_id(target), None).run()
        return closest

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
        self._hub._forward(self, self.scope.topic(topic), msg_id, self._peer_id, data, None)
        await trio.lowlevel.checkpoint()

    async def subscribe(
        self, topic: str, handler: GossipHandler, validator: GossipValidator | None = None
    ) -> None:
        """Call `handler(origin, data)` for each message on `topic` from now on, in order;
        a message `validator` refuses is neither delivered nor forwarded (`Gossip.subscribe`)."""
        self._check_alive()
        topic = self.scope.topic(topic)
        if validator is not None:  # before the subscription, so that nothing slips past it
            self._validators.setdefault(topic, []).append(validator)
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

    async def connect(self, addr: str, timeout_s: float = DIAL_TIMEOUT_S) -> str:
        """Dial a peer (`/p2p/<peer id>`, or a bare peer id) as one dials a bootstrap
        address: both sides learn each other. Returns the peer id.

        The dial is resent every RPC_TIMEOUT_S (as TCP resends a lost SYN); raises
        `NetworkError` when the peer has not answered within `timeout_s`, or refused. The next
        DHT call (or `refresh()`) first looks up this node's own id, so chained bootstraps
        converge.
        """
        peer_id = peer_of(addr)
        if peer_id == self._peer_id:
            raise ValueError("a node cannot connect to itself")
        self._check_alive()
        other = self._hub._nodes.get(peer_id)
        if other is not None and other.network_id != self.network_id:  # the hello, in memory
            await self._hub._round_trip(self, peer_id)  # raises with the reason
        deadline = trio.current_time() + timeout_s
        while (remaining := deadline - trio.current_time()) > 0:
            attempt_s = min(RPC_TIMEOUT_S, remaining)  # a lost dial is resent, as TCP does
            if await self._ask(peer_id, FIND_NODE, self._id, 32, timeout_s=attempt_s):
                self._bootstrap_pending = True
                self._note_connected(peer_id, addr)
                return peer_id
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

    def _crash(self, *, reset_streams: bool = False) -> None:
        self._alive = False
        self._end_streams(reset=reset_streams)
        self._store.clear()
        self._table.clear()
        self._failures.clear()
        self._evicted.clear()
        for _, send in self._topics.values():
            send.close()  # ends the delivery tasks
        self._topics.clear()
        self._validators.clear()
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
        """Known peers subscribed to `topic`, sorted; cached until the table or topic changes.

        With k-buckets, the peers this node exchanged messages with too: GossipSub meshes
        over connections, and a node that joined late sits in few full buckets (Kademlia
        keeps old peers), so the table alone would rarely pass it a message."""
        table_version, subs_version = self._table.version, self._hub._subscriptions_version
        if self._hub.bucket_size is not None:  # contacts only grow: their count versions them
            table_version = (table_version, len(self._contacts))
        cached = self._gossip_cache.get(topic)
        if cached is not None and cached[0] == table_version and cached[1] == subs_version:
            return cached[2]
        subscribers = self._hub._subscribers.get(topic)
        peers = sorted(self._table.members(subscribers)) if subscribers else []
        if subscribers and self._hub.bucket_size is not None:
            peers = sorted(set(peers) | (self._contacts & subscribers))
        self._gossip_cache[topic] = (table_version, subs_version, peers)
        return peers

    def _receive_gossip(
        self, sender: str, topic: str, msg_id: bytes, origin: str, data: bytes
    ) -> None:
        """One gossip hop arrived (in the timer task): drop it if seen, else validate, forward
        and queue. A refused message is remembered as seen too: its later copies cost nothing
        (as py-libp2p caches a refusal by message id)."""
        self._heard_from(sender)
        if msg_id in self._seen:
            self.gossip_duplicates += 1
            return
        self._remember(msg_id)
        subscription = self._topics.get(topic)
        if subscription is None:  # not subscribed (any more): neither delivered nor forwarded
            return
        if not self._validated(topic, origin, data):
            self.gossip_refused += 1
            return
        self.gossip_received += 1
        self._hub._forward(self, topic, msg_id, origin, data, sender)
        subscription[1].send_nowait((origin, data))

    def _validated(self, topic: str, origin: str, data: bytes) -> bool:
        """Whether every validator of `topic` takes the message (one that raises refuses)."""
        for validator in tuple(self._validators.get(topic, ())):
            try:
                if gossip_verdict(validator(origin, data)) is not GossipVerdict.ACCEPT:
                    return False
            except Exception:
                self.gossip_validator_errors += 1
                return False
        return True

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
            self._contacts.add(peer_id)
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
        self._contacts.add(sender)
        timeout_s = self._handler_timeouts.get(protocol)
        if timeout_s is None:
            response = await handler(sender, payload)
        else:
            with trio.fail_after(timeout_s):
                response = await handler(sender, payload)
        if not isinstance(response, bytes):
            raise TypeError(f"handler returned {type(response).__name__}, not bytes")
        return response
