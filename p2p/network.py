"""The `Network` seam: everything the daemon and the protocol cores ask of the network.

Three transports stand behind it: `p2p.host.Libp2pNetwork` (real py-libp2p: all of it),
`p2p.testing.memnet` (in memory, on trio's clock, with loss and partitions: all of it, for
tests and simulations of hundreds of nodes) and `p2p.localsock` (Unix sockets between
daemons on one host: the stream part only). Cores take the narrowest part they use
(`Requests`, `Streams`, `Gossip`, `DHT`, or the whole `Network`) and import none of them.
`p2p.testing.conformance` checks that each transport keeps the contract written here.

Every call may hang on a slow or dead peer: callers bound them with `trio.move_on_after` or
`trio.fail_after` (or pass `timeout_s` to `request`). Every transport raises `NetworkError`
for a failed request or a broken stream.
"""

from __future__ import annotations

import enum
import hashlib
import re
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Protocol

# handler(sender peer id, request payload) -> response payload
RequestHandler = Callable[[str, bytes], Awaitable[bytes]]
# handler(origin peer id, message data); exceptions are counted and dropped by the network
GossipHandler = Callable[[str, bytes], Awaitable[None]]


class GossipVerdict(enum.Enum):
    """What a gossip validator makes of a message (`Gossip.subscribe`)."""

    ACCEPT = "accept"
    # nothing wrong with it, but nothing new here either (a copy of what this node holds, an
    # update that loses the merge): dropped, and not held against its origin
    IGNORE = "ignore"
    # invalid (malformed, badly signed, over a quota): dropped, and held against its origin
    REJECT = "reject"


# validator(origin peer id, message data) -> a verdict; True is ACCEPT, False is REJECT
GossipValidator = Callable[[str, bytes], "bool | GossipVerdict"]


def gossip_verdict(answer: bool | GossipVerdict) -> GossipVerdict:
    """A validator's answer as a verdict (a bool is ACCEPT or REJECT)."""
    if isinstance(answer, GossipVerdict):
        return answer
    return GossipVerdict.ACCEPT if answer is True else GossipVerdict.REJECT


# the longest frame a stream takes: a number, or a function asked as each frame begins (so a
# stream opened earlier gets the bound of the moment)
FrameBound = int | Callable[[], int]
MAX_STREAM_FRAME_BYTES = 256 << 20  # the default bound on a stream's frames


class NetworkError(Exception):
    """A request could not be delivered or answered, or a stream broke."""


class StreamClosed(NetworkError):
    """The peer ended its side of the stream in order (`close_write` or `close`): every frame
    it sent before has been received. Raised by `receive`."""

    reason = "stream_closed"


class StreamReset(NetworkError):
    """The stream was reset (by either end, or because the peer vanished): frames in flight
    are lost. Transports that cannot tell a reset from an orderly end (a Unix socket) raise
    `StreamClosed` or plain `NetworkError` instead; callers treat every `NetworkError` of a
    stream as its end."""

    reason = "stream_reset"


def frame_limit(bound: FrameBound) -> int:
    """The bound of the moment (a function is asked now)."""
    return bound() if callable(bound) else bound


# a network id: what goes into protocol ids, topics and DHT namespaces (no '/', no spaces)
NETWORK_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
PROTOCOL_ROOT = "/gridmesh/"
# protocols every network speaks alike: the hello tells a peer which network we are on
HELLO_PROTOCOL = "/gridmesh/hello/1.0.0"
UNSCOPED_PROTOCOLS = frozenset({HELLO_PROTOCOL})


def check_network_id(network_id: str) -> str:
    """`network_id` if it can name a network (NETWORK_ID_PATTERN), else ValueError."""
    if not isinstance(network_id, str) or not re.match(NETWORK_ID_PATTERN, network_id):
        raise ValueError(
            f"network id {str(network_id)[:80]!r} is not 1..64 letters, digits, '.', '_' or "
            "'-' starting with a letter or digit"
        )
    return network_id


def scoped_namespace(namespace: str, network_id: str) -> str:
    """The DHT namespace `namespace` of network `network_id`: `gridmesh-1a2b3c`. Short (6 hex
    digits of the id's hash): py-libp2p refuses lookup keys over 50 bytes. Records also
    carry their network inside, so two ids sharing a tag still never share a record."""
    return f"{namespace}-{hashlib.sha256(network_id.encode()).hexdigest()[:6]}"


