"""The py-libp2p host adapter: the real `Network`, and every py-libp2p workaround we need.

Keep all knowledge of py-libp2p 0.8.1's quirks here (DESIGN.md, "Known pitfalls"):
- dials wait 250 ms on a happy-eyeballs timer: the module constant is set to 0;
- `new_host()` accepts plaintext by default: we pass Noise only, and Yamux;
- a malformed message on some protocols escapes the stream handler and kills the host: every
  handler, libp2p's own included, is wrapped in one guard that counts, resets and carries on;
- DHT operations have 10 s internal timeouts: every call here is bounded by our own deadline;
- `dht.add_peer` must be called after connecting; dead peers stay in the routing table and
  are dialled three times with backoff by every lookup: we dial once and forget peers whose
  last connection closed;
- libp2p's loggers do not propagate: `quiet_libp2p_logs` attaches our own handler;
- KadDHT ignores `protocol_prefix`: the network's name goes into every protocol id, topic and
  DHT namespace here instead (`p2p.network.NetworkScope`), and the hello refuses the rest.

The host's parts live beside it: `p2p.framing` (frames and the libp2p stream adapter),
`p2p.hello` (the network-membership gate), `p2p.guard` (the stream guard, gossip limits and
validators, inbound connection limits), `p2p.limits` (per-peer limits, token buckets),
`p2p.dhtguard` (the DHT's validators and refusal counts), `p2p.addrs` and `p2p.hostaddrs`
(our addresses), `p2p.addrguard` (peers' addresses: what is stored and dialled, what is passed
on), `p2p.peers` (peer tracking), `p2p.reach` (AutoNAT, relay, DCUtR, UPnP)."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network import swarm as _swarm
from libp2p.network.config import RetryConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from p2p import atomic_writes, buffers, caps, deadconn, identity, inbound, sender_records
from p2p.addrguard import AddrGuard
from p2p.addrs import ListenError, check_listen_free, is_own_addr
from p2p.bans import PeerBans
from p2p.dhtguard import DHT_PROTOCOL, ValidatorBridge
from p2p.dhtops import DHTObserver, DhtOps
from p2p.framing import (
    FRAME_DEADLINE_S,
    FRAME_MIN_BYTES_PER_S,
    MAX_FRAME_BYTES,
    FrameDeadlineError,
    FramedStream,
    frame_time_limit_s,
    read_frame,
    write_frame,
)
from p2p.guard import (
    GossipValidators,
    StreamGuard,
    StrikingValidator,
    describe_error,
    harden_inbound,
    harden_pubsub,
    reason_of,
)
from p2p.hello import HELLO_PROTOCOL, HelloGate, open_hello
from p2p.hostaddrs import on_listen_ports
from p2p.libp2p_logs import quiet_libp2p_logs
from p2p.limits import HostLimits, RateLimiter, RejectHook
from p2p.network import (
    MAX_STREAM_FRAME_BYTES,
    DHTValidator,
    FrameBound,
    GossipHandler,
    GossipValidator,
    NetworkError,
    NetworkScope,
    PeerState,
    RequestHandler,
    StreamHandler,
)
from p2p.peers import AutoDialBound, ForgetDisconnected, keep_connected, track_peers
from p2p.ping import Pinger
from p2p.reach import Reachability, ReachSettings
from p2p.scoring import gossipsub_params

_swarm._HAPPY_EYEBALLS_DELAY = 0  # type: ignore[attr-defined]
atomic_writes.install()  # a cancelled write must not break its connection (see the module)
sender_records.install()  # a gossip peer's signed record checked once, not per RPC
# py-libp2p drops gossip silently once a subscription's queue (32) is full; ours is larger and
# every drop is counted (see `p2p.guard.harden_pubsub`)
_pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = 256  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

# what others import from here (the host's parts live in the modules above)
__all__ = [
    "DHT_PROTOCOL",
    "FRAME_DEADLINE_S",
    "FRAME_MIN_BYTES_PER_S",
    "HELLO_PROTOCOL",
    "MAX_FRAME_BYTES",
    "MAX_STREAM_FRAME_BYTES",
    "FrameDeadlineError",
    "FramedStream",
    "HostLimits",
    "Libp2pNetwork",
    "ListenError",
    "PeerState",
    "RejectHook",
    "frame_time_limit_s",
    "open_hello",
    "quiet_libp2p_logs",
    "read_frame",
    "write_frame",
]

PING_TIMEOUT_S = 2.0
# a request that gave up sooner than this shows nothing about its connection, and does not
# have it checked for being dark (p2p.deadconn): SWIM's probes wait 80 ms (up to 0.64 s on a
# slow node) while opening a stream alone took 1-2 s on a loaded machine (5 daemons of the
# election procs tests, median 1.9 s of those over 1 s), so nearly every probe timed out,
# every peer was under a check all the time, and each check whose two pings missed closed the
# connection and every stream on it (~10 times per daemon per test)
DARK_MIN_WAIT_S = 1.0
CLOSED_POLL_S = 2.0  # how often an inbound connection's socket is checked for being closed
# (op, outcome, seconds) -> None


class Libp2pNetwork:
    """A running libp2p host with Kademlia DHT, implementing `p2p.network.Network`."""

    def __init__(
        self,
        ident: identity.NodeIdentity,
        *,
        network_id: str,
        listen: list[str],
        dht_namespace: str,
        dht_validator: DHTValidator,
        dht_timeout_s: float = 5.0,
        request_timeout_s: float = 10.0,
        on_reject: RejectHook | None = None,
        on_dht_op: DHTObserver | None = None,
        limits: HostLimits | None = None,
        reach: ReachSettings | None = None,
    ) -> None:
        self._ident = ident
        self.network_id = network_id
        self.scope = NetworkScope(network_id)
        self.limits = limits or HostLimits()
        self._on_reject = on_reject or (lambda source, reason: None)
        try:
            self._listen = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as exc:
            raise ListenError(f"not a listen multiaddr: {str(listen)[:200]} ({exc})") from None
        namespace = self.scope.namespace(dht_namespace)  # this network's DHT keys
        key_pair = create_new_key_pair(ident.node_seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_preference="YAMUX",
            connection_config=caps.connection_config(self.limits),  # caps in total and per peer
            resource_manager=caps.resource_manager(self.limits, self._on_reject),
        )
        # advertise only addresses a peer can dial: 0.0.0.0 becomes this host's addresses
        self.host._addrs_factory = self._advertised_addrs  # type: ignore[attr-defined]
        lim = self.limits
        self.bans = PeerBans(
            lim.ban_strikes,
            lim.ban_window_s,
            lim.ban_s,
            lim.max_tracked_peers,
            self._on_ban,
            score_threshold=lim.score_threshold,
            score_half_life_s=lim.score_half_life_s,
            own=ident.peer_id,
        )
        self.dht = KadDHT(
            self.host,
            DHTMode.SERVER,
            validator=StrikingValidator(
                {namespace: ValidatorBridge(dht_validator, self._on_reject)},
                self._on_reject,
                self.bans,
            ),
            validator_changed=True,
            strict_validation=True,
        )
        # KadDHT() may reset the validator's strict mode: keys outside our namespace would then
        # be stored and served (DESIGN.md, "Known pitfalls"). Set it again, after construction.
        self.dht.strict_validation = True
        self.dht.validator.strict_validation = True  # type: ignore[union-attr]
        # one dial attempt: a dead peer must fail fast; our bootstrap loop does its own backoff
        self.host.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
        self._pinger = Pinger(self.host)  # p2p.ping: concurrent pings to a peer take turns
        # what peers tell us of addresses is checked before it is stored (and so dialled),
        # and what we pass on is tailored to each peer (p2p.addrguard; AutoNAT's requests too)
        self.addr_guard = AddrGuard(self.host, self._on_reject)
        self.reach = Reachability(
            self.host,
            reach or ReachSettings(),
            self._on_reject,
            self.bans,
            reach_of=self.addr_guard.reach_of,
        )
        self.addr_guard.install(self.reach.dcutr)
        self.dark = deadconn.DeadConnections(self.ping, self._drop_peer)  # p2p.deadconn
        self.inbound = buffers.host_budget(lim, self._on_reject, self.bans)  # unread bytes
        # bytes read from each peer, at a rate its score brings down (p2p.inbound)
        self.inbound_rate = inbound.InboundBudget(
            lim, self.bans.scores.score, self._on_reject, penalize=self.bans.penalize
        )
        # GossipSub's defaults lose messages (120 s heartbeat, 10 msg/s spam limit): tune them
        self.gossipsub = GossipSub(
            protocols=[PROTOCOL_ID_V12, PROTOCOL_ID_V11],
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_initial_delay=0.1,
            heartbeat_interval=1,  # type: ignore[arg-type]
            spam_protection_enabled=False,
            max_messages_per_topic_per_second=10_000.0,
            max_pending_messages_per_peer=1000,
            score_params=gossipsub_params(self.bans.scores),  # our score as P6 (p2p.scoring)
        )
        self.pubsub = Pubsub(
            self.host,
            self.gossipsub,
            seen_ttl=self.limits.seen_ttl_s,
            sweep_interval=max(1, min(10, self.limits.seen_ttl_s)),
        )
        # the poll interval is read at each use (tests shorten it)
        harden_inbound(
            self.host.get_network(),
            self.limits.max_connections_per_ip,
            self._on_reject,
            lambda: CLOSED_POLL_S,
        )
        self._nursery: trio.Nursery | None = None
        # py-libp2p's auto-connector redials a gone peer every minute for hours: bounded
        self.auto_dials = AutoDialBound(self.host.get_network())
        self.host.get_network().register_notifee(ForgetDisconnected(self))
        self.host.get_network().register_notifee(inbound.BudgetOnConnect(self.inbound_rate))
        self._dht_ops = DhtOps(
            self.dht, dht_validator, dht_timeout_s, on_dht_op, spawn=self._start_soon
        )
        self._request_timeout_s = request_timeout_s
        self.peers: dict[str, PeerState] = {}
        limits = self.limits
        self._stream_limiter = RateLimiter(
            limits.streams_per_s, limits.stream_burst, limits.max_tracked_peers * 4
        )
        harden_pubsub(
            self.pubsub,
            limits,
            self._on_reject,
            RateLimiter(limits.gossip_per_s, limits.gossip_burst, limits.max_tracked_peers),
            RateLimiter(
                limits.gossip_bytes_per_s, limits.gossip_bytes_burst, limits.max_tracked_peers
            ),
            self.bans,
        )
        self.gossip_validators = GossipValidators(self.pubsub, self._on_reject, self.bans)
        self.hello_gate = HelloGate(
            ident,
            network_id,
            limits,
            self._on_reject,
            request=self.request,
            drop_peer=self._drop_peer,
            connected_peers=self.connected_peers,
            now=self.now,
        )
        self._guard = StreamGuard(self._stream_limiter, self.hello_gate, self._on_reject, self.bans)

    # -- Network protocol -------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._ident.peer_id

    def now(self) -> float:
        return time.time()

    def connected_peers(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_connected_peers()}

    def known_peers(self) -> set[str]:
        """Connected or routable peers whose hello showed them to be nodes of our network.

        A peer the DHT told us of is asked for its hello in the background (it shows up here
        once that succeeds, and leaves the routing table if it fails).
        """
        routing = {p.to_base58() for p in self.dht.routing_table.get_peer_ids()}
        candidates = (routing | self.connected_peers()) - {self.peer_id}
        verified = self.hello_gate.verified
        for peer_id in candidates - verified.keys():
            self.hello_gate.in_background(peer_id)
        return candidates & verified.keys()

    def is_verified(self, peer_id: str) -> bool:
        return peer_id in self.hello_gate.verified

    def refused_peers(self) -> dict[str, str]:
        """Peers refused at the hello lately (another network, no gridmesh node), and why."""
        return self.hello_gate.refused()

    @property
    def stream_errors(self) -> int:
        """Stream handlers that raised (their streams were reset and counted)."""
        return self._guard.errors

    async def dht_put(self, key: str, value: bytes) -> None:
        await self._dht_ops.put(self.scope.dht_key(key), value)

    async def dht_get(self, key: str) -> bytes | None:
        return await self._dht_ops.get(self.scope.dht_key(key))

    async def dht_get_from(self, peer_id: str, key: str) -> bytes | None:
        return await self._dht_ops.get_from(peer_id, self.scope.dht_key(key))

    async def dht_find_peers(self, target: bytes) -> list[str]:
        return await self._dht_ops.find_peers(target)

    async def request(
        self, peer_id: str, protocol: str, payload: bytes, *, timeout_s: float | None = None
    ) -> bytes:
        protocol = self.scope.protocol(protocol)
        timeout_s = timeout_s or self._request_timeout_s
        try:
            with trio.fail_after(timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer_id), [protocol])
                try:
                    await write_frame(stream, payload)
                    response = await read_frame(stream)
                    self.dark.heard(peer_id)
                finally:
                    await stream.close()
                return response
        except trio.TooSlowError:
            if timeout_s >= DARK_MIN_WAIT_S:
                self.dark.suspect(peer_id, self._nursery)  # a dark connection is dropped
            raise NetworkError(f"request {protocol} to {peer_id} timed out") from None
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"request {protocol} to {peer_id} failed: {exc!r}") from exc

    def set_request_handler(
        self, protocol: str, handler: RequestHandler, *, timeout_s: float | None = None
    ) -> None:
        async def serve(stream: Any) -> None:
            sender = stream.muxed_conn.peer_id.to_base58()
            with trio.fail_after(timeout_s or self._request_timeout_s):
                request = await read_frame(stream)
                self.dark.heard(sender)
                await write_frame(stream, await handler(sender, request))
            await stream.close()

        self.host.set_stream_handler(self.scope.protocol(protocol), serve)  # type: ignore[arg-type]
        self.guard_handlers()

    async def open_stream(
        self,
        peer_id: str,
        protocol: str,
        max_frame_bytes: FrameBound = MAX_STREAM_FRAME_BYTES,
        *,
        frame_deadline_s: float | None = None,
        min_bytes_per_s: float | None = None,
    ) -> FramedStream:
        """A framed stream to `peer_id` (see `FramedStream` for the bounds on its frames;
        the deadline defaults to FRAME_DEADLINE_S plus the length at FRAME_MIN_BYTES_PER_S)."""
        protocol = self.scope.protocol(protocol)
        try:
            with trio.fail_after(self._request_timeout_s):
                raw = await self.host.new_stream(ID.from_base58(peer_id), [protocol])
        except trio.TooSlowError:
            raise NetworkError(f"opening {protocol} to {peer_id} timed out") from None
        except Exception as exc:
            raise NetworkError(f"opening {protocol} to {peer_id} failed: {exc!r}") from exc
        return self._framed(raw, peer_id, max_frame_bytes, frame_deadline_s, min_bytes_per_s)

    def set_stream_handler(
        self,
        protocol: str,
        handler: StreamHandler,
        max_frame_bytes: FrameBound = MAX_STREAM_FRAME_BYTES,
        *,
        frame_deadline_s: float | None = None,
        min_bytes_per_s: float | None = None,
    ) -> None:
        """Serve `protocol`'s streams with `handler`; `max_frame_bytes` may be a function,
        asked as each frame begins (so a stream opened earlier gets today's bound)."""

        async def serve(raw: Any) -> None:
            peer = raw.muxed_conn.peer_id.to_base58()
            stream = self._framed(raw, peer, max_frame_bytes, frame_deadline_s, min_bytes_per_s)
            try:
                await handler(stream)
            finally:
                await stream.close()

        self.host.set_stream_handler(self.scope.protocol(protocol), serve)  # type: ignore[arg-type]
        self.guard_handlers()

    def _framed(
        self,
        raw: Any,
        peer_id: str,
        max_frame_bytes: FrameBound,
        frame_deadline_s: float | None,
        min_bytes_per_s: float | None,
    ) -> FramedStream:
        return FramedStream(
            raw,
            peer_id,
            max_frame_bytes,
            on_reject=self._on_reject,
            on_frame=self.dark.heard,
            on_garbage=lambda peer: self.bans.penalize(peer, "malformed"),
            frame_deadline_s=FRAME_DEADLINE_S if frame_deadline_s is None else frame_deadline_s,
            min_bytes_per_s=min_bytes_per_s or FRAME_MIN_BYTES_PER_S,
        )

    # -- connections ------------------------------------------------------------------

    def listen_addrs(self) -> list[str]:
        """Full multiaddrs ending in /p2p/<peer id>."""
        suffix = f"/p2p/{self.peer_id}"
        out = []
        for addr in self.host.get_addrs():
            text = str(addr)
            out.append(text if text.endswith(suffix) else text + suffix)
        return out

    async def connect(self, addr: str, timeout_s: float = 10.0) -> str:
        """Dial exactly `addr`, check the peer's hello, add it to the DHT; returns its peer id.

        Raises NetworkError when nothing answers at that address (even if the peer is
        connected elsewhere), when it is this node, or when its hello is missing or names
        another network.
        """
        try:
            target = multiaddr.Multiaddr(addr)
            info = info_from_p2p_addr(target)
        except Exception as exc:
            raise NetworkError(f"not a multiaddr with /p2p/<peer id>: {addr[:200]}") from exc
        peer_id = info.peer_id.to_base58()
        if peer_id == self.peer_id:
            raise NetworkError("refusing to connect to myself")
        if any(self._is_own_addr(a) for a in info.addrs):
            raise NetworkError(f"refusing to connect to {addr}: that is this node's own address")
        try:
            with trio.fail_after(timeout_s):
                # dial this very address: host.connect() would return at once for a peer that
                # is connected through another address, and so "connect" to a dead port
                self.addr_guard.trusted_add(info.peer_id, info.addrs, 3600)  # our word
                await self.reach.dial(target, info)  # /dns4/... resolved now, relayed too
                await self.hello_gate.ensure_verified(peer_id)
                await self.dht.add_peer(info.peer_id)
        except NetworkError:
            raise
        except trio.TooSlowError:
            raise NetworkError(f"connecting to {addr} timed out after {timeout_s} s") from None
        except Exception as exc:
            raise NetworkError(f"connecting to {addr} failed: {describe_error(exc)}") from None
        peer = self.peers.setdefault(peer_id, PeerState(peer_id))
        peer.addrs = [str(a) for a in info.addrs]
        peer.last_seen = time.time()
        return peer.peer_id

    def _advertised_addrs(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """What identify and our records announce: dialable addresses on our listen ports."""
        return on_listen_ports(candidates, self.host.get_transport_addrs())

    def _is_own_addr(self, addr: multiaddr.Multiaddr) -> bool:
        """True when `addr` is one of our own TCP listeners (dialling it reaches ourselves)."""
        return is_own_addr(addr, self.host.get_transport_addrs())

    def _on_ban(self, peer_id: str) -> None:
        """A peer kept breaking our limits (p2p.bans): count it and close its connections."""
        self._on_reject("peer", "banned")
        log.warning(
            "peer %s banned for %.0f s: over its limits (%s)",
            peer_id,
            self.limits.ban_s,
            self.bans.last_why,
        )
        self._drop_in_background(peer_id)

    def refuse_banned(self, peer_id: str) -> None:
        """A banned peer connected (or we dialled it): count it and close the connection."""
        self._on_reject("connection", "banned")
        self._drop_in_background(peer_id)

    def _start_soon(self, task: Callable[[], Awaitable[None]]) -> bool:
        if self._nursery is None:
            return False
        self._nursery.start_soon(task)
        return True

    def _drop_in_background(self, peer_id: str) -> None:
        if self._nursery is not None:  # called from sync code
            self._nursery.start_soon(self._drop_peer, peer_id)

    async def _drop_peer(self, peer_id: str) -> None:
        with contextlib.suppress(Exception):
            self.dht.routing_table.remove_peer(ID.from_base58(peer_id))
        with contextlib.suppress(Exception):
            await self.host.disconnect(ID.from_base58(peer_id))

    async def ping(self, peer_id: str) -> float:
        """Round-trip time to a connected peer in milliseconds."""
        started = time.perf_counter()
        with trio.fail_after(PING_TIMEOUT_S):
            await self._pinger.ping(ID.from_base58(peer_id))
        return (time.perf_counter() - started) * 1000

    def heard_at(self, peer_id: str) -> float | None:
        return self.dark.heard_at(peer_id)

    def peer_addrs(self, peer_id: str) -> list[str]:
        try:
            return [str(a) for a in self.host.get_peerstore().addrs(ID.from_base58(peer_id))]
        except Exception:
            return []

    async def track_peers(self, interval_s: float) -> None:
        """Keep `peers` current: who is connected or routable, and their measured RTT."""
        await track_peers(self, interval_s, self.dark.drop_frozen)  # counted (/metrics)

    async def keep_connected(
        self,
        addr: str,
        min_s: float,
        max_s: float,
        on_connected: Callable[[str], None] | None = None,
    ) -> None:
        """Bootstrap: connect to `addr` and reconnect with exponential backoff whenever lost."""
        try:
            target = info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id.to_base58()
        except Exception:
            log.error("ignoring bootstrap address without /p2p/<peer id>: %s", addr)
            return
        await keep_connected(self, addr, target, min_s, max_s, on_connected)

    # -- guard ------------------------------------------------------------------------

    def guard_handlers(self) -> None:
        """Wrap every registered stream handler so that no bad stream can kill the host."""
        self._guard.guard_all(self.host.get_mux().handlers)

    # -- lifecycle --------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        topic = self.scope.topic(topic)
        try:
            await self.pubsub.publish(topic, data)
        except Exception as exc:
            raise NetworkError(f"publishing on {topic} failed: {exc!r}") from exc

    async def subscribe(
        self, topic: str, handler: GossipHandler, validator: GossipValidator | None = None
    ) -> None:
        if self._nursery is None:
            raise NetworkError("subscribe() needs a running network")
        topic = self.scope.topic(topic)
        if validator is not None:  # before the subscription, so that nothing slips past it
            self.gossip_validators.add(topic, validator)
        subscription = await self.pubsub.subscribe(topic)
        self._nursery.start_soon(self._read_topic, topic, subscription, handler)

    async def _read_topic(self, topic: str, subscription: Any, handler: GossipHandler) -> None:
        while True:
            message = await subscription.get()
            try:
                sender = ID(message.from_id).to_base58()
                if sender != self.peer_id:
                    await handler(sender, message.data)
            except Exception as exc:  # one bad message must not end the subscription
                self._on_reject("pubsub", reason_of(exc))
                log.debug("gossip handler for %s failed: %r", topic, exc)

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Libp2pNetwork]:
        check_listen_free(self._listen)
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.host.run(self._listen))
            except Exception as exc:  # py-libp2p raises ExceptionGroups from its nurseries
                where = ", ".join(str(a) for a in self._listen)
                raise ListenError(f"cannot listen on {where}: {describe_error(exc)}") from None
            if not self.host.get_transport_addrs():  # py-libp2p may fail to bind silently
                where = ", ".join(str(a) for a in self._listen)
                raise ListenError(f"cannot listen on {where}: no address could be bound")
            # pubsub must run before the first dial, or links become one-way
            await stack.enter_async_context(background_trio_service(self.pubsub))
            await self.pubsub.wait_until_ready()
            await stack.enter_async_context(background_trio_service(self.dht))
            await stack.enter_async_context(self.reach.running())  # before the guard (below)
            self.set_request_handler(HELLO_PROTOCOL, self.hello_gate.answer)
            self._nursery = await stack.enter_async_context(trio.open_nursery())
            self.hello_gate.nursery = self._nursery
            try:
                yield self
            finally:
                self._nursery.cancel_scope.cancel()
                await self._close_connections()

    async def _close_connections(self) -> None:
        """py-libp2p leaves connections open when a host stops: peers would see us alive."""
        with trio.move_on_after(1) as scope:
            scope.shield = True
            for peer in list(self.host.get_connected_peers()):
                with contextlib.suppress(Exception):
                    await self.host.disconnect(peer)
