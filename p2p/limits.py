"""Per-peer limits of the libp2p host, and the token buckets that enforce them."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# (source, reason) -> None: the daemon counts rejected input in /metrics
RejectHook = Callable[[str, str], None]


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
