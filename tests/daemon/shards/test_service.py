"""How a daemon sees announced shard servers: free cache and same-host peers."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

pytest.importorskip("torch")

from daemon.metrics import Metrics  # noqa: E402
from daemon.shards import wire  # noqa: E402
from daemon.shards.model import make_tiny  # noqa: E402
from daemon.shards.server import Outbox, ShardServer  # noqa: E402
from daemon.shards.service import ShardService, block_key  # noqa: E402
from p2p import localsock  # noqa: E402
from p2p.streams import stream_pair  # noqa: E402
from registry.sync import Entries  # noqa: E402

ME = "12D3KooWme"


class _Entries(dict):
    """A replica's entries for announcements that are not real entries (no state hash)."""

    def of_kind(self, kind: str) -> list[SimpleNamespace]:
        return [e for e in self.values() if e.kind == kind]


def announcement(peer: str, start: int, end: int, **parameters) -> SimpleNamespace:
    value = {
        "model": "m",
        "layers": [start, end],
        "served_by": [peer],
        "parameters": {"ms_per_layer": 1.0, **parameters},
    }
    key = block_key("m", start, end, peer)
    return SimpleNamespace(kind="blocks", key=key, value=value, author=peer, owner=peer)


def service(*entries: SimpleNamespace) -> ShardService:
    return ShardService(
        ident=SimpleNamespace(peer_id=ME),  # type: ignore[arg-type]
        net=SimpleNamespace(peers={"full": SimpleNamespace(rtt_ms=3.0)}),  # type: ignore[arg-type]
        replica=SimpleNamespace(entries=_Entries({(e.kind, e.key): e for e in entries})),
        replicator=SimpleNamespace(),  # type: ignore[arg-type]
        metrics=Metrics(),
        allow_remote_deploy=False,
    )


async def test_servers_without_enough_free_cache_are_left_out():
    shards = service(
        announcement("full", 0, 4, cache_tokens_free=100),
        announcement("roomy", 0, 4, cache_tokens_free=5000),
        announcement("old", 0, 4),  # announced before free cache was: kept, it may fit
        announcement("bogus", 0, 4, cache_tokens_free="lots"),  # not an int: skipped
    )
    assert sorted(s.peer_id for s in await shards.servers("m")) == ["full", "old", "roomy"]
    assert shards.metrics.rejected.labels("registry", "bad_entry")._value.get() >= 1
    fitting = await shards.servers("m", need_tokens=1000)
    assert sorted(s.peer_id for s in fitting) == ["old", "roomy"]


@pytest.mark.skipif(localsock.HOST_ID is None, reason="same-host sockets need Linux")
def test_same_host_is_what_the_peer_announced_and_can_be_turned_off():
    entries = (
        announcement("here", 0, 2, host=localsock.HOST_ID),
        announcement("elsewhere", 2, 4, host="another-boot-id"),
        announcement("silent", 4, 6),
    )
    # someone else's entry claiming that "far" runs on this host (so that we would dial a
    # local socket for it) is no announcement of "far"
    forged = announcement("far", 6, 8, host=localsock.HOST_ID)
    forged.author = forged.owner = "mallory"
    shards = service(*entries, forged)
    assert [shards.same_host(p) for p in ("here", "elsewhere", "silent", "unknown", "far")] == [
        True,
        False,
        False,
        False,
        False,
    ]
    off = service(*entries)
    off.local_sockets = False
    assert not off.same_host("here")


