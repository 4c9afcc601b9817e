"""The Abuse check of issue 19 against a real daemon: a hostile peer (its own identity, a real
libp2p connection) that puts forged records, or opens streams past its rate, is throttled
(each refusal counted), scored down (p2p.scoring) and disconnected and refused (a ban). Strikes
are set out of reach here, so the ban can only come from the score."""

from __future__ import annotations

import pytest
import trio

from daemon.devnet import DaemonProcess, wait_for
from daemon.tools.hostile_peer import FloodLimits, flood

pytestmark = pytest.mark.procs

REJECTED = "gridmesh_rejected_messages_total"
LIMITS = FloodLimits(seconds=6.0, max_messages=4000, concurrency=16, linger_s=0.5)


@pytest.fixture(scope="module")
def target(tmp_path_factory, fast_config):
    config = tmp_path_factory.mktemp("cfg") / "node.toml"
    config.write_text(
        fast_config.read_text().replace(
            "[p2p]\n",
            "[p2p]\nban_strikes = 1000000\npeer_streams_per_s = 1.0\npeer_stream_burst = 2\n",
            1,
        )
    )
    daemon = DaemonProcess(tmp_path_factory.mktemp("target"), config=config)
    try:
        yield daemon.start()
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("kind", "throttled"),
    [("dht", {"source": "dht"}), ("streams", {"source": "stream", "reason": "rate_limited"})],
)
def test_a_flooding_peer_is_throttled_scored_down_and_banned(target, kind, throttled):
    network_id = target.call("node_info")["network_id"]
    bans = target.metric(REJECTED, source="peer", reason="banned")
    refused = target.metric(REJECTED, **throttled)
    stats = trio.run(flood, kind, target.addr, network_id, LIMITS)
    assert stats.sent > 0 and stats.accepted == 0, stats
    wait_for(
        lambda: target.metric(REJECTED, source="peer", reason="banned") > bans,
        30,
        f"the {kind} flooder to be banned by its score ({stats})",
    )
    assert target.metric(REJECTED, **throttled) > refused
    assert target.alive()
    assert target.call("node_info")["peer_id"] == target.peer_id
