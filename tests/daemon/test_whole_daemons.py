"""Whole daemons in one process on the in-memory network and trio's virtual clock."""

from __future__ import annotations

import time

import pytest
import trio

from daemon.api.client import RPCCallError
from p2p.identity import BINDING_FILE, NODE_KEY_FILE, PAYOUT_KEY_FILE
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
        # in-process daemons touch no OS state but their identity: no lock, daemon.json,
        # cookie, sqlite store or sockets, and no RPC URL (the dispatcher is the API)
        home = a.daemon.home
        identity_files = {BINDING_FILE, NODE_KEY_FILE, PAYOUT_KEY_FILE}
        assert {p.name for p in home.iterdir()} == identity_files
        assert info["rpc_url"] == "" and a.daemon.bridge is None
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


# -- moved from test_procs.py ----------------------------------------------------------------


async def found_counts(net) -> dict[str, int]:
    """For each daemon's peer id: how many daemons (itself included) find it via nodes_find."""
    counts = {d.peer_id: 0 for d in net.daemons}
    for daemon in net.daemons:
        for record in await daemon.call("nodes_find", {}):
            if record["peer_id"] in counts:
                counts[record["peer_id"]] += 1
    return counts


async def test_four_daemons_find_each_other_filter_and_list_methods(autojump_clock, tmp_path):
    from daemon.resources import detect_resources  # this machine's, as a daemon process sees

    async with memory_cluster(tmp_path, 4, detect_resources=detect_resources) as net:
        assert sorted((await found_counts(net)).values()) == [4, 4, 4, 4]
        first = net.daemons[0]
        info = await first.call("node_info")
        assert info["peer_id"] == first.peer_id
        assert info["payout_address"].startswith("0x")
        assert info["resources"]["cpu"]["cores"] >= 1
        assert all(a.endswith("/p2p/" + info["peer_id"]) for a in info["listen_addrs"])
        peers = await net.daemons[1].call("node_peers")
        connected = [p for p in peers if p["connected"]]
        assert connected, peers

        async def rtt_measured() -> bool:
            peers = await net.daemons[1].call("node_peers")
            return any(p["rtt_ms"] is not None for p in peers)

        await net.wait_for(rtt_measured, 10, "an RTT measurement")
        # filters through RPC (the resources are this machine's: no GPU, as test_procs assumed)
        d = net.daemons[2]
        assert await d.call("nodes_find", {"filter": {"min_gpus": 1}}) == []
        assert len(await d.call("nodes_find", {"filter": {"min_cpu_cores": 1}})) == 4
        with pytest.raises(RPCCallError) as err:
            await d.call("nodes_find", {"filter": {"min_gpus": -1}})
        assert err.value.code == -32602
        # rpc_methods lists everything
        methods = {m["name"]: m for m in await first.call("rpc_methods")}
        for name in ("node_info", "node_peers", "node_connect", "nodes_find", "node_shutdown"):
            assert methods[name]["description"]
        assert methods["node_connect"]["params"][0]["name"] == "multiaddr"


async def test_killed_daemon_disappears_and_restart_keeps_identity(autojump_clock, tmp_path):
    """The stale daemon.json a SIGKILLed process leaves is test_procs.py's business."""
    async with memory_cluster(tmp_path, 3) as net:
        validity_s = net.daemons[0].daemon.config.resources.record_validity_s
        victim = net.daemons[2]
        net.kill(victim)
        killed_at = trio.current_time()

        async def gone() -> bool:
            for d in net.daemons[:2]:
                if victim.peer_id in {r["peer_id"] for r in await d.call("nodes_find", {})}:
                    return False
            return True

        await net.wait_for(gone, 2 * validity_s + 5, "the killed daemon to vanish", poll_s=0.2)
        assert trio.current_time() - killed_at <= 2 * validity_s + 1
        restarted = await net.restart(victim, bootstrap=[net.daemons[0].addr])
        assert restarted.peer_id == victim.peer_id
        await net.wait_for(net.all_found, 30, "all 3 daemons to find each other")


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
        await net.deploy(model_dir, servers, [(0, 2), (2, 4), (2, 4), (4, 6)])
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


# -- moved from test_shard_procs.py (gRPC, the CLI and same-host sockets stay there) ------------

NEW_TOKENS = 24


async def test_three_daemons_generate_exactly_the_single_process_tokens(
    autojump_clock, tmp_path, one_torch_thread
):
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    torch = one_torch_thread
    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, NEW_TOKENS)
    async with memory_cluster(tmp_path / "net", 3) as net:
        await net.deploy(model_dir, net.daemons, [(0, 2), (2, 4), (4, 6)])
        served = (await net.daemons[1].call("block_list", {}))["local"][0]

        async def in_dht_record() -> bool:  # served ranges also travel in the DHT record
            records = await net.daemons[0].call("nodes_find", {})
            mine = [r for r in records if r["peer_id"] == net.daemons[1].peer_id]
            blocks = mine[0]["resources"].get("blocks") if mine else None
            return (
                bool(blocks)
                and blocks[0]["start"] == 2
                and blocks[0]["model"] == "tiny"
                and blocks[0]["cache_tokens_free"] > 0
            )

        await net.wait_for(in_dht_record, 15, "the served range in the DHT record")
        whole = load_model(model_dir).nbytes()
        # a daemon serving 2 of 6 layers (no embedding, no head) holds about a third of them
        assert served["parameters_bytes"] < whole / 2
        result = await net.daemons[2].call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}
        )
        assert result["error"] is None
        assert result["tokens"] == expected
        assert [h["peer_id"] for h in result["route"]] == [d.peer_id for d in net.daemons]
        assert result["forwarding"] == "chained"  # each server pushed to the next
        # the same with the client relaying every hop instead of servers pushing on
        relayed = await net.daemons[2].call(
            "generate",
            {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS, "relay": True},
        )
        assert relayed["tokens"] == expected and relayed["forwarding"] == "relayed"
        # every server announces its free KV cache (positions a new session could hold)
        listed = await net.daemons[2].call("block_list", {"model": "tiny"})
        announced = listed["announced"]["tiny"]
        assert all(s["cache_tokens_free"] > NEW_TOKENS for s in announced), announced
        # text prompts work on a serving node (it has the tokenizer)
        text = await net.daemons[0].call(
            "generate", {"model": "tiny", "prompt": bytes(PROMPT).decode(), "max_tokens": 4}
        )
        assert text["tokens"] == expected[:4]
        with pytest.raises(RPCCallError) as err:
            await net.daemons[0].call("generate", {"model": "tiny", "token_ids": [1] * 600})
        assert "max_length must be 1..512" in str(err.value)
        # undeploy withdraws the announcement everywhere
        assert (await net.daemons[2].call("block_undeploy", {"model": "tiny"}))["unloaded"]

        async def withdrawn() -> bool:
            listed = await net.daemons[0].call("block_list", {"model": "tiny"})
            return len(listed["announced"]["tiny"]) == 2

        await net.wait_for(withdrawn, 10, "the withdrawal to replicate")
        assert (await net.daemons[2].call("block_list", {}))["local"] == []