@dataclass(frozen=True)
class NetworkScope:
    """Where a gridmesh network's name goes: every protocol id, gossip topic and DHT key a
    transport registers, dials, subscribes, publishes or stores passes through here, so the
    protocol constants elsewhere (`/gridmesh/shard/1.0.0`) stay as they are and nodes of
    different networks never share a protocol, a topic or a key even when connected.

    `/gridmesh/shard/1.0.0` becomes `/gridmesh/<id>/shard/1.0.0`; a name outside `/gridmesh/`
    gets the prefix whole (`/echo/1` -> `/gridmesh/<id>/echo/1`); a name already scoped is
    kept (the registry's topic names its network already). A DHT key `/<ns>/<rest>` moves to
    `/<ns>-<tag>/<rest>` (`scoped_namespace`). `NetworkScope(None)` changes nothing (the
    in-memory network's nodes made without a network).
    """

    network_id: str | None

    def __post_init__(self) -> None:
        if self.network_id is not None:
            check_network_id(self.network_id)

    @property
    def prefix(self) -> str:
        return f"{PROTOCOL_ROOT}{self.network_id}/"

    def protocol(self, name: str) -> str:
        """The protocol id (or gossip topic) `name` as this network speaks it."""
        if self.network_id is None or name in UNSCOPED_PROTOCOLS or name.startswith(self.prefix):
            return name
        if name.startswith(PROTOCOL_ROOT):
            return self.prefix + name[len(PROTOCOL_ROOT) :]
        return self.prefix + name.lstrip("/")

    topic = protocol

    def namespace(self, namespace: str) -> str:
        """This network's DHT namespace for `namespace` (`gridmesh` -> `gridmesh-1a2b3c`)."""
        return (
            namespace if self.network_id is None else scoped_namespace(namespace, self.network_id)
        )

    def dht_key(self, key: str) -> str:
        """`key` in this network's namespace; a key already there is kept."""
        if self.network_id is None or not key.startswith("/"):
            return key
        namespace, sep, rest = key[1:].partition("/")
        if not sep:
            return key
        tag = self.namespace("")
        if namespace.endswith(tag):  # already scoped
            return key
        return f"/{self.namespace(namespace)}/{rest}"


class DHTValidator(Protocol):
    """What every DHT node runs on each value it stores or returns (raises to reject)."""

    def validate(self, key: str, value: bytes) -> None: ...

    def select(self, key: str, values: list[bytes]) -> int: ...


class Stream(Protocol):
    """A long-lived, ordered, framed, two-way stream to one peer (for data paths such as
    shards, where a new stream per message would cost milliseconds).

    Semantics every transport keeps (checked by `p2p.testing.conformance.check_streams`):
    - frames arrive whole, in order, each as sent; a frame over the receiver's bound breaks
      the stream;
    - `send` waits while the peer's receive buffer is full (flow control): it never buffers
      without bound;
    - `close_write` is a half-close: the peer receives what was sent, then `StreamClosed`,
      and may still send frames back, which this end can receive;
    - `close` ends the stream for this end: the peer receives what was sent, then a
      `NetworkError`; this end should not use it afterwards;
    - `reset` aborts both directions at once, as a killed process does: the peer's pending
      and later `receive` and its later `send` raise `NetworkError` promptly;
    - a peer that leaves the network (crash, stop) ends its streams the same way.
    """

    @property
    def peer_id(self) -> str: ...

    async def send(self, frame: bytes) -> None:
        """Send one frame; raises NetworkError when the stream is closed or broken."""
        ...

    async def receive(self) -> bytes:
        """The next frame; raises StreamClosed at the peer's orderly end, NetworkError when
        the stream breaks."""
        ...

    async def close_write(self) -> None:
        """Half-close: no more frames from this end; receiving goes on."""
        ...

    async def close(self) -> None:
        """This end is done with the stream (never raises)."""
        ...

    async def reset(self) -> None:
        """Abort both directions (never raises)."""
        ...


# handler(stream opened by a peer); exceptions are counted and reset the stream
StreamHandler = Callable[[Stream], Awaitable[None]]


@dataclass
class PeerState:
    """What a node knows of a connected or routable peer."""

    peer_id: str
    addrs: list[str] = field(default_factory=list)
    rtt_ms: float | None = None
    last_seen: float = 0.0
    missed_pings: int = 0


class Requests(Protocol):
    """One request, one response, each one frame (`check_requests`)."""

    @property
    def peer_id(self) -> str: ...

    async def request(
        self, peer_id: str, protocol: str, payload: bytes, *, timeout_s: float | None = None
    ) -> bytes:
        """The peer's answer; NetworkError when it cannot be delivered or answered (no such
        protocol there, the handler failed) or, with `timeout_s`, when it takes longer."""
        ...

    def set_request_handler(
        self, protocol: str, handler: RequestHandler, *, timeout_s: float | None = None
    ) -> None:
        """Answer `protocol` with `handler` (`timeout_s`: how long one answer may take)."""
        ...


class StreamOpener(Protocol):
    """What opens streams to peers: a transport, or a service choosing among several (the
    shard service picks loopback, the Unix socket or libp2p per peer)."""

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """A stream to `peer_id`'s handler of `protocol`; NetworkError when it cannot be
        reached or serves no such protocol."""
        ...


