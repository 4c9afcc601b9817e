"""What the shard service asks of the rest of the daemon: the network and the registry, each
as a narrow interface (DESIGN.md: services get narrow dependencies, never the `Daemon`)."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from typing import Any, Protocol

from p2p.network import PeerState, Requests, Streams


class ShardNetwork(Requests, Streams, Protocol):
    """What shards ask of the network: control requests, shard streams, peers' RTT."""

    @property
    def peers(self) -> Mapping[str, PeerState]: ...


class Entries(Protocol):
    """The registry replica as shards read it (announcements of blocks)."""

    @property
    def entries(self) -> Mapping[Any, Any]: ...


class Writer(Protocol):
    """The replicator as shards use it: announce and withdraw our own blocks."""

    def write(self, kind: str, key: str, value: dict[str, Any] | None) -> Awaitable[Any]: ...
