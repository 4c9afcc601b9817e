"""Liveness and peer-score metrics (daemon.net_metrics through `Metrics.watch_network`) move
with what happens: a real flooding peer against a real libp2p host is scored down, banned and
disconnected; a killed daemon among whole daemons in memory is taken for gone."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import trio
from prometheus_client.parser import text_string_to_metric_families

from daemon.metrics import Metrics
from p2p.deadconn import DeadConnections
from p2p.host import HostLimits
from p2p.network import NetworkError
from tests.daemon.harness import MemoryCluster, inline_threads
from tests.daemon.test_nodes_liveness import SETTINGS
from tests.p2p.test_host import Node

ECHO = "/gridmesh/test/echo/1"


def _samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.render().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _value(metrics: Metrics, name: str, **labels: str) -> float:
    return _samples(metrics).get((name, tuple(sorted(labels.items()))), 0.0)


async def test_a_flooding_peer_moves_the_score_ban_and_disconnect_metrics():
    limits = HostLimits(streams_per_s=5.0, stream_burst=10, ban_strikes=20, ban_s=30.0)
    target, flooder, honest = Node(limits=limits), Node(), Node()
    metrics = Metrics()
    metrics.watch_network(target.net)

    async def echo(sender: str, payload: bytes) -> bytes:
        return payload

    async with target.net.run(), flooder.net.run(), honest.net.run():
        addr = target.net.listen_addrs()[0]
        await flooder.net.connect(addr)
        await honest.net.connect(addr)
        target.net.set_request_handler(ECHO, echo)
        assert _value(metrics, "gridmesh_connections", scope="total") == 2
        assert ("gridmesh_inbound_buffered_bytes", ()) in _samples(metrics)
        assert _value(metrics, "gridmesh_peer_bans_total", reason="strikes") == 0
        assert _value(metrics, "gridmesh_peer_score_bucket", le="+Inf") == 0
        assert _value(metrics, "gridmesh_peers_banned") == 0
        with trio.fail_after(20):
            while not target.net.bans.is_banned(flooder.ident.peer_id):
                with contextlib.suppress(NetworkError):
                    await flooder.net.request(target.ident.peer_id, ECHO, b"x", timeout_s=2)
        with trio.fail_after(5):  # its connection is closed
            while flooder.ident.peer_id in target.net.connected_peers():  # noqa: ASYNC110
                await trio.sleep(0.02)
        assert _value(metrics, "gridmesh_peer_bans_total", reason="strikes") == 1
        assert _value(metrics, "gridmesh_peer_bans_total", reason="low_score") == 0
        assert _value(metrics, "gridmesh_peers_banned") == 1
        assert _value(metrics, "gridmesh_peer_disconnects_total", reason="banned") == 1
        assert _value(metrics, "gridmesh_connections", scope="total") == 1
        assert _value(metrics, "gridmesh_peer_penalties_total", reason="rate_limited") > 10
        # the flooder's score is held against it: one peer, below -10, none below -100
        assert _value(metrics, "gridmesh_peer_score_bucket", le="+Inf") == 1
        assert _value(metrics, "gridmesh_peer_score_bucket", le="-10.0") == 1
        assert _value(metrics, "gridmesh_peer_score_bucket", le="-100.0") == 0
        assert _value(metrics, "gridmesh_peer_score_lowest") < -10
        # the honest peer is still served, and nothing is held against it
        assert await honest.net.request(target.ident.peer_id, ECHO, b"ok") == b"ok"
        assert target.net.bans.scores.score(honest.ident.peer_id) == 0


@pytest.mark.trio
async def test_a_killed_daemon_moves_the_liveness_metrics(
    tmp_path: Path, autojump_clock: trio.abc.Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    inline_threads(monkeypatch)
    async with trio.open_nursery() as nursery:
        cluster = MemoryCluster(tmp_path, nursery, settings=SETTINGS)
        await cluster.start(3)
        await cluster.wait_for(cluster.all_found, 120, "all 3 daemons to find each other")
        victim, watcher = cluster.daemons[2], cluster.daemons[0].daemon.metrics
        await trio.sleep(5)
        assert _value(watcher, "gridmesh_peers_gone") == 0
        assert _value(watcher, "gridmesh_liveness_events_total", event="gone") == 0

        cluster.kill(victim)

        async def gone() -> bool:
            return _value(watcher, "gridmesh_peers_gone") == 1

        await cluster.wait_for(gone, 10, "the killed daemon taken for gone", poll_s=0.1)
        assert _value(watcher, "gridmesh_liveness_events_total", event="gone") == 1
        assert _value(watcher, "gridmesh_liveness_events_total", event="back") == 0
        assert ("gridmesh_peer_missed_pings", ()) in _samples(watcher)
        nursery.cancel_scope.cancel()


async def test_a_frozen_peer_dropped_by_track_peers_is_counted():
    dropped: list[str] = []

    async def drop(peer_id: str) -> None:
        dropped.append(peer_id)

    async def ping(peer_id: str) -> float:
        raise TimeoutError

    class Net:
        peers: dict = {}  # noqa: RUF012
        dark = DeadConnections(ping, drop)

    metrics = Metrics()
    metrics.watch_network(Net())
    assert _value(metrics, "gridmesh_peer_disconnects_total", reason="frozen") == 0
    await Net.dark.drop_frozen("frozen-peer")
    assert dropped == ["frozen-peer"]
    assert _value(metrics, "gridmesh_peer_disconnects_total", reason="frozen") == 1
    assert _value(metrics, "gridmesh_peer_disconnects_total", reason="dark") == 0
