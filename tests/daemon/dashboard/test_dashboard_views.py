"""The fields issue #21 names for the node and network views, over HTTP on whole in-memory
daemons (virtual clock): this node's version, resources and GPUs with utilisation and memory;
the network's clusters with their coordinator and term, and each peer's measured RTT."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon import __version__
from daemon.api.client import RPCCallError
from tests.daemon.dashboard.http_client import login, make_server, request
from tests.daemon.harness import RESOURCES, MemoryCluster, inline_threads

CLUSTER = "lab"
GPU = {
    "index": 0,
    "name": "Fake H100",
    "uuid": "GPU-0",
    "memory_total_bytes": 80 << 30,
    "memory_free_bytes": 60 << 30,
    "utilization_pct": 37,
    "power_w": 212.5,
}


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


def with_a_gpu(home: Path) -> dict[str, Any]:
    resources = json.loads(json.dumps(RESOURCES))
    return {**resources, "gpus": [dict(GPU)], "gpu_driver": "555.1", "gpu_error": None}


async def test_node_gpus_version_clusters_coordinator_term_and_rtts(
    autojump_clock, tmp_path, nursery
):
    async with trio.open_nursery() as daemons:
        net = MemoryCluster(tmp_path, daemons, detect_resources=with_a_gpu)
        await check_views(net, nursery)
        daemons.cancel_scope.cancel()


async def check_views(net: MemoryCluster, nursery: trio.Nursery) -> None:
    await net.start(3)
    await net.wait_for(net.all_found, 60, "all 3 daemons to find each other")
    d0, *others = net.daemons
    server = make_server(d0.daemon, [])
    cookie = await login(d0, server, nursery)

    node = (await request(nursery, server, "/dashboard/api/node", cookie=cookie)).json()
    info = node["info"]
    assert info["peer_id"] == d0.peer_id and info["version"] == __version__
    assert info["reachability"] and "observed_addrs" in info
    resources = info["resources"]
    assert resources["cpu"]["cores"] == 4 and resources["memory"]["available_bytes"] == 6 << 30
    assert resources["disk"]["free_bytes"] == 100 << 30
    (gpu,) = resources["gpus"]  # what app.js's GPUs table reads
    assert gpu["utilization_pct"] == 37 and gpu["memory_free_bytes"] == 60 << 30
    assert gpu["memory_total_bytes"] == 80 << 30 and gpu["power_w"] == 212.5

    # a cluster of the three, a coordinator elected: its peer id and term on the network view
    await d0.call("cluster_create", {"name": CLUSTER, "admission": "open"})

    async def known_everywhere() -> bool:
        for d in others:
            try:
                await d.call("cluster_members", {"name": CLUSTER})
            except RPCCallError:
                return False
        return True

    await net.wait_for(known_everywhere, 30, "the cluster to reach every daemon")
    for d in others:
        await d.call("cluster_join", {"name": CLUSTER, "role": "voter"})

    async def elected() -> dict[str, Any] | None:
        reply = await request(nursery, server, "/dashboard/api/network", cookie=cookie)
        rows = reply.json()["clusters"]
        coordinator = rows[0]["coordinator"] if rows else {}
        return reply.json() if coordinator.get("coordinator") else None

    network = await net.wait_for(elected, 60, "a coordinator on the network view")
    (row,) = network["clusters"]
    leader, term = d0.daemon.clusters.coordinator(CLUSTER)
    assert row["name"] == CLUSTER and row["admission"] == "open"  # the table's column
    assert row["coordinator"]["coordinator"] == leader in {d.peer_id for d in net.daemons}
    assert row["coordinator"]["term"] == term >= 1

    # the peers, each with the round trip this node measured (the peer map's distances)
    async def measured() -> list[dict[str, Any]] | None:
        reply = await request(nursery, server, "/dashboard/api/network", cookie=cookie)
        peers = reply.json()["peers"]
        return peers if all(isinstance(p["rtt_ms"], float | int) for p in peers) else None

    peers = await net.wait_for(measured, 60, "each peer's round trip measured")
    assert {p["peer_id"] for p in peers} == {d.peer_id for d in others}
    assert all(p["connected"] and p["rtt_ms"] >= 0 for p in peers), peers
