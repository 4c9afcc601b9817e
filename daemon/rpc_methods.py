"""The node_* and nodes_* JSON-RPC methods: what a person asks of their own daemon."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from daemon import __version__
from daemon.api.jsonrpc import Dispatcher, Param, RPCError, invalid_params
from p2p.network import NetworkError
from scheduler.filters import FilterError, NodeFilter

if TYPE_CHECKING:
    from daemon.node import Daemon

NETWORK_ERROR = -32010


def register_node_methods(dispatcher: Dispatcher, daemon: Daemon) -> None:
    async def node_info() -> dict[str, Any]:
        return {
            "peer_id": daemon.ident.peer_id,
            "version": __version__,
            "network_id": daemon.config.network_id,
            "listen_addrs": daemon.net.listen_addrs(),
            "payout_address": daemon.ident.payout_address,
            "rpc_url": daemon.rpc_url,
            "resources": daemon.resources,
        }

    async def node_peers() -> list[dict[str, Any]]:
        connected = daemon.net.connected_peers()
        peers = []
        # only peers whose hello verified: a connected non-gridmesh peer is about to be dropped
        for peer_id in sorted(daemon.net.known_peers()):
            state = daemon.net.peers.get(peer_id)
            peers.append(
                {
                    "peer_id": peer_id,
                    "addrs": daemon.net.peer_addrs(peer_id) or (state.addrs if state else []),
                    "connected": peer_id in connected,
                    "rtt_ms": None if state is None or state.rtt_ms is None else state.rtt_ms,
                }
            )
        return peers

    async def node_connect(multiaddr: str) -> dict[str, Any]:
        if len(multiaddr) > 1024 or "/p2p/" not in multiaddr:
            raise invalid_params("multiaddr must be a full address ending in /p2p/<peer id>")
        try:
            peer_id = await daemon.net.connect(multiaddr)
        except NetworkError as exc:
            raise RPCError(NETWORK_ERROR, str(exc)) from None
        return {"peer_id": peer_id, "connected": True}

    async def nodes_find(filter: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        try:
            node_filter = NodeFilter.parse(filter)
        except FilterError as exc:
            raise invalid_params(str(exc)) from None
        found = await daemon.directory.find(lambda r: node_filter.matches(r.resources))
        return [record.to_json() for record in found]

    async def node_shutdown() -> dict[str, Any]:
        daemon.request_shutdown()
        return {"stopping": True}

    async def rpc_methods() -> list[dict[str, Any]]:
        return dispatcher.describe()

    dispatcher.register(
        "node_info", node_info, [], "This node's identity, addresses and detected resources."
    )
    dispatcher.register(
        "node_peers", node_peers, [], "Peers this node knows, whether connected, and their RTT."
    )
    dispatcher.register(
        "node_connect",
        node_connect,
        [Param("multiaddr", (str,), True, "full multiaddr ending in /p2p/<peer id>")],
        "Dial a peer and add it to the DHT routing table.",
    )
    dispatcher.register(
        "nodes_find",
        nodes_find,
        [
            Param(
                "filter",
                (dict,),
                False,
                "{min_gpus, min_vram_gb, gpu_name, min_cpu_cores}, all optional",
            )
        ],
        "Valid resource records of known nodes (this one included) matching the filter.",
    )
    dispatcher.register("node_shutdown", node_shutdown, [], "Stop this daemon cleanly.")
    dispatcher.register("rpc_methods", rpc_methods, [], "Every method with its parameters.")
