"""Prices through whole daemons (in one process, on memnet and the virtual clock): a
provider's `[market] price_per_unit` goes from its config into its signed resource record and
its shard announcements; another daemon's planner and router read it there and keep to a
job's maximum (the call's, else the requester's `[market] max_price_per_unit`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.api.client import RPCCallError
from tests.daemon.harness import FAST, MemoryCluster, inline_threads

LAYERS = 6
PROMPT = list(b"priced shards")
# the requester (free itself, paying at most 3 per unit by default), then three providers
MARKETS: list[dict[str, Any]] = [
    {"price_per_unit": 0, "max_price_per_unit": 3},
    {"price_per_unit": 1},
    {"price_per_unit": 5},
    {"price_per_unit": 9},
]


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


async def _start(cluster: MemoryCluster, root: Path) -> None:
    """One daemon per entry of MARKETS, each with its own [market] section."""
    for index, market in enumerate(MARKETS):
        cluster.settings = {**FAST, "market": market}
        bootstrap = [cluster.daemons[-1].addr] if cluster.daemons else []
        await cluster.add(root / f"node{index}", bootstrap)
    await cluster.wait_for(cluster.all_found, 60, "all daemons to find each other")


async def test_a_providers_price_goes_from_its_config_to_a_peers_planner_and_router(
    autojump_clock, tmp_path
):
    torch = pytest.importorskip("torch")
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the daemons (shards.torch_threads = 1)
    try:
        model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
        with torch.no_grad():
            expected = greedy_generate([load_model(model_dir)], PROMPT, 8)
        async with trio.open_nursery() as nursery:
            cluster = MemoryCluster(tmp_path / "net", nursery)
            try:
                await _start(cluster, tmp_path / "net")
                await _check(cluster, model_dir, expected)
            finally:
                nursery.cancel_scope.cancel()
    finally:
        torch.set_num_threads(before)


async def _check(net: MemoryCluster, model_dir: Path, expected: list[int]) -> None:
    requester, cheap, middle, dear = net.daemons
    price = {d.peer_id: m["price_per_unit"] for d, m in zip(net.daemons, MARKETS, strict=True)}

    # 1. each price is in its node's signed record, as a peer finds it through the DHT
    records = await requester.call("nodes_find", {})
    assert {r["peer_id"]: r["price_per_unit"] for r in records} == price

    # 2. the requester's planner keeps to a maximum, and says how many it left out for price
    params = {"model_dir": str(model_dir)}
    plan = await requester.call("shard_plan", {**params, "max_price_per_unit": 1})
    assert {a["peer_id"] for a in plan["assignments"]} <= {requester.peer_id, cheap.peer_id}
    plan = await requester.call("shard_plan", params)  # the config's maximum: 3
    assert dear.peer_id not in {a["peer_id"] for a in plan["assignments"]}
    assert middle.peer_id not in {a["peer_id"] for a in plan["assignments"]}
    with pytest.raises(RPCCallError) as err:
        await requester.call("shard_plan", {**params, "nodes": 3, "max_price_per_unit": 1})
    assert "2 of them excluded for price" in err.value.message, err.value.message
    with pytest.raises(RPCCallError) as err:  # exactly 2 of the 2 within 1: no room to spare
        await requester.call(
            "shard_plan", {**params, "nodes": 2, "replicas": 1, "max_price_per_unit": 0}
        )
    assert "3 of them excluded for price" in err.value.message, err.value.message

    # 3. the whole model on the cheap and the dear provider; announcements carry the prices
    plan_all = [
        {"peer_id": cheap.peer_id, "start": 0, "end": LAYERS},
        {"peer_id": dear.peer_id, "start": 0, "end": LAYERS},
    ]
    result = await requester.call(
        "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan_all}
    )
    assert result["ok"], result

    async def announced() -> list[dict[str, Any]] | None:
        servers = (await requester.call("block_list", {"model": "tiny"}))["announced"]["tiny"]
        return servers if len(servers) == 2 else None

    servers = await net.wait_for(announced, 15, "both servers' announcements")
    assert {s["peer_id"]: s["price_per_unit"] for s in servers} == {
        cheap.peer_id: 1,
        dear.peer_id: 9,
    }

    # 4. the router: within the config's maximum (3) only the cheap server can serve, and the
    # tokens are exactly a single process's; a maximum no server meets says how many it left
    generate = {"model": "tiny", "token_ids": PROMPT, "max_tokens": 8}
    result = await requester.call("generate", generate)
    assert result["tokens"] == expected
    assert [h["peer_id"] for h in result["route"]] == [cheap.peer_id]
    with pytest.raises(RPCCallError) as err:
        await requester.call("generate", {**generate, "max_price_per_unit": 0})
    assert "2 server(s) excluded for price" in err.value.message, err.value.message
    # a call's own maximum overrides the config's: the dear server alone is now allowed
    await net.stop(cheap)
    with pytest.raises(RPCCallError):  # within 3, no server is left
        await requester.call("generate", generate)
    # the config's maximum holds whichever API asks: gRPC calls the service as here
    service = requester.daemon.shards
    job = service.new_job("grpc:test")
    await service.generate(job, "tiny", PROMPT, 8, temperature=0.0, seed=None)
    service.drop_job(job.id)
    assert job.error is not None and "1 server(s) excluded for price" in job.error, job.error
    result = await requester.call("generate", {**generate, "max_price_per_unit": 9})
    assert result["tokens"] == expected
    assert [h["peer_id"] for h in result["route"]] == [dear.peer_id]