class Streams(StreamOpener, Protocol):
    """Framed streams to peers (`check_streams`). The Unix-socket transport has only this."""

    @property
    def peer_id(self) -> str: ...

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, max_frame_bytes: FrameBound = ...
    ) -> None:
        """Serve `protocol`'s streams with `handler`, frames bounded by `max_frame_bytes`.
        The stream ends when the handler returns; an exception resets it."""
        ...


class Gossip(Protocol):
    async def publish(self, topic: str, data: bytes) -> None:
        """Best-effort broadcast to the topic's subscribers; never echoed to its sender."""
        ...

    async def subscribe(
        self, topic: str, handler: GossipHandler, validator: GossipValidator | None = None
    ) -> None:
        """Call `handler` for every message on `topic` (from others) from now on.

        `validator`, when given, runs on every message from others before anything else
        is done with it: a message it refuses (returns False or `GossipVerdict.REJECT` or
        `IGNORE`, or raises: counted by the network) is neither delivered to this node's
        handlers nor forwarded to its peers, so what this node would refuse costs the rest of
        the network nothing. Only a REJECT (or False) lowers the origin's score (p2p.scoring):
        a message that is merely old news here (IGNORE) is what honest peers send all the
        time. It is synchronous, cheap and changes no state (it may count its refusals); it
        sees the message's origin, not the peer that forwarded it. A topic's validators (one
        per `subscribe`) must all accept a message. This node's own publications are never
        validated.
        (`check_gossip_validator`, `check_gossip_not_forwarded`)
        """
        ...


class DHT(Protocol):
    async def dht_put(self, key: str, value: bytes) -> None: ...

    async def dht_get(self, key: str) -> bytes | None: ...

    async def dht_get_from(self, peer_id: str, key: str) -> bytes | None:
        """The valid value `peer_id` itself holds for `key`, asked of it alone: one round
        trip, no walk (a walk waits on every one of the closest peers, a silent one too).
        None when it holds none, holds an invalid one, or cannot be asked."""
        ...

    async def dht_find_peers(self, target: bytes) -> list[str]:
        """Walk the DHT toward `target` (Kademlia's iterative FIND_NODE: ALPHA queries in
        flight, each to the closest peers not yet asked, until the closest have answered) and
        return the peers closest to it that the walk met, nearest first: at most K (20), never
        this node. They join the routing table where it has room, so what a node knows grows
        beyond its connections and its bootstrap peers (a walk toward a random target is a
        bucket refresh). The ids are hearsay until used; bound the call with a deadline."""
        ...


class Network(Requests, Streams, Gossip, DHT, Protocol):
    """The whole contract the daemon uses; `p2p.host.Libp2pNetwork` and
    `p2p.testing.memnet.MemoryNode` implement all of it."""

    @property
    def peers(self) -> dict[str, PeerState]:
        """Peers this node tracks (addresses, measured round trip), by peer id."""
        ...

    def now(self) -> float:
        """Wall-clock seconds (UNIX time) as this network sees it; virtual in simulations."""
        ...

    def known_peers(self) -> set[str]:
        """Peers this node knows of: connected ones and those in its DHT routing table."""
        ...

    def connected_peers(self) -> set[str]:
        """Peers with an open connection to this node."""
        ...

    def refused_peers(self) -> dict[str, str]:
        """Peers refused at the hello lately (another network, no gridmesh node), and why."""
        ...

    def listen_addrs(self) -> list[str]:
        """Addresses others dial to reach this node (each ends in /p2p/<peer id>)."""
        ...

    def peer_addrs(self, peer_id: str) -> list[str]:
        """Addresses this node knows for a peer (empty when none)."""
        ...

    async def connect(self, addr: str, timeout_s: float = ...) -> str:
        """Dial `addr` (ending in /p2p/<peer id>); the peer's id, or NetworkError."""
        ...

    async def ping(self, peer_id: str) -> float:
        """Round-trip time to a connected peer in milliseconds."""
        ...

    def heard_at(self, peer_id: str) -> float | None:
        """When (`trio.current_time()`) a message of `peer_id` last arrived here (a request,
        an answer, a frame), if one did: a peer heard from is alive, whatever its pings do."""
        ...

    def run(self) -> AbstractAsyncContextManager[Any]:
        """Start the node; it stops when the context exits."""
        ...

    async def track_peers(self, interval_s: float) -> None:
        """Keep `peers` current (runs until cancelled)."""
        ...

    async def keep_connected(
        self,
        addr: str,
        min_s: float,
        max_s: float,
        on_connected: Callable[[str], None] | None = None,
    ) -> None:
        """Connect to `addr` and reconnect with backoff whenever lost (until cancelled)."""
        ...
