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
- libp2p's loggers do not propagate: `quiet_libp2p_logs` attaches our own handler.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import ipaddress
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INotifee
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
from libp2p.host.ping import PingService
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network import swarm as _swarm
from libp2p.network.config import RetryConfig
from libp2p.network.stream.exceptions import StreamEOF as _Libp2pStreamEOF
from libp2p.network.stream.exceptions import StreamReset as _Libp2pStreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub import pubsub as _pubsub_module
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub, signature_validator
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from p2p import codec, identity, localsock
from p2p.network import (
    MAX_STREAM_FRAME_BYTES,
    DHTValidator,
    FrameBound,
    GossipHandler,
    NetworkError,
    PeerState,
    RequestHandler,
    StreamClosed,
    StreamHandler,
    StreamReset,
)

_swarm._HAPPY_EYEBALLS_DELAY = 0  # type: ignore[attr-defined]
# py-libp2p drops gossip silently once a subscription's queue (32) is full; ours is larger and
# every drop is counted (see `_harden_pubsub`)
_pubsub_module.SUBSCRIPTION_CHANNEL_SIZE = 256  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4 << 20
PING_TIMEOUT_S = 2.0
MAX_MISSED_PINGS = 3
FROZEN_AFTER_S = 20.0
HELLO_PROTOCOL = "/gridmesh/hello/1.0.0"
HELLO_TYPE = "hello"
MAX_HELLO_BYTES = 4096
HELLO_RETRY_S = 30.0
CLOSED_POLL_S = 2.0  # how often an inbound connection's socket is checked for being closed
_LEN = struct.Struct(">I")
# (source, reason) -> None: the daemon counts rejected input in /metrics
RejectHook = Callable[[str, str], None]
# (op, outcome, seconds) -> None
DHTObserver = Callable[[str, str, float], None]


class ListenError(NetworkError):
    """This node cannot listen where it was told to (the message names the address)."""


@dataclass(frozen=True)
class HostLimits:
    """Per-peer limits of the host (configured under `[p2p]`; README "Limits and quotas").

    Over a limit, a stream is reset and a gossip message dropped, and both are counted.
    """

    streams_per_s: float = 200.0  # new inbound streams per peer and protocol
    stream_burst: int = 400
    gossip_per_s: float = 200.0  # gossip messages per forwarding peer
    gossip_burst: int = 400
    gossip_bytes_per_s: int = 4 << 20  # gossip bytes per forwarding peer
    gossip_bytes_burst: int = 8 << 20
    max_gossip_bytes: int = 1 << 20
    hello_timeout_s: float = 5.0  # how long a peer's streams wait for its hello
    seen_ttl_s: int = 30  # how long gossip message ids are remembered (py-libp2p: 120)
    max_tracked_peers: int = 4096  # verified peers and rate-limit buckets remembered
    max_connections_per_ip: int = 64  # inbound connections open at once from one IP


class HelloBody(msgspec.Struct, frozen=True):
    """The signed hello's body: which gridmesh network the sender belongs to."""

    network_id: Annotated[str, msgspec.Meta(max_length=128)]


class RateLimiter:
    """Token buckets by key (peer, or peer and protocol), the least recently used forgotten."""

    def __init__(
        self,
        rate: float,
        burst: int,
        max_keys: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._rate, self._burst, self._max = rate, float(burst), max_keys
        self._clock = clock
        self._buckets: OrderedDict[Any, tuple[float, float]] = OrderedDict()

    def allow(self, key: Any, cost: float = 1.0) -> bool:
        now = self._clock()
        tokens, last = self._buckets.pop(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - last) * self._rate)
        allowed = tokens >= cost
        self._buckets[key] = (tokens - cost if allowed else tokens, now)
        while len(self._buckets) > self._max:
            self._buckets.popitem(last=False)
        return allowed


def quiet_libp2p_logs(level: int = logging.ERROR) -> None:
    """py-libp2p's loggers don't propagate and warn on every odd stream: give them our handler."""
    root = logging.getLogger("libp2p")
    root.handlers.clear()
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(level)  # some libp2p modules set their own, lower levels
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False


class _ValidatorBridge(Validator):
    """Adapts our `DHTValidator` to py-libp2p's `Validator` base class."""

    def __init__(self, inner: DHTValidator, on_reject: RejectHook) -> None:
        self._inner = inner
        self._on_reject = on_reject

    def validate(self, key: str, value: bytes) -> None:
        try:
            self._inner.validate(key, value)
        except Exception as exc:
            # our validator counts what it refuses, except expired copies (normal on reads
            # of its local store); here they came from the DHT, so they are counted too
            if getattr(exc, "reason", None) == "stale":
                self._on_reject("dht", "stale")
            exc._gridmesh_counted = True  # type: ignore[attr-defined]
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


