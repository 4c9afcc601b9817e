"""How a daemon sees announced shard servers: free cache and same-host peers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from daemon.shards.service import ShardService, block_key  # noqa: E402
from p2p import localsock  # noqa: E402

ME = "12D3KooWme"


def announcement(peer: str, start: int, end: int, **parameters) -> SimpleNamespace:
    value = {
        "model": "m",
        "layers": [start, end],
        "served_by": [peer],
        "parameters": {"ms_per_layer": 1.0, **parameters},
    }
    return SimpleNamespace(kind="blocks", key=block_key("m", start, end, peer), value=value)


def service(*entries: SimpleNamespace) -> ShardService:
    daemon = SimpleNamespace(
        ident=SimpleNamespace(peer_id=ME),
        replica=SimpleNamespace(entries={(e.kind, e.key): e for e in entries}),
        net=SimpleNamespace(peers={"full": SimpleNamespace(rtt_ms=3.0)}),
    )
    return ShardService(daemon, allow_remote_deploy=False)  # type: ignore[arg-type]


async def test_servers_without_enough_free_cache_are_left_out():
    shards = service(
        announcement("full", 0, 4, cache_tokens_free=100),
        announcement("roomy", 0, 4, cache_tokens_free=5000),
        announcement("old", 0, 4),  # announced before free cache was: kept, it may fit
        announcement("bogus", 0, 4, cache_tokens_free="lots"),  # not an int: unknown
    )
    assert sorted(s.peer_id for s in await shards.servers("m")) == [
        "bogus",
        "full",
        "old",
        "roomy",
    ]
    fitting = await shards.servers("m", need_tokens=1000)
    assert sorted(s.peer_id for s in fitting) == ["bogus", "old", "roomy"]


@pytest.mark.skipif(localsock.HOST_ID is None, reason="same-host sockets need Linux")
def test_same_host_is_what_the_peer_announced_and_can_be_turned_off():
    entries = (
        announcement("here", 0, 2, host=localsock.HOST_ID),
        announcement("elsewhere", 2, 4, host="another-boot-id"),
        announcement("silent", 4, 6),
    )
    shards = service(*entries)
    assert [shards.same_host(p) for p in ("here", "elsewhere", "silent", "unknown")] == [
        True,
        False,
        False,
        False,
    ]
    off = service(*entries)
    off.local_sockets = False
    assert not off.same_host("here")
