"""The `Network` seam: what protocol cores may ask of the network, and nothing more.

Two implementations: `p2p.host.Libp2pNetwork` (real py-libp2p) and `p2p.memnet` (in memory, on
trio's clock, with loss and partitions) for tests and simulations of hundreds of nodes. Cores
take a `Network` and never import either one.

Every call may hang on a slow or dead peer: callers bound them with `trio.move_on_after` or
`trio.fail_after`. Both implementations raise `NetworkError` for a failed request.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

# handler(sender peer id, request payload) -> response payload
RequestHandler = Callable[[str, bytes], Awaitable[bytes]]
# handler(origin peer id, message data); exceptions are counted and dropped by the network
GossipHandler = Callable[[str, bytes], Awaitable[None]]


class NetworkError(Exception):
    """A request could not be delivered or answered."""


class DHTValidator(Protocol):
    """What every DHT node runs on each value it stores or returns (raises to reject)."""

    def validate(self, key: str, value: bytes) -> None: ...

    def select(self, key: str, values: list[bytes]) -> int: ...


class Network(Protocol):
    @property
    def peer_id(self) -> str: ...

    def now(self) -> float:
        """Wall-clock seconds (UNIX time) as this network sees it; virtual in simulations."""
        ...

    def known_peers(self) -> set[str]:
        """Peers this node knows of: connected ones and those in its DHT routing table."""
        ...

    async def dht_put(self, key: str, value: bytes) -> None: ...

    async def dht_get(self, key: str) -> bytes | None: ...

    async def request(self, peer_id: str, protocol: str, payload: bytes) -> bytes: ...

    def set_request_handler(self, protocol: str, handler: RequestHandler) -> None: ...

    async def publish(self, topic: str, data: bytes) -> None:
        """Best-effort broadcast to the topic's subscribers; never echoed to its sender."""
        ...

    async def subscribe(self, topic: str, handler: GossipHandler) -> None:
        """Call `handler` for every message on `topic` (from others) from now on."""
        ...


class Stream(Protocol):
    """A long-lived, ordered, framed byte stream to one peer (for data paths such as shards,
    where a new stream per message would cost milliseconds)."""

    @property
    def peer_id(self) -> str: ...

    async def send(self, frame: bytes) -> None: ...

    async def receive(self) -> bytes:
        """The next frame; raises NetworkError when the stream ends or breaks."""
        ...

    async def close(self) -> None: ...


# handler(stream opened by a peer); exceptions are counted and reset the stream
StreamHandler = Callable[[Stream], Awaitable[None]]
