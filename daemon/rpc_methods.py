"""The node_* and nodes_* JSON-RPC methods: what a person asks of their own daemon."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any

from msgspec import Meta

from daemon import __version__, errors
from daemon.api.jsonrpc import Dispatcher
from daemon.errors import InvalidParams
from p2p.network import NetworkError
from p2p.reach import connection_of, reach_info
from scheduler.filters import FilterError, NodeFilter

if TYPE_CHECKING:
    from p2p.discovery import ResourceDirectory
    from p2p.identity import NodeIdentity
    from p2p.network import Network

Multiaddr = Annotated[str, Meta(description="full multiaddr ending in /p2p/<peer id>")]
FilterSpec = Annotated[
    dict[str, Any] | None,
    Meta(description="{min_gpus, min_vram_gb, gpu_name, min_cpu_cores}, all optional"),
]


def register_node_methods(
    dispatcher: Dispatcher,
    *,
    ident: NodeIdentity,
    network_id: str,
    net: Network,
    directory: ResourceDirectory,
    local_state: Callable[[], dict[str, Any]],
    request_shutdown: Callable[[], None],
) -> None:
    """`local_state()` gives what changes while the daemon runs: `rpc_url` and `resources`."""

    async def node_info() -> dict[str, Any]:
        """This node's identity, addresses and detected resources."""
        return {
            "peer_id": ident.peer_id,
            "version": __version__,
            "network_id": network_id,
            "listen_addrs": net.listen_addrs(),
            "payout_address": ident.payout_address,
            **reach_info(net),  # reachability, observed and relayed addresses (p2p.reach)
            "connections": {p: connection_of(net, p) for p in sorted(net.connected_peers())},
            **local_state(),
        }

    async def node_peers() -> list[dict[str, Any]]:
        """Peers this node knows, whether connected, and their RTT; then the peers refused at
        the hello lately (another network...), with `refused`: why."""
        connected = net.connected_peers()
        peers = []
        # only peers whose hello verified: a connected non-gridmesh peer is about to be dropped
        for peer_id in sorted(net.known_peers()):
            state = net.peers.get(peer_id)
            peers.append(
                {
                    "peer_id": peer_id,
                    "addrs": net.peer_addrs(peer_id) or (state.addrs if state else []),
                    "connected": peer_id in connected,
                    "rtt_ms": None if state is None or state.rtt_ms is None else state.rtt_ms,
                    "connection": connection_of(net, peer_id),  # direct, relayed or None
                }
            )
        known = {p["peer_id"] for p in peers}
        for peer_id, why in sorted(net.refused_peers().items()):
            if peer_id not in known:
                peers.append(
                    {"peer_id": peer_id, "addrs": [], "connected": False, "rtt_ms": None}
                    | {"refused": why}
                )
        return peers

    async def node_connect(multiaddr: Multiaddr) -> dict[str, Any]:
        """Dial a peer and add it to the DHT routing table."""
        if len(multiaddr) > 1024 or "/p2p/" not in multiaddr:
            raise InvalidParams("multiaddr must be a full address ending in /p2p/<peer id>")
        try:
            peer_id = await net.connect(multiaddr)
        except NetworkError as exc:
            raise errors.from_network(exc) from None
        return {"peer_id": peer_id, "connected": True}

    async def nodes_find(filter: FilterSpec = None) -> list[dict[str, Any]]:
        """Valid resource records of known nodes (this one included) matching the filter."""
        try:
            node_filter = NodeFilter.parse(filter)
        except FilterError as exc:
            raise InvalidParams(str(exc)) from None
        found = await directory.find(lambda r: node_filter.matches(r.resources))
        return [record.to_json() for record in found]

    async def node_shutdown() -> dict[str, Any]:
        """Stop this daemon cleanly."""
        request_shutdown()
        return {"stopping": True}

    async def rpc_methods() -> list[dict[str, Any]]:
        """Every method with its parameters."""
        return dispatcher.describe()

    for handler in (node_info, node_peers, node_connect, nodes_find, node_shutdown, rpc_methods):
        dispatcher.register(handler.__name__, handler)
