"""A hostile peer for fault tests and manual chaos: `python -m daemon.tools.hostile_peer`
(usage in `runner`). One module per flood family (gossip_floods, dht_flood, stream_floods),
the one-shot attacks in `probes`, what they share in `peer`."""

from daemon.tools.hostile_peer.peer import (
    AcceptAnything,
    Flood,
    FloodLimits,
    FloodStats,
    connected,
    hostile_network,
    poll,
)
from daemon.tools.hostile_peer.probes import garbage, registry
from daemon.tools.hostile_peer.runner import ATTACKS, FLOODS, IDLE, flood, flood_main, main

__all__ = [
    "ATTACKS",
    "FLOODS",
    "IDLE",
    "AcceptAnything",
    "Flood",
    "FloodLimits",
    "FloodStats",
    "connected",
    "flood",
    "flood_main",
    "garbage",
    "hostile_network",
    "main",
    "poll",
    "registry",
]