async def test_free_cache_is_re_announced_when_it_moves_by_a_tenth(tmp_path):
    writes: list[tuple[str, dict]] = []

    async def write(kind: str, key: str, value: dict) -> None:
        writes.append((key, value["parameters"]["cache_tokens_free"]))

    shards = service()
    shards.replicator = SimpleNamespace(write=write)
    server = ShardServer()
    block = await server.load("m", make_tiny(tmp_path / "m", layers=2), 0, 2)
    server.cache_budget_bytes = 1000 * block.cache_bytes_per_token
    shards._server = server
    await shards.refresh_announcements()  # never announced: announce
    assert [free for _, free in writes] == [1000]
    owner = Outbox(stream_pair("a", "b")[0])
    header = {"model": "m", "start": 0, "end": 2}
    server.open_session(wire.Open(**header, max_length=100), owner)  # a tenth: not yet
    await shards.refresh_announcements()
    assert [free for _, free in writes] == [1000]
    server.open_session(wire.Open(**header, max_length=1), owner)  # past a tenth
    await shards.refresh_announcements()
    assert [free for _, free in writes] == [1000, 899]
    server.unload("m")  # nothing served: nothing announced
    await shards.refresh_announcements()
    assert len(writes) == 2


async def test_control_requests_are_typed_and_bounded_over_the_network(autojump_clock, tmp_path):
    """A peer sends the shard control protocol garbage, wrong types and out-of-range fields:
    each is refused with a clear code and counted, and a good request still loads."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from daemon.shards.service import CONTROL_PROTOCOL
    from p2p import codec
    from p2p.identity import NodeIdentity
    from p2p.testing.memnet import MemoryNetwork

    hub = MemoryNetwork(seed=3)
    ident, mallory = NodeIdentity.generate(), NodeIdentity.generate()
    node, attacker = hub.add_node(ident.peer_id), hub.add_node(mallory.peer_id)
    metrics = Metrics()
    announced = []

    async def write(kind: str, key: str, value) -> None:
        announced.append(key)

    shards = ShardService(
        ident=ident,
        replica=SimpleNamespace(entries=Entries()),
        net=SimpleNamespace(set_stream_handler=lambda *a, **kw: None),  # type: ignore[arg-type]
        metrics=metrics,
        replicator=SimpleNamespace(write=write),
        allow_remote_deploy=True,
        device="cpu",
    )
    node.set_request_handler(CONTROL_PROTOCOL, shards._on_control)

    async def ask(message) -> dict:
        raw = message if isinstance(message, bytes) else codec.encode(message)
        return codec.decode(await attacker.request(ident.peer_id, CONTROL_PROTOCOL, raw))

    model_dir = str(make_tiny(tmp_path / "m", layers=2))
    load = {"op": "load", "model": "m", "model_dir": model_dir, "start": 0, "end": 2}
    cases = [
        (b"\xc1garbage", "malformed"),
        (codec.encode([1, 2]), "bad_request"),
        ({"op": "dance"}, "bad_request"),
        ({**load, "start": "0"}, "bad_request"),
        ({**load, "start": True}, "bad_request"),
        ({**load, "end": 1 << 40}, "bad_request"),
        ({**load, "start": 2, "end": 1}, "bad_request"),
        ({**load, "dtype": "int8"}, "bad_request"),
        ({**load, "model": "m" * 300}, "bad_request"),
        ({"op": "unload", "model": ["m"]}, "bad_request"),
        (b"\x80" * (17 * 1024), "too_large"),
    ]
    for message, code in cases:
        reply = await ask(message)
        assert reply["ok"] is False and reply["code"] == code, (message, reply)
        assert metrics.rejected.labels("shard_control", code)._value.get() >= 1

    @settings(max_examples=60, deadline=None)
    @given(st.binary(max_size=300))
    def fuzz(data: bytes) -> None:
        reply = trio.from_thread.run(ask, data)
        assert reply["ok"] is False and isinstance(reply["code"], str)

    await trio.to_thread.run_sync(fuzz)
    reply = await ask(load)
    assert reply["ok"] is True and reply["block"]["end"] == 2 and announced


async def test_torchs_first_import_calls_on_loaded_once():
    """A node that only requests generations imports torch but loads no model: the daemon's
    `on_loaded` (a gc.freeze of what was made) must still run, once."""
    shards = service()
    calls = []
    shards.on_loaded = lambda: calls.append(1)
    await shards.ensure_torch()
    await shards.ensure_torch()
    assert calls == [1]
