"""Shard servers announce their load (queue length, utilisation) for the coordinator's scaling."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("torch")

from daemon.shards.model import make_tiny  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from registry.schemas import SchemaError, validate_value  # noqa: E402
from tests.daemon.shards.test_service import service  # noqa: E402


async def test_utilisation_is_measured_and_re_announced_when_it_moves(tmp_path, monkeypatch):
    writes: list[dict] = []

    async def write(kind: str, key: str, value: dict) -> None:
        validate_value(kind, key, value)  # what every replica checks
        writes.append(value["parameters"])

    clock = [100.0]
    monkeypatch.setattr("daemon.shards.announce.time.monotonic", lambda: clock[0])
    shards = service()
    shards.replicator = SimpleNamespace(write=write)
    server = ShardServer()
    block = await server.load("m", make_tiny(tmp_path / "m", layers=2), 0, 2)
    server.cache_budget_bytes = 1000 * block.cache_bytes_per_token
    shards._server = server
    await shards.refresh_announcements()  # first: announced, with no load measured yet
    assert [(p["queue_length"], p["utilisation"]) for p in writes] == [(0, 0.0)]
    clock[0] += 10.0
    block.compute_s += 5.0  # half of the last 10 s computing
    await shards.refresh_announcements()
    assert writes[-1]["utilisation"] == 0.5 and len(writes) == 2
    clock[0] += 10.0
    block.compute_s += 5.5  # 0.55: moved by less than a tenth, not announced again
    await shards.refresh_announcements()
    assert len(writes) == 2 and shards.utilisation == 0.55
    clock[0] += 10.0  # idle: announced (0.55 -> 0)
    await shards.refresh_announcements()
    assert writes[-1]["utilisation"] == 0.0 and len(writes) == 3
    clock[0] += 1.0
    block.compute_s += 30.0  # more than the interval (threads): capped at 1
    assert shards.measure_load() == 1.0


def test_the_registry_bounds_announced_load():
    value = {
        "blockId": "m.0-2.x",
        "blockComponentURI": "m",
        "model": "m",
        "layers": [0, 2],
        "served_by": ["x"],
        "parameters": {"ms_per_layer": 1.0, "queue_length": 3, "utilisation": 0.25},
    }
    validate_value("blocks", "m.0-2.x", value)
    for bad in ({"utilisation": 1.5}, {"utilisation": "busy"}, {"queue_length": -1}):
        odd = {**value, "parameters": {**value["parameters"], **bad}}
        with pytest.raises(SchemaError):
            validate_value("blocks", "m.0-2.x", odd)
