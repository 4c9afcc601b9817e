"""Connection caps of the libp2p host: connections in total (inbound and outbound together)
and per peer, enforced by py-libp2p 0.8.1's resource manager, every refusal counted.

py-libp2p has three layers of connection limits, and a host from `new_host()` gets all three
with defaults that are not ours and refusals that nobody counts:
- `ConnectionConfig` (the swarm): `max_connections` (300) checked when a connection
  registers, an inbound limiter of `max_connections - min_connections` slots held from the
  socket's accept, a per-peer count above which it *trims* old connections after a 20 s grace
  (not a refusal), and pruning above a high watermark;
- the resource manager's connection lifecycle (`ConnectionLimits`): established connections
  in total, per direction and per peer, checked in `Swarm.add_conn` before the connection
  joins the swarm; a connection over a limit is closed and never reaches the notifees;
- the resource manager's own counter (`ResourceLimits.max_connections`, 1000), a per-peer
  connection rate (10/s, burst 50), and a "circuit breaker" and a "graceful degradation" that
  lower every limit after refusals (an attacker's refusals would then lock honest peers out).

Here the lifecycle holds our caps (`HostLimits.max_connections`, `max_connections_per_peer`),
the swarm's own limits are set just above them so that they never refuse first (and never
trim or prune: nothing gets above the caps), the resource manager's counter is set well
above them (it counts a connection twice while it upgrades), the breaker and degradation are
off, and every refusal is counted on the reject hook as `connection`/`REASON`:
`total_limit`, `per_peer_limit` (the lifecycle), `inbound_limit` (`p2p.guard.harden_inbound`:
the inbound slots), `rate_limited` (the per-peer connection rate), `resource_limit`; and a
stream past the manager's streams in total (10,000, inbound and outbound) as
`stream`/`resource_limit`. Streams per peer and per protocol are capped by p2p.guard (the
manager's protocol limits are not consulted by py-libp2p's swarm), and memory by p2p.buffers
(nothing in py-libp2p 0.8.1 asks the manager for memory).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from libp2p.network.config import ConnectionConfig
from libp2p.rcmgr import ResourceLimits, ResourceManager
from libp2p.rcmgr.connection_limits import ConnectionLimits
from libp2p.rcmgr.exceptions import ResourceLimitExceeded

from p2p.limits import HostLimits, RejectHook

log = logging.getLogger(__name__)

# py-libp2p's minimum of connections kept (it reserves that many slots for outbound dials
# from the inbound ones) and auto-connect watermark (its defaults), capped below our total
MIN_CONNECTIONS, LOW_WATERMARK = 50, 100


def connection_config(limits: HostLimits) -> ConnectionConfig:
    """The swarm's limits, set to our caps (see the module docstring)."""
    # one above our total: the swarm refuses a dial or a handshake at its `max_connections`
    # uncounted, before the lifecycle would; it never gets there now
    total = limits.max_connections + 1
    # below the low watermark py-libp2p's auto-connector dials known peers: at most half the
    # cap, so that it never takes the last free slots from peers dialling in
    low = min(LOW_WATERMARK, limits.max_connections // 2)
    return ConnectionConfig(
        max_connections=total,
        high_watermark=total,  # pruning starts above it: never, the caps refuse first
        low_watermark=low,
        min_connections=min(MIN_CONNECTIONS, low // 2),
        max_connections_per_peer=limits.max_connections_per_peer,
    )


def refusal_reason(exc: ResourceLimitExceeded) -> str:
    """Which of the lifecycle's limits refused a connection."""
    text = str(getattr(exc, "message", "") or exc).lower()
    if "per peer" in text:
        return "per_peer_limit"
    if "pending" in text:
        return "pending_limit"
    return "total_limit"  # total, or one direction's share of it (set to the total)


def resource_manager(limits: HostLimits, on_reject: RejectHook) -> ResourceManager:
    """py-libp2p's resource manager holding our connection caps, its refusals counted."""
    total, per_peer = limits.max_connections, limits.max_connections_per_peer
    manager = ResourceManager(
        # an inbound connection holds two of these while it upgrades: never the first to refuse
        limits=ResourceLimits(max_connections=2 * total + 64),
        connection_limits=ConnectionLimits(
            max_established_inbound=total,
            max_established_outbound=total,
            max_established_per_peer=per_peer,
            max_established_total=total,
        ),
        enable_circuit_breaker=False,
        enable_graceful_degradation=False,
        enable_metrics=False,
    )
    count_refusals(manager, on_reject)
    return manager


def count_refusals(manager: ResourceManager, on_reject: RejectHook) -> None:
    """Count each connection the manager refuses (py-libp2p only logs them)."""
    lifecycle = manager.connection_lifecycle
    if lifecycle is not None:
        for name in (
            "handle_established_inbound_connection",
            "handle_established_outbound_connection",
        ):
            setattr(lifecycle, name, _counting(getattr(lifecycle, name), on_reject))
    record = manager._record_blocked_resource

    def blocked(resource_type: str, direction: str = "unknown", scope: str = "system") -> None:
        if resource_type == "connection":
            on_reject("connection", "rate_limited" if scope == "rate" else "resource_limit")
        elif resource_type == "stream":  # its streams in total (ResourceLimits.max_streams)
            on_reject("stream", "resource_limit")
        record(resource_type, direction, scope)

    manager._record_blocked_resource = blocked  # type: ignore[method-assign]


def _counting(
    handler: Callable[..., Awaitable[None]], on_reject: RejectHook
) -> Callable[..., Awaitable[None]]:
    async def checked(*args: Any, **kwargs: Any) -> None:
        try:
            await handler(*args, **kwargs)
        except ResourceLimitExceeded as exc:
            on_reject("connection", refusal_reason(exc))
            raise

    return checked


def connection_counts(swarm: Any) -> dict[str, int]:
    """Connections open now, in total and to the busiest peer (for tests and node_info)."""
    per_peer = [len(conns) for conns in getattr(swarm, "connections", {}).values()]
    return {"total": sum(per_peer), "busiest_peer": max(per_peer, default=0)}
