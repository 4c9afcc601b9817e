"""Per-peer limits of the libp2p host, and the token buckets that enforce them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

# (source, reason) -> None: the daemon counts rejected input in /metrics
RejectHook = Callable[[str, str], None]


@dataclass(frozen=True)
class HostLimits:
    """Per-peer limits of the host (configured under `[p2p]`; README "Limits and quotas").

    Over a limit, a stream is reset and a gossip message dropped, and both are counted.
    The `msgspec.Meta` bounds are what a config may set (daemon.settings checks them at load,
    and that `max_gossip_bytes` is at most `gossip_bytes_per_s`; construction does not).
    """

    # new inbound streams per peer and protocol
    streams_per_s: Annotated[float, msgspec.Meta(gt=0)] = 200.0
    stream_burst: Annotated[int, msgspec.Meta(ge=1)] = 400
    # gossip messages per forwarding peer
    gossip_per_s: Annotated[float, msgspec.Meta(gt=0)] = 200.0
    gossip_burst: Annotated[int, msgspec.Meta(ge=1)] = 400
    # gossip bytes per forwarding peer
    gossip_bytes_per_s: Annotated[int, msgspec.Meta(ge=1024)] = 4 << 20
    gossip_bytes_burst: Annotated[int, msgspec.Meta(ge=1024)] = 8 << 20
    max_gossip_bytes: Annotated[int, msgspec.Meta(ge=1024)] = 1 << 20
    # how long a peer's streams wait for its hello
    hello_timeout_s: Annotated[float, msgspec.Meta(gt=0)] = 5.0
    # how long gossip message ids are remembered (py-libp2p: 120)
    seen_ttl_s: Annotated[int, msgspec.Meta(ge=1)] = 30
    # verified peers and rate-limit buckets remembered
    max_tracked_peers: Annotated[int, msgspec.Meta(ge=1)] = 4096
    # inbound streams served at once: from one peer (over it: reset, and a score penalty),
    # and on one protocol from all peers together (over it: reset)
    max_streams_per_peer: Annotated[int, msgspec.Meta(ge=1)] = 512
    max_streams_per_protocol: Annotated[int, msgspec.Meta(ge=1)] = 4096
    # inbound connections open at once from one IP
    max_connections_per_ip: Annotated[int, msgspec.Meta(ge=1)] = 64
    # connections open at once, inbound and outbound together, and to one peer (a relayed
    # and a direct one, two dialled at once by both ends): over either a new connection is
    # closed before it is used, and counted (p2p.caps: py-libp2p's resource manager)
    max_connections: Annotated[int, msgspec.Meta(ge=1)] = 256
    max_connections_per_peer: Annotated[int, msgspec.Meta(ge=1)] = 4
    # inbound bytes held unread in streams' buffers: one connection's together, and all (each
    # stream at most what yamux lets a sender have in flight, 16 MiB); more is dropped and the
    # stream closed for reading (p2p.buffers)
    max_buffered_bytes_per_connection: Annotated[int, msgspec.Meta(ge=1 << 20)] = 128 << 20
    max_buffered_bytes: Annotated[int, msgspec.Meta(ge=1 << 20)] = 1 << 30
    # inbound bytes one peer's connections are read at (p2p.inbound): over the budget they
    # are not read until it refills, so the peer's sends block. Far above an honest peer's
    # traffic; a peer whose score (p2p.scoring) is below 0 is read at half the rate for every
    # `inbound_halving_score` points, down to `min_inbound_bytes_per_s`
    inbound_bytes_per_s: Annotated[int, msgspec.Meta(ge=1 << 20)] = 64 << 20
    inbound_bytes_burst: Annotated[int, msgspec.Meta(ge=1 << 20)] = 64 << 20
    inbound_halving_score: Annotated[float, msgspec.Meta(gt=0)] = 1.0
    min_inbound_bytes_per_s: Annotated[int, msgspec.Meta(ge=1024)] = 16 << 10
    # a peer refused for abuse (streams or DHT messages over its rate, bad gossip signatures)
    # more than `ban_strikes` times within about `ban_window_s` is disconnected and refused
    # for `ban_s` (p2p.bans)
    ban_strikes: Annotated[int, msgspec.Meta(ge=1)] = 200
    ban_window_s: Annotated[float, msgspec.Meta(gt=0)] = 10.0
    ban_s: Annotated[float, msgspec.Meta(ge=0)] = 60.0
    # a peer's application score (p2p.scoring) below `score_threshold` is banned as above;
    # penalties fade with a half-life of `score_half_life_s`
    score_threshold: Annotated[float, msgspec.Meta(lt=0)] = -100.0
    score_half_life_s: Annotated[float, msgspec.Meta(gt=0)] = 30.0


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
