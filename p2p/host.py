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
import logging
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

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
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11, PROTOCOL_ID_V12, GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.records.validator import NamespacedValidator, Validator
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.tools.anyio_service import background_trio_service

from p2p import codec, identity
from p2p.network import (
    DHTValidator,
    GossipHandler,
    NetworkError,
    RequestHandler,
    StreamHandler,
)

_swarm._HAPPY_EYEBALLS_DELAY = 0  # type: ignore[attr-defined]

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 4 << 20
PING_TIMEOUT_S = 2.0
MAX_MISSED_PINGS = 3
FROZEN_AFTER_S = 20.0
HELLO_PROTOCOL = "/gridmesh/hello/1.0.0"
HELLO_TYPE = "hello"
_LEN = struct.Struct(">I")
# (source, reason) -> None: the daemon counts rejected input in /metrics
RejectHook = Callable[[str, str], None]
# (op, outcome, seconds) -> None
DHTObserver = Callable[[str, str, float], None]


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

    def __init__(self, inner: DHTValidator) -> None:
        self._inner = inner

    def validate(self, key: str, value: bytes) -> None:
        self._inner.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self._inner.select(key, values)


async def read_frame(stream: Any, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
    header = await _read_exactly(stream, _LEN.size)
    (length,) = _LEN.unpack(header)
    if length > max_bytes:
        raise NetworkError(f"frame of {length} bytes exceeds the limit of {max_bytes}")
    return await _read_exactly(stream, length)


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

    async def opened_stream(self, network: Any, stream: Any) -> None:
        pass

    async def closed_stream(self, network: Any, stream: Any) -> None:
        pass

    async def connected(self, network: Any, conn: Any) -> None:
        pass

    async def listen(self, network: Any, multiaddr: Any) -> None:
        pass

    async def listen_close(self, network: Any, multiaddr: Any) -> None:
        pass


MAX_STREAM_FRAME_BYTES = 256 << 20


class FramedStream:
    """A libp2p stream carrying length-prefixed frames (the `p2p.network.Stream` protocol)."""

    def __init__(self, stream: Any, peer_id: str, max_frame_bytes: int) -> None:
        self._stream = stream
        self._max = max_frame_bytes
        self.peer_id = peer_id

    async def send(self, frame: bytes) -> None:
        try:
            await self._stream.write(_LEN.pack(len(frame)) + frame)
        except Exception as exc:
            raise NetworkError(f"stream to {self.peer_id} broke: {exc!r}") from exc

    async def receive(self) -> bytes:
        try:
            return await read_frame(self._stream, self._max)
        except NetworkError:
            raise
        except Exception as exc:
            raise NetworkError(f"stream from {self.peer_id} broke: {exc!r}") from exc

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.close()

    async def reset(self) -> None:
        with contextlib.suppress(Exception):
            await self._stream.reset()


@dataclass
class PeerState:
    peer_id: str
    addrs: list[str] = field(default_factory=list)
    rtt_ms: float | None = None
    last_seen: float = 0.0
    missed_pings: int = 0


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
    ) -> None:
        self._ident = ident
        self.network_id = network_id
        self._listen = [multiaddr.Multiaddr(a) for a in listen]
        key_pair = create_new_key_pair(ident.node_seed)
        noise = NoiseTransport(key_pair, noise_privkey=create_x25519_key_pair().private_key)
        self.host = new_host(
            key_pair=key_pair,
            sec_opt={NOISE_PROTOCOL_ID: noise},
            muxer_preference="YAMUX",
        )
        self.dht = KadDHT(
            self.host,
            DHTMode.SERVER,
            validator=NamespacedValidator(
                {dht_namespace: _ValidatorBridge(dht_validator)}, strict_validation=True
            ),
            validator_changed=True,
        )
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
        self.pubsub = Pubsub(self.host, self.gossipsub)
        self._nursery: trio.Nursery | None = None
        self.host.get_network().register_notifee(_ForgetDisconnected(self))
        self._dht_validator = dht_validator
        self._dht_timeout_s = dht_timeout_s
        self._request_timeout_s = request_timeout_s
        self._on_reject = on_reject or (lambda source, reason: None)
        self._on_dht_op = on_dht_op or (lambda op, outcome, seconds: None)
        self.peers: dict[str, PeerState] = {}
        self.stream_errors = 0

    # -- Network protocol -------------------------------------------------------------

    @property
    def peer_id(self) -> str:
        return self._ident.peer_id

    def now(self) -> float:
        return time.time()

    def connected_peers(self) -> set[str]:
        return {p.to_base58() for p in self.host.get_connected_peers()}

    def known_peers(self) -> set[str]:
        routing = {p.to_base58() for p in self.dht.routing_table.get_peer_ids()}
        return (routing | self.connected_peers()) - {self.peer_id}

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
        self, peer_id: str, protocol: str, max_frame_bytes: int = MAX_STREAM_FRAME_BYTES
    ) -> FramedStream:
        try:
            with trio.fail_after(self._request_timeout_s):
                raw = await self.host.new_stream(ID.from_base58(peer_id), [protocol])
        except trio.TooSlowError:
            raise NetworkError(f"opening {protocol} to {peer_id} timed out") from None
        except Exception as exc:
            raise NetworkError(f"opening {protocol} to {peer_id} failed: {exc!r}") from exc
        return FramedStream(raw, peer_id, max_frame_bytes)

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, max_frame_bytes: int = MAX_STREAM_FRAME_BYTES
    ) -> None:
        async def serve(raw: Any) -> None:
            stream = FramedStream(raw, raw.muxed_conn.peer_id.to_base58(), max_frame_bytes)
            try:
                await handler(stream)
            finally:
                await stream.close()

        self.host.set_stream_handler(protocol, serve)  # type: ignore[arg-type]
        self.guard_handlers()

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
        """Dial a full multiaddr and add the peer to the DHT; returns its peer id."""
        try:
            info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        except Exception as exc:
            raise NetworkError(f"not a multiaddr with /p2p/<peer id>: {addr[:200]}") from exc
        if info.peer_id.to_base58() == self.peer_id:
            raise NetworkError("refusing to connect to myself")
        try:
            with trio.fail_after(timeout_s):
                await self.host.connect(info)
                await self._check_hello(info.peer_id.to_base58())
                await self.dht.add_peer(info.peer_id)
        except NetworkError:
            raise
        except trio.TooSlowError:
            raise NetworkError(f"connecting to {addr} timed out after {timeout_s} s") from None
        except Exception as exc:
            raise NetworkError(f"connecting to {addr} failed: {exc}") from exc
        peer = self.peers.setdefault(info.peer_id.to_base58(), PeerState(info.peer_id.to_base58()))
        peer.addrs = [str(a) for a in info.addrs]
        peer.last_seen = time.time()
        return peer.peer_id

    def _hello(self) -> bytes:
        body = {"network_id": self.network_id}
        return codec.seal(self._ident, HELLO_TYPE, body, timestamp=self.now()).to_wire()

    async def _answer_hello(self, sender: str, payload: bytes) -> bytes:
        env = codec.open_envelope(payload, expect_type=HELLO_TYPE, max_bytes=4096)
        if env.sender != sender:
            raise NetworkError("hello signed by another peer")
        return self._hello()

    async def _check_hello(self, peer_id: str) -> None:
        """Refuse a peer of another gridmesh network (or one that is no gridmesh node)."""
        try:
            reply = codec.open_envelope(
                await self.request(peer_id, HELLO_PROTOCOL, self._hello()),
                expect_type=HELLO_TYPE,
                max_bytes=4096,
            )
            theirs = reply.body.get("network_id") if isinstance(reply.body, dict) else None
            if reply.sender != peer_id:
                raise NetworkError("hello answered by another peer")
        except (NetworkError, codec.CodecError) as exc:
            await self.host.disconnect(ID.from_base58(peer_id))
            raise NetworkError(f"peer {peer_id} failed the gridmesh handshake: {exc}") from None
        if theirs != self.network_id:
            await self.host.disconnect(ID.from_base58(peer_id))
            raise NetworkError(
                f"peer {peer_id} is on network {str(theirs)[:64]!r}, not {self.network_id!r}"
            )

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
        async def guarded(stream: Any) -> None:
            try:
                await handler(stream)
            except trio.Cancelled:
                raise
            except BaseException as exc:  # noqa: BLE001 - the guard must catch everything
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                self.stream_errors += 1
                self._on_reject("stream", _reason(exc))
                log.info("stream handler for %s failed: %r", protocol, exc)
                with contextlib.suppress(Exception):
                    await stream.reset()

        guarded._gridmesh_guarded = True  # type: ignore[attr-defined]
        return guarded

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
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(self.host.run(self._listen))
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


def _reason(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup):
        first = exc.exceptions[0] if exc.exceptions else exc
        return _reason(first)
    return type(exc).__name__
