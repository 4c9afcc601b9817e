"""The cluster runtime's JSON-RPC method: `cluster_coordinator`."""

from __future__ import annotations

from typing import Annotated, Any

from msgspec import Meta

from daemon.api.jsonrpc import Dispatcher
from daemon.cluster.runtime import ClusterRuntime

ClusterName = Annotated[
    str, Meta(min_length=1, max_length=64, description="the cluster's name (1..64 characters)")
]


def register_runtime_methods(dispatcher: Dispatcher, runtime: ClusterRuntime) -> None:
    async def cluster_coordinator(name: ClusterName) -> dict[str, Any]:
        """The cluster's coordinator (peer id, null when none is known) and its term, as this
        node knows them; `member` says whether this node is an active member (a non-member
        knows only the highest term it has seen, and no coordinator)."""
        leader, term = runtime.coordinator(name)
        return {
            "cluster": name,
            "coordinator": leader,
            "term": term,
            "coordinating": runtime.is_coordinator(name),
            "member": name in runtime.clusters(),
        }

    dispatcher.register("cluster_coordinator", cluster_coordinator)
