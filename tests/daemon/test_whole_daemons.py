"""Whole daemons in one process on the in-memory network and trio's virtual clock."""

from __future__ import annotations

import time

import pytest

from daemon.api.client import RPCCallError
from tests.daemon.harness import inline_threads, memory_cluster

COMPONENT = {"name": "llama", "version": "1"}


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


@pytest.fixture
def one_torch_thread():
    """As the harness's daemons (shards.torch_threads = 1), for the reference run too."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


async def keys_on(daemon, kind: str = "components") -> set[str]:
    page = await daemon.call("registry_list", {"kind": kind, "limit": 1000})
    return {item["key"] for item in page["items"]}


async def test_discovery_and_a_replicated_write(autojump_clock, tmp_path):
    started = time.perf_counter()
    async with memory_cluster(tmp_path, 4) as net:
        a, b, *_ = net.daemons
        info = await a.call("node_info")
        assert info["peer_id"] == a.peer_id and info["network_id"] == "memtest"
        await a.call("registry_put", {"kind": "components", "key": "llama", "value": COMPONENT})

        async def replicated() -> bool:
            return all(["llama" in await keys_on(d) for d in net.daemons])

        await net.wait_for(replicated, 5, "replication")
        with pytest.raises(RPCCallError) as err:
            await b.call(
                "registry_put",
                {"kind": "components", "key": "llama", "value": {**COMPONENT, "version": "2"}},
            )
        assert err.value.data["reason"] == "unauthorized"
    print(f"real {time.perf_counter() - started:.2f} s")


# -- moved from test_registry_procs.py ------------------------------------------------------


async def test_write_replicates_and_late_and_returning_nodes_catch_up(autojump_clock, tmp_path):
    async with memory_cluster(tmp_path, 3) as net:
        a, b, c = net.daemons
        await a.call("registry_put", {"kind": "components", "key": "llama", "value": COMPONENT})

        async def everywhere() -> bool:
            return all(["llama" in await keys_on(d) for d in net.daemons])

        await net.wait_for(everywhere, 5, "replication")
        # owner-only: b may not change a's entry, and says why
        with pytest.raises(RPCCallError) as err:
            await b.call(
                "registry_put",
                {"kind": "components", "key": "llama", "value": {**COMPONENT, "version": "2"}},
            )
        assert err.value.data["reason"] == "unauthorized"
        # c stops; writes go on; c comes back and catches up through anti-entropy
        await net.stop(c)
        for i in range(20):
            await a.call("registry_put", {"kind": "components", "key": f"m{i}", "value": COMPONENT})
        await a.call("registry_delete", {"kind": "components", "key": "m0"})
        expected = {"llama"} | {f"m{i}" for i in range(1, 20)}

        async def on(daemon) -> bool:
            return await keys_on(daemon) == expected

        await net.wait_for(lambda: on(b), 5, "b to have every write")
        back = await net.restart(c, bootstrap=[b.addr])
        assert back.peer_id == c.peer_id
        await net.wait_for(lambda: on(back), 15, "the returning daemon to catch up")
        # a daemon started fresh receives the whole registry
        fresh = await net.add(tmp_path / "fresh", bootstrap=[a.addr])
        await net.wait_for(lambda: on(fresh), 15, "a fresh daemon to get everything")
        assert (await fresh.call("registry_stats"))["deleted"] == 1


LAYERS = 6
PROMPT = list(b"a network of shards")


async def deploy(net, model_dir, servers, ranges: list[tuple[int, int]]) -> None:
    plan = [
        {"peer_id": d.peer_id, "start": a, "end": b}
        for d, (a, b) in zip(servers, ranges, strict=True)
    ]
    result = await net.daemons[0].call(
        "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
    )
    assert all(r["ok"] for r in result["results"]), result

    async def everyone_sees_every_shard() -> bool:
        for d in net.daemons:
            listed = await d.call("block_list", {"model": "tiny"})
            if len(listed["announced"].get("tiny", [])) != len(ranges):
                return False
        return True

    await net.wait_for(everyone_sees_every_shard, 15, "every daemon to see every shard")


async def test_six_daemons_discover_replicate_serve_and_recover_a_killed_server(
    autojump_clock, tmp_path, one_torch_thread
):
    """Issue 13's whole-daemon test: 6 daemons find each other, replicate a registry write,
    serve a model over 3 of them (with a replica of the middle range), generate, and
    recover a generation whose middle server is killed mid-way with the exact tokens of a
    single process; in under 10 s of real time."""
    torch = one_torch_thread
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    started = time.perf_counter()
    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    new_tokens = 100
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, new_tokens)
    async with memory_cluster(tmp_path / "net", 6) as net:
        # discovery: every daemon's nodes_find lists all 6 (memory_cluster waited for it)
        found = await net.daemons[5].call("nodes_find", {})
        assert sorted(r["peer_id"] for r in found) == sorted(d.peer_id for d in net.daemons)
        # a registry write on one daemon reaches all
        await net.daemons[0].call(
            "registry_put", {"kind": "components", "key": "llama", "value": COMPONENT}
        )

        async def replicated() -> bool:
            return all(["llama" in await keys_on(d) for d in net.daemons])

        await net.wait_for(replicated, 5, "the write to replicate")
        # a model over 3 daemons, the middle range twice
        servers = net.daemons[1:5]
        await deploy(net, model_dir, servers, [(0, 2), (2, 4), (2, 4), (4, 6)])
        client = net.daemons[0]
        whole = await client.call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": 24}
        )
        assert whole["error"] is None and whole["tokens"] == expected[:24]
        assert len(whole["route"]) == 3 and whole["forwarding"] == "chained"
        # a generation whose middle server is killed mid-way
        job = (
            await client.call(
                "generate",
                {"model": "tiny", "token_ids": PROMPT, "max_tokens": new_tokens, "stream": True},
            )
        )["job"]

        async def poll() -> dict:
            return await client.call("generate_poll", {"job": job})

        killed: list[tuple[str, int]] = []

        def kill() -> None:  # SIGKILL, in memory, the middle server as the 3rd token arrives
            running = client.daemon.shards.jobs[job]
            middle = running.route[1]["peer_id"]
            killed.append((middle, len(running.tokens)))
            net.kill(next(d for d in net.daemons if d.peer_id == middle))

        client.at_token(job, 3, kill)

        async def finished() -> dict | None:
            state = await poll()
            return state if state["done"] else None

        state = await net.wait_for(finished, 60, "the generation to end")
        assert state["error"] is None
        ((middle, at),) = killed
        victim = next(d for d in net.daemons if d.peer_id == middle)
        assert at == 3 and victim.stopped.is_set()
        if not state["recoveries"]:
            pytest.fail(f"the kill came too late to test failover: {state['n_tokens']} tokens")
        assert state["tokens"] == expected
        assert [r["peer_id"] for r in state["recoveries"]] == [middle]
        assert middle not in [h["peer_id"] for h in state["route"]]
        assert all(r["seconds"] <= 5 for r in state["recoveries"]), state["recoveries"]
    real_s = time.perf_counter() - started
    print(f"6 whole daemons: {real_s:.2f} s of real time")
    assert real_s < 10, f"{real_s:.1f} s of real time"