# set while an inbound DHT stream is served: whether its refusal was counted already
_DHT_REFUSAL: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "gridmesh_dht_refusal", default=None
)
DHT_PROTOCOL = "/ipfs/kad/1.0.0"


class _ResetCountingStream:
    """A libp2p stream whose reset by KadDHT's handler counts as a refused message.

    KadDHT refuses many things before (or instead of) asking our validator: bad signed peer
    records, mismatched or empty keys, oversized records, a full inbound limiter. It resets
    the stream for each, silently; this proxy counts the resets the validator did not count.
    """

    def __init__(
        self,
        stream: Any,
        cell: list[bool],
        on_reject: RejectHook,
        allow_message: Callable[[], bool],
    ) -> None:
        self._stream = stream
        self._cell = cell
        self._on_reject = on_reject
        self._allow_message = allow_message
        self._broken = False
        # where we are in KadDHT's varint-prefixed messages, to limit them per peer however
        # many a peer sends on one stream
        self._prefix: list[int] = []
        self._body_left = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def read(self, n: int | None = None) -> bytes:
        starts_message = not self._prefix and not self._body_left
        try:
            data = await self._stream.read(n)
        except Exception:
            # the peer reset or dropped the stream (an honest querier that got its answer
            # elsewhere does): KadDHT resets it in turn, which is no refusal of ours
            self._broken = True
            raise
        if data and starts_message and not self._allow_message():
            self._cell[0] = True
            self._on_reject("dht", "rate_limited")
            raise NetworkError("DHT messages over this peer's rate limit")
        self._track(data)
        return data

    def _track(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._body_left:
                step = min(self._body_left, len(view))
                self._body_left -= step
                view = view[step:]
                continue
            byte = view[0]
            view = view[1:]
            self._prefix.append(byte)
            if not byte & 0x80 or len(self._prefix) >= 10:
                self._body_left = sum((b & 0x7F) << (7 * i) for i, b in enumerate(self._prefix))
                self._prefix = []

    async def reset(self) -> None:
        if not self._cell[0] and not self._broken:
            self._cell[0] = True
            self._on_reject("dht", "refused")
        await self._stream.reset()


class _CountingValidator(NamespacedValidator):
    """A strict `NamespacedValidator` that counts every refusal, foreign keys included."""

    def __init__(self, validators: dict[str, Validator], on_reject: RejectHook) -> None:
        super().__init__(validators, strict_validation=True)
        self._on_reject = on_reject

    def validate(self, key: str, value: bytes) -> None:
        try:
            super().validate(key, value)
        except Exception as exc:
            if not getattr(exc, "_gridmesh_counted", False):
                self._on_reject("dht", "foreign_key")
            cell = _DHT_REFUSAL.get()
            if cell is not None:
                cell[0] = True
            raise


# A frame that has begun must finish within FRAME_DEADLINE_S plus its length at
# FRAME_MIN_BYTES_PER_S: the rule of the local socket (p2p.localsock), for libp2p streams too.
FRAME_DEADLINE_S = localsock.FRAME_TIMEOUT_S
FRAME_MIN_BYTES_PER_S = localsock.FRAME_BYTES_PER_S


class FrameDeadlineError(NetworkError):
    """A frame began but did not finish within its deadline (a trickling or stalled peer)."""

    reason = "frame_deadline"


frame_time_limit_s = localsock.frame_time_limit_s


async def read_frame(
    stream: Any,
    max_bytes: FrameBound = MAX_FRAME_BYTES,
    *,
    deadline_s: float = FRAME_DEADLINE_S,
    min_bytes_per_s: float = FRAME_MIN_BYTES_PER_S,
) -> bytes:
    """The next length-prefixed frame: at most `max_bytes` (refused from its prefix), and
    finished within `frame_time_limit_s(length)` of its first byte, else FrameDeadlineError.

    Waiting for a frame's first byte is not bounded here (idle streams are the caller's
    business); once a peer has begun a frame it cannot hold the read, and the bytes buffered
    so far, open by trickling or stopping.
    """
    head = await stream.read(_LEN.size)  # returns what has arrived: 1 to 4 bytes
    if not head:
        raise StreamClosed("stream closed")
    begun = trio.current_time()
    limit = max_bytes() if callable(max_bytes) else max_bytes  # what we take may have changed
    with trio.move_on_at(begun + deadline_s) as scope:
        if len(head) < _LEN.size:
            head += await _read_exactly(stream, _LEN.size - len(head))
        (length,) = _LEN.unpack(head)
        if length > limit:
            raise NetworkError(f"frame of {length} bytes exceeds the limit of {limit}")
        scope.deadline = begun + frame_time_limit_s(length, deadline_s, min_bytes_per_s)
        return await _read_exactly(stream, length)
    waited = trio.current_time() - begun
    raise FrameDeadlineError(f"a frame was not finished within {waited:.1f} s of its first byte")


async def write_frame(stream: Any, payload: bytes) -> None:
    if len(payload) > MAX_FRAME_BYTES:
        raise NetworkError(f"frame of {len(payload)} bytes exceeds the limit")
    await stream.write(_LEN.pack(len(payload)) + payload)


async def _read_exactly(stream: Any, n: int) -> bytes:
    chunks, remaining = [], n
    while remaining:
        chunk = await stream.read(remaining)
        if not chunk:
            raise NetworkError("stream closed mid-frame")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


class _ForgetDisconnected(INotifee):
    """Drop a peer from the DHT routing table when its last connection closes.

    py-libp2p keeps dead peers in the routing table, and every lookup then spends seconds
    dialling them (the "ghost node" problem exo users report). A live peer that comes back
    reconnects and is added again on its first exchange with us.
    """

    def __init__(self, owner: Libp2pNetwork) -> None:
        self._owner = owner

    async def disconnected(self, network: Any, conn: Any) -> None:
        peer = conn.muxed_conn.peer_id
        if not network.get_connections(peer):
            self._owner.dht.routing_table.remove_peer(peer)
            self._owner.peers.pop(peer.to_base58(), None)
            self._owner._forget_unverified(peer.to_base58())

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        # every connection, inbound or dialled by the DHT, gets a hello: until one is valid
        # the peer is served nothing else (see `Libp2pNetwork._guarded`)
        self._owner._hello_in_background(conn.muxed_conn.peer_id.to_base58())

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


class FramedStream:
    """A libp2p stream carrying length-prefixed frames (the `p2p.network.Stream` protocol).

    Each frame is bounded by `max_frame_bytes` (asked per frame when it is a function) and
    must finish within `frame_time_limit_s` of its first byte: a stream whose peer misses
    that is reset and counted (`stream`/`frame_deadline` on the reject hook).
    """

    def __init__(
        self,
        stream: Any,
        peer_id: str,
        max_frame_bytes: FrameBound,
        *,
        on_reject: RejectHook | None = None,
        frame_deadline_s: float = FRAME_DEADLINE_S,
        min_bytes_per_s: float = FRAME_MIN_BYTES_PER_S,
    ) -> None:
        self._stream = stream
        self._max = max_frame_bytes
        self._on_reject = on_reject or (lambda source, reason: None)
        self._deadline_s = frame_deadline_s
        self._min_bytes_per_s = min_bytes_per_s
        self.peer_id = peer_id

    async def send(self, frame: bytes) -> None:
        try:
            await self._stream.write(_LEN.pack(len(frame)) + frame)
        except Exception as exc:
            raise NetworkError(f"stream to {self.peer_id} broke: {exc!r}") from exc

    async def receive(self) -> bytes:
        try:
            return await read_frame(
                self._stream,
                self._max,
                deadline_s=self._deadline_s,
                min_bytes_per_s=self._min_bytes_per_s,
            )
        except FrameDeadlineError as exc:
            self._on_reject("stream", exc.reason)
            await self.reset()
            error = FrameDeadlineError(f"stream from {self.peer_id}: {exc}")
            error._gridmesh_counted = True  # type: ignore[attr-defined]  # the guard: not again
            raise error from None
        except NetworkError:
            raise
        except _Libp2pStreamEOF:
            raise StreamClosed(f"stream from {self.peer_id} ended") from None
        except _Libp2pStreamReset:
            raise StreamReset(f"stream from {self.peer_id} was reset") from None
        except Exception as exc:
            raise NetworkError(f"stream from {self.peer_id} broke: {exc!r}") from exc

    async def close_write(self) -> None:
        """Half-close (a yamux FIN): the peer reads to the end; we may still receive."""
        with contextlib.suppress(Exception):
            await self._stream.close_write()

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.close()

    async def reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.reset()


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
    ) -> None:
        self._ident = ident
        self.network_id = network_id
        self.limits = limits or HostLimits()
        self._on_reject = on_reject or (lambda source, reason: None)
        try:
            self._listen = [multiaddr.Multiaddr(a) for a in listen]
        except Exception as exc:
            raise ListenError(f"not a listen multiaddr: {str(listen)[:200]} ({exc})") from None
        key_pair = create_new_key_pair(ident.node_seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_preference="YAMUX",
        )
        # advertise only addresses a peer can dial: 0.0.0.0 becomes this host's addresses
        self.host._addrs_factory = self._advertised_addrs  # type: ignore[attr-defined]
        self.dht = KadDHT(
            self.host,
            DHTMode.SERVER,
            validator=_CountingValidator(
                {dht_namespace: _ValidatorBridge(dht_validator, self._on_reject)},
                self._on_reject,
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
        self._ping = PingService(self.host)
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
        )
        self.pubsub = Pubsub(
            self.host,
            self.gossipsub,
            seen_ttl=self.limits.seen_ttl_s,
            sweep_interval=max(1, min(10, self.limits.seen_ttl_s)),
        )
        self._harden_pubsub()
        self._harden_inbound()
        self._nursery: trio.Nursery | None = None
        self.host.get_network().register_notifee(_ForgetDisconnected(self))
        self._dht_validator = dht_validator
        self._dht_timeout_s = dht_timeout_s
        self._request_timeout_s = request_timeout_s
        self._on_dht_op = on_dht_op or (lambda op, outcome, seconds: None)
        self.peers: dict[str, PeerState] = {}
        self.stream_errors = 0
        limits = self.limits
        self._stream_limiter = RateLimiter(
            limits.streams_per_s, limits.stream_burst, limits.max_tracked_peers * 4
        )
        self._gossip_limiter = RateLimiter(
            limits.gossip_per_s, limits.gossip_burst, limits.max_tracked_peers
        )
        self._gossip_bytes = RateLimiter(
            limits.gossip_bytes_per_s, limits.gossip_bytes_burst, limits.max_tracked_peers
        )
        # peers whose signed hello named our network (by peer id: Noise authenticates it)
        self._verified: OrderedDict[str, None] = OrderedDict()
        # set when a peer's hello check ends; waited on by its streams
        self._hello_done: dict[str, trio.Event] = {}
        self._hello_inflight: set[str] = set()
        # peer id -> (when, why) its last hello failed: told to a waiting dial, and no hello
        # in the background is tried again for HELLO_RETRY_S
        self._hello_failures: OrderedDict[str, tuple[float, str]] = OrderedDict()

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
        for peer_id in candidates - self._verified.keys():
            self._hello_in_background(peer_id)
        return candidates & self._verified.keys()

    def is_verified(self, peer_id: str) -> bool:
        return peer_id in self._verified

    async def dht_put(self, key: str, value: bytes) -> None:
        await self._timed_dht("put", self.dht.put_value(key, value))

    async def dht_get(self, key: str) -> bytes | None:
        # py-libp2p answers from its local store without re-validating: an expired copy would
        # hide the fresh one on the network for the store's 24 h TTL. Drop it and ask around.
        local = self.dht.value_store.get(key.encode())
        if local is not None:
            try:
                self._dht_validator.validate(key, local.value)
            except Exception:
                self.dht.value_store.remove(key.encode())
        return await self._timed_dht("get", self.dht.get_value(key))

    async def _timed_dht(self, op: str, call: Awaitable[Any]) -> Any:
        started = trio.current_time()
        outcome = "error"
        try:
            with trio.fail_after(self._dht_timeout_s):
                result = await call
            outcome = "ok"
            return result
        except trio.TooSlowError:
            outcome = "timeout"
            raise NetworkError(f"DHT {op} took longer than {self._dht_timeout_s} s") from None
        finally:
            self._on_dht_op(op, outcome, trio.current_time() - started)

    async def request(
        self, peer_id: str, protocol: str, payload: bytes, *, timeout_s: float | None = None
    ) -> bytes:
        try:
            with trio.fail_after(timeout_s or self._request_timeout_s):
                stream = await self.host.new_stream(ID.from_base58(peer_id), [protocol])
                try:
                    await write_frame(stream, payload)
                    response = await read_frame(stream)
                finally:
                    await stream.close()
                return response
        except trio.TooSlowError:
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
                await write_frame(stream, await handler(sender, request))
            await stream.close()

        self.host.set_stream_handler(protocol, serve)  # type: ignore[arg-type]
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

        self.host.set_stream_handler(protocol, serve)  # type: ignore[arg-type]
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
                self.host.get_peerstore().add_addrs(info.peer_id, info.addrs, 3600)
                await self.host.get_network().dial_addr(info.addrs[0], info.peer_id)  # type: ignore[attr-defined]
                await self._ensure_verified(peer_id)
                await self.dht.add_peer(info.peer_id)
        except NetworkError:
            raise
        except trio.TooSlowError:
            raise NetworkError(f"connecting to {addr} timed out after {timeout_s} s") from None
        except Exception as exc:
            raise NetworkError(f"connecting to {addr} failed: {_describe(exc)}") from None
        peer = self.peers.setdefault(peer_id, PeerState(peer_id))
        peer.addrs = [str(a) for a in info.addrs]
        peer.last_seen = time.time()
        return peer.peer_id

    def _advertised_addrs(self, candidates: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
        """What identify and our records announce: dialable addresses on our listen ports.

        Observed addresses on other ports (the ephemeral ports of our own dials) are left out.
        """
        ports = set()
        for own in self.host.get_transport_addrs():
            with contextlib.suppress(ValueError):
                ports.add(_ip_and_port(own)[1])
        kept = []
        for addr in _dialable_addrs(candidates):
            try:
                port = _ip_and_port(addr)[1]
            except ValueError:
                kept.append(addr)
                continue
            if port in ports:
                kept.append(addr)
        return kept

    def _is_own_addr(self, addr: multiaddr.Multiaddr) -> bool:
        """True when `addr` is one of our own TCP listeners (dialling it reaches ourselves)."""
        try:
            host, port = _ip_and_port(addr)
        except ValueError:
            return False
        for own in self.host.get_transport_addrs():
            try:
                own_host, own_port = _ip_and_port(own)
            except ValueError:
                continue
            if port != own_port:
                continue
            if own_host == host or (
                ipaddress.ip_address(own_host).is_unspecified and _is_local_ip(host)
            ):
                return True
        return False

    # -- the hello: which network a peer belongs to -----------------------------------

    def _hello(self) -> bytes:
        body = {"network_id": self.network_id}
        return codec.seal(self._ident, HELLO_TYPE, body, timestamp=self.now()).to_wire()

    async def _answer_hello(self, sender: str, payload: bytes) -> bytes:
        try:
            theirs = open_hello(payload, sender)
        except codec.CodecError as exc:
            self._on_reject("hello", exc.reason)
            exc._gridmesh_counted = True  # type: ignore[attr-defined]
            raise
        if theirs == self.network_id:
            self._mark_verified(sender)
        else:
            self._on_reject("hello", "wrong_network")
        # answered either way, so that the dialler can tell its user which network we are on
        return self._hello()

    async def _check_hello(self, peer_id: str) -> None:
        """Refuse a peer of another gridmesh network (or one that is no gridmesh node)."""
        try:
            reply = await self.request(
                peer_id, HELLO_PROTOCOL, self._hello(), timeout_s=self.limits.hello_timeout_s
            )
            theirs = open_hello(reply, peer_id)
        except (NetworkError, codec.CodecError) as exc:
            self._on_reject("hello", getattr(exc, "reason", "no_hello"))
            await self._drop_peer(peer_id)
            raise NetworkError(f"peer {peer_id} failed the gridmesh handshake: {exc}") from None
        if theirs != self.network_id:
            self._on_reject("hello", "wrong_network")
            await self._drop_peer(peer_id)
            raise NetworkError(
                f"peer {peer_id} is on network {theirs[:64]!r}, not {self.network_id!r}"
            )
        self._mark_verified(peer_id)

    async def _ensure_verified(self, peer_id: str) -> None:
        """Check the peer's hello unless done already or under way (then wait for that one)."""
        if peer_id in self._verified:
            return
        if peer_id in self._hello_inflight:
            done = self._hello_done.setdefault(peer_id, trio.Event())
            with trio.move_on_after(self.limits.hello_timeout_s + 1):
                await done.wait()
            if peer_id not in self._verified:
                raise NetworkError(
                    self._hello_failures.get(peer_id, (0.0, f"peer {peer_id} failed the hello"))[1]
                )
            return
        self._hello_inflight.add(peer_id)
        try:
            await self._check_hello(peer_id)
        except NetworkError as exc:
            self._hello_failures[peer_id] = (time.monotonic(), str(exc))
            while len(self._hello_failures) > self.limits.max_tracked_peers:
                self._hello_failures.popitem(last=False)
            raise
        finally:
            self._hello_inflight.discard(peer_id)
            if peer_id not in self._verified:
                self._hello_done.pop(peer_id, trio.Event()).set()

    def _hello_in_background(self, peer_id: str) -> None:
        if peer_id in self._verified or peer_id in self._hello_inflight or self._nursery is None:
            return
        failed_at = self._hello_failures.get(peer_id, (-HELLO_RETRY_S, ""))[0]
        if time.monotonic() - failed_at < HELLO_RETRY_S:
            return  # a peer the DHT keeps telling us of is not dialled in a loop
        self._nursery.start_soon(self._background_hello, peer_id)

    async def _background_hello(self, peer_id: str) -> None:
        try:
            await self._ensure_verified(peer_id)
        except NetworkError as exc:  # counted by _check_hello
            log.info("%s", exc)

    def _mark_verified(self, peer_id: str) -> None:
        self._hello_failures.pop(peer_id, None)
        self._verified[peer_id] = None
        self._verified.move_to_end(peer_id)
        if len(self._verified) > self.limits.max_tracked_peers:
            connected = self.connected_peers()
            for old in list(self._verified):
                if len(self._verified) <= self.limits.max_tracked_peers:
                    break
                if old not in connected:
                    del self._verified[old]
        self._hello_done.setdefault(peer_id, trio.Event()).set()

    def _forget_unverified(self, peer_id: str) -> None:
        if peer_id not in self._verified and peer_id not in self._hello_inflight:
            self._hello_done.pop(peer_id, None)

    async def _wait_verified(self, peer_id: str) -> bool:
        if peer_id in self._verified:
            return True
        done = self._hello_done.setdefault(peer_id, trio.Event())
        with trio.move_on_after(self.limits.hello_timeout_s):
            await done.wait()
        return peer_id in self._verified

    async def _drop_peer(self, peer_id: str) -> None:
        with contextlib.suppress(Exception):
            self.dht.routing_table.remove_peer(ID.from_base58(peer_id))
        with contextlib.suppress(Exception):
            await self.host.disconnect(ID.from_base58(peer_id))

    async def ping(self, peer_id: str) -> float:
        """Round-trip time to a connected peer in milliseconds."""
        started = time.perf_counter()
        with trio.fail_after(PING_TIMEOUT_S):
            await self._ping.ping(ID.from_base58(peer_id), 1)
        return (time.perf_counter() - started) * 1000

    def peer_addrs(self, peer_id: str) -> list[str]:
        try:
            return [str(a) for a in self.host.get_peerstore().addrs(ID.from_base58(peer_id))]
        except Exception:
            return []

    async def track_peers(self, interval_s: float) -> None:
        """Keep `peers` current: who is connected or routable, and their measured RTT."""
        while True:
            connected = self.connected_peers()
            for peer_id in self.known_peers():
                state = self.peers.setdefault(peer_id, PeerState(peer_id))
                state.addrs = self.peer_addrs(peer_id) or state.addrs
                if peer_id in connected:
                    try:
                        state.rtt_ms = await self.ping(peer_id)
                        state.last_seen = time.time()
                        state.missed_pings = 0
                    except Exception:
                        # connected but silent: a frozen or half-closed peer. Drop it so that
                        # lookups stop waiting on it; a live peer reconnects on its own.
                        state.rtt_ms = None
                        state.missed_pings += 1
                        silent_s = time.time() - (state.last_seen or time.time())
                        # a busy peer (a long import holding the GIL) misses a few pings;
                        # only one silent for a long time is taken for frozen
                        if state.missed_pings >= MAX_MISSED_PINGS and silent_s >= FROZEN_AFTER_S:
                            log.info("peer %s does not answer pings; disconnecting", peer_id)
                            with contextlib.suppress(Exception):
                                await self.host.disconnect(ID.from_base58(peer_id))
            await trio.sleep(interval_s)

    async def keep_connected(
        self,
        addr: str,
        min_s: float,
        max_s: float,
        on_connected: Callable[[str], None] | None = None,
    ) -> None:
        """Bootstrap: connect to `addr` and reconnect with exponential backoff whenever lost."""
        delay = min_s
        try:
            target = info_from_p2p_addr(multiaddr.Multiaddr(addr)).peer_id.to_base58()
        except Exception:
            log.error("ignoring bootstrap address without /p2p/<peer id>: %s", addr)
            return
        while True:
            if target not in self.connected_peers():
                try:
                    await self.connect(addr)
                    log.info("connected to bootstrap %s", addr)
                    delay = min_s
                    if on_connected is not None:
                        on_connected(target)
                except NetworkError as exc:
                    log.info("bootstrap %s unreachable (%s); retry in %.1f s", addr, exc, delay)
                    await trio.sleep(delay)
                    delay = min(delay * 2, max_s)
                    continue
            await trio.sleep(min_s)

    # -- guard ------------------------------------------------------------------------

    def guard_handlers(self) -> None:
        """Wrap every registered stream handler so that no bad stream can kill the host."""
        handlers = self.host.get_mux().handlers
        for protocol, handler in list(handlers.items()):
            if handler is None or getattr(handler, "_gridmesh_guarded", False):
                continue
            handlers[protocol] = self._guarded(str(protocol), handler)

    def _guarded(self, protocol: str, handler: Callable[[Any], Awaitable[None]]) -> Any:
        """The one gate every inbound stream passes: rate limit, then hello, then handler."""

        async def guarded(stream: Any) -> None:
            try:
                peer = stream.muxed_conn.peer_id.to_base58()
            except Exception:
                peer = None
            if peer is not None:
                if not self._stream_limiter.allow((peer, protocol)):
                    self._on_reject("stream", "rate_limited")
                    with contextlib.suppress(Exception):
                        await stream.reset()
                    return
                # nothing but the hello is served to a peer until its hello is valid
                if protocol != HELLO_PROTOCOL and peer not in self._verified:
                    verified = False
                    try:
                        verified = await self._wait_verified(peer)
                    finally:  # counted also when the peer's connection is dropped meanwhile
                        if not verified:
                            self._on_reject("stream", "no_hello")
                    if not verified:
                        with contextlib.suppress(Exception):
                            await stream.reset()
                        return
            token, raw = None, stream
            if protocol == DHT_PROTOCOL:
                cell = [False]
                token = _DHT_REFUSAL.set(cell)
                stream = _ResetCountingStream(
                    stream,
                    cell,
                    self._on_reject,
                    lambda: self._stream_limiter.allow((peer, "dht-message")),
                )
            try:
                await handler(stream)
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - the guard must catch everything
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                self.stream_errors += 1
                if not getattr(exc, "_gridmesh_counted", False):
                    self._on_reject("stream", _reason(exc))
                log.info("stream handler for %s failed: %r", protocol, exc)
                with contextlib.suppress(Exception):
                    await raw.reset()  # counted above, not again by a DHT stream's proxy
            finally:
                if token is not None:
                    _DHT_REFUSAL.reset(token)

        guarded._gridmesh_guarded = True  # type: ignore[attr-defined]
        return guarded

    # -- inbound connections ----------------------------------------------------------

    def _harden_inbound(self) -> None:
        """Per-IP cap on inbound connections, and inbound slots that come back.

        py-libp2p 0.8.1 holds an inbound slot (of 250) until the swarm stops, not until the
        connection closes: after ~125 peers have come and gone, every new peer is refused.
        Here the slot's holder is cancelled once the connection's socket is closed, and one IP
        may hold at most `max_connections_per_ip` connections (idle sockets from one address
        would otherwise take every slot before their handshakes time out).
        """
        swarm = self.host.get_network()
        original = swarm._handle_inbound_connection  # type: ignore[attr-defined]
        per_ip: dict[str, int] = {}
        limit = self.limits.max_connections_per_ip

        async def until_closed(raw: Any, scope: trio.CancelScope) -> None:
            sock = getattr(getattr(raw, "stream", None), "socket", None)
            if sock is None:
                return  # not a TCP stream we can watch: py-libp2p's behaviour stays
            while sock.fileno() != -1:  # noqa: ASYNC110 - nothing signals a closed socket
                await trio.sleep(CLOSED_POLL_S)
            scope.cancel()

        async def handle(raw: Any, maddr: Any) -> None:
            try:
                ip = (raw.get_remote_address() or ("", 0))[0]
            except Exception:
                ip = ""
            if per_ip.get(ip, 0) >= limit:
                self._on_reject("connection", "per_ip_limit")
                with contextlib.suppress(Exception):
                    await raw.close()
                return
            per_ip[ip] = per_ip.get(ip, 0) + 1
            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(until_closed, raw, nursery.cancel_scope)
                    await original(raw, maddr)
                    nursery.cancel_scope.cancel()
            finally:
                per_ip[ip] -= 1
                if not per_ip[ip]:
                    del per_ip[ip]

        swarm._handle_inbound_connection = handle  # type: ignore[attr-defined]

    # -- gossip -----------------------------------------------------------------------

    def _harden_pubsub(self) -> None:
        """Cheap, per-peer checks before py-libp2p's own, and a count for every drop.

        py-libp2p starts a task per received message and drops bad ones silently; here a
        forwarding peer over its rate or a message over the size limit is dropped before the
        signature check, and whatever py-libp2p then refuses (bad signature, validation) or
        cannot queue for our subscription is counted.
        """
        pubsub = self.pubsub
        push = pubsub.push_msg
        limits = self.limits

        async def push_msg(forwarder: ID, msg: Any) -> None:
            if forwarder == pubsub.my_id:
                await push(forwarder, msg)
                return
            peer, size = forwarder.to_base58(), msg.ByteSize()
            if size > limits.max_gossip_bytes:
                self._on_reject("pubsub", "too_large")
                return
            if not self._gossip_limiter.allow(peer) or not self._gossip_bytes.allow(peer, size):
                self._on_reject("pubsub", "rate_limited")
                return
            if pubsub._is_msg_seen(msg):
                return  # duplicates are normal in a mesh
            await push(forwarder, msg)
            if not pubsub._is_msg_seen(msg):
                bad_sig = pubsub.strict_signing and not _safe_signature_check(msg)
                self._on_reject("pubsub", "bad_signature" if bad_sig else "refused")

        def notify_subscriptions(msg: Any) -> None:
            for topic in msg.topicIDs:
                if topic in pubsub.topic_ids:
                    try:
                        pubsub.subscribed_topics_send[topic].send_nowait(msg)
                    except trio.WouldBlock:
                        self._on_reject("pubsub", "queue_full")

        pubsub.push_msg = push_msg  # type: ignore[method-assign]
        pubsub.notify_subscriptions = notify_subscriptions  # type: ignore[method-assign]

    # -- lifecycle --------------------------------------------------------------------

    async def publish(self, topic: str, data: bytes) -> None:
        try:
            await self.pubsub.publish(topic, data)
        except Exception as exc:
            raise NetworkError(f"publishing on {topic} failed: {exc!r}") from exc

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        if self._nursery is None:
            raise NetworkError("subscribe() needs a running network")
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
                self._on_reject("pubsub", _reason(exc))
                log.debug("gossip handler for %s failed: %r", topic, exc)

    @asynccontextmanager
    async def run(self) -> AsyncIterator[Libp2pNetwork]:
        _check_listen_free(self._listen)
        async with AsyncExitStack() as stack:
            try:
                await stack.enter_async_context(self.host.run(self._listen))
            except Exception as exc:  # py-libp2p raises ExceptionGroups from its nurseries
                where = ", ".join(str(a) for a in self._listen)
                raise ListenError(f"cannot listen on {where}: {_describe(exc)}") from None
            if not self.host.get_transport_addrs():  # py-libp2p may fail to bind silently
                where = ", ".join(str(a) for a in self._listen)
                raise ListenError(f"cannot listen on {where}: no address could be bound")
            # pubsub must run before the first dial, or links become one-way
            await stack.enter_async_context(background_trio_service(self.pubsub))
            await self.pubsub.wait_until_ready()
            await stack.enter_async_context(background_trio_service(self.dht))
            self.set_request_handler(HELLO_PROTOCOL, self._answer_hello)
            self._nursery = await stack.enter_async_context(trio.open_nursery())
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


def open_hello(payload: bytes, sender: str) -> str:
    """The network id of a peer's hello; CodecError unless it is well-formed and theirs."""
    env = codec.parse_envelope(payload, expect_type=HELLO_TYPE, max_bytes=MAX_HELLO_BYTES)
    if env.sender != sender:
        raise codec.CodecError("wrong_sender", "hello signed by another peer")
    try:
        body = msgspec.convert(env.body, HelloBody, strict=True)
    except msgspec.ValidationError as exc:
        raise codec.CodecError("malformed", f"hello body: {str(exc)[:200]}") from None
    codec.verify_envelope(env)  # last: the costly check, after the cheap ones
    return body.network_id


def _safe_signature_check(msg: Any) -> bool:
    try:
        return bool(signature_validator(msg))
    except Exception:
        return False


def _describe(exc: BaseException) -> str:
    """One line for an exception, unwrapping ExceptionGroups to their first leaf."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return str(exc) or type(exc).__name__


def _ip_and_port(addr: multiaddr.Multiaddr) -> tuple[str, int]:
    """(ip, tcp port) of an /ip4 or /ip6 TCP multiaddr; ValueError for anything else."""
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols:
        raise ValueError("not a TCP address")
    for name in ("ip4", "ip6"):
        if name in protocols:
            return addr.value_for_protocol(name), int(addr.value_for_protocol("tcp"))
    raise ValueError("not an IP address")


def _is_local_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified or host in _interface_ips(ip.version)


def _check_listen_free(listen: list[multiaddr.Multiaddr]) -> None:
    """Fail clearly when a fixed TCP port is taken, or the address is not this host's.

    py-libp2p sets SO_REUSEPORT, so a second daemon would bind the same port silently and the
    two would then dial themselves; and it carries on without listening when a bind fails.
    This probe binds without SO_REUSEPORT: it fails while anyone listens there.
    """
    for addr in listen:
        try:
            host, port = _ip_and_port(addr)
        except ValueError:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    why = "is in use (another daemon?); use another port, or tcp/0 for any free one"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    why = "is not an address of this host"
                else:
                    why = f"cannot be bound ({exc.strerror or exc})"
                raise ListenError(f"cannot listen on {addr}: {host}:{port} {why}") from None


def _interface_ips(version: int) -> list[str]:
    """This host's non-loopback addresses of one IP version (best effort, no extra deps)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    found: list[str] = []
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM):
            found.append(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        # connecting a UDP socket sends nothing; it picks the interface of the default route
        probe.connect(("192.0.2.1", 9) if version == 4 else ("2001:db8::1", 9))
        found.append(str(probe.getsockname()[0]))
    out = []
    for text in found:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local) and str(ip) not in out:
            out.append(str(ip))
    return out


def _dialable_addrs(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace 0.0.0.0 (or ::) by this host's addresses, or loopback when it has no other."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        try:
            host, port = _ip_and_port(addr)
        except ValueError:
            out.append(addr)
            continue
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified:
            out.append(addr)
            continue
        proto = "ip4" if ip.version == 4 else "ip6"
        loopback = "127.0.0.1" if ip.version == 4 else "::1"
        for local in _interface_ips(ip.version) or [loopback]:
            out.append(multiaddr.Multiaddr(f"/{proto}/{local}/tcp/{port}"))
    seen: set[str] = set()
    return [a for a in out if not (str(a) in seen or seen.add(str(a)))]


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        first = exc.exceptions[0] if exc.exceptions else exc
        return _reason(first)
    reason = getattr(exc, "reason", None)  # our errors name their own reason
    return reason if isinstance(reason, str) else type(exc).__name__
