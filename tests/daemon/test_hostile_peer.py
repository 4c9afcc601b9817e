"""The hostile peer's floods (daemon/tools/hostile_peer/, used by bench/abuse.py): each runs
for a moment against a real daemon, which refuses and counts what it sends and keeps serving."""

from __future__ import annotations

import pytest
import trio

from daemon.devnet import DaemonProcess, wait_for
from daemon.tools.hostile_peer import FLOODS, FloodLimits, flood

pytestmark = pytest.mark.procs

REJECTED = "gridmesh_rejected_messages_total"
# a moment each, and small bounds: this checks that every flood works, not what it costs
LIMITS = FloodLimits(
    seconds=0.5,
    max_messages=2000,
    concurrency=4,
    max_held_streams=50,
    max_idle_conns=8,
    frame_mb=1,
    fill_entries=40,
    linger_s=1.0,
)
# where the target counts each flood (gossip is counted by the registry, or by the pubsub
# layer before it; frames by whichever protocol they hit)
SOURCES = {
    "badsig": ("gossip", "pubsub"),
    "gossip": ("gossip", "pubsub"),
    "dht": ("dht",),
    "streams": ("stream",),
    "frames": ("stream", "sync", "hello", "shard_control", "shard"),
}


@pytest.fixture(scope="module")
def target(tmp_path_factory, fast_config):
    daemon = DaemonProcess(tmp_path_factory.mktemp("target"), config=fast_config)
    try:
        yield daemon.start()
    finally:
        daemon.stop()


def counted(target: DaemonProcess, kind: str) -> float:
    total = sum(target.metric(REJECTED, source=source) for source in SOURCES[kind])
    if kind == "dht":  # a connecting peer's own DHT traffic gets a few plain resets
        total -= target.metric(REJECTED, source="dht", reason="refused")
    return total


@pytest.mark.parametrize("kind", list(SOURCES))
def test_each_flood_is_refused_and_counted(target, kind):
    network_id = target.call("node_info")["network_id"]
    before = counted(target, kind)
    stats = trio.run(flood, kind, target.addr, network_id, LIMITS)
    assert stats.sent > 0, stats
    assert stats.accepted == 0 or kind == "frames", stats  # frames: shard sessions, none here
    # the target counts what it refused (streams are counted when the flood resets them, or
    # when their hello wait ends: up to hello_timeout_s on a loaded machine)
    wait_for(lambda: counted(target, kind) > before, 30, f"{kind} to be counted ({stats})")
    assert target.alive()
    assert target.call("node_info")["peer_id"] == target.peer_id


def test_registry_fill_by_one_author_is_answered(target):
    """A fill's entries are valid: the target answers every push (how many it applies is
    its quota's business), and keeps serving."""
    network_id = target.call("node_info")["network_id"]
    limits = FloodLimits(seconds=20, fill_entries=40, linger_s=0)
    stats = trio.run(flood, "fill", target.addr, network_id, limits)
    assert stats.sent == limits.fill_entries, stats
    assert stats.accepted + stats.refused > 0, stats
    assert target.alive()
    assert target.call("registry_kinds")


def test_every_flood_is_tried_here():
    assert [*SOURCES, "fill"] == list(FLOODS)
