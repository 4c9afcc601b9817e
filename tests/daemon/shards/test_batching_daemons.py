"""Batching is exact, through whole daemons (tests/daemon/harness.py: production daemons on
the in-memory network and trio's virtual clock): 16 concurrent generations with different
prompt lengths and budgets, joining and leaving the servers' batches at different steps,
each give exactly the tokens they give alone and those of the single-process reference
(their chains of 3 hops split them into 3 micro-batches: tests/daemon/shards/test_pipeline.py
shows the pipeline itself)."""

from __future__ import annotations

import pytest
import trio

from tests.daemon.harness import memory_cluster

LAYERS = 6
SESSIONS = 16
TEXT = list(b"sixteen sessions share every decode step of the shard servers, exactly")
PROMPTS = [TEXT[: 2 + (7 * i) % 23] for i in range(SESSIONS)]  # 2..24 tokens
BUDGETS = [16 + (5 * i) % 19 for i in range(SESSIONS)]  # 16..34 tokens


COMPUTE_S = 0.002
PIPELINED = -(-SESSIONS // 3)  # the most steps in a batch: 16 sessions over chains of 3 hops


@pytest.fixture
def one_torch_thread(monkeypatch):
    """As the harness's daemons (shards.torch_threads = 1), for the reference run too; and
    `trio.to_thread` inline (virtual time), each call taking `COMPUTE_S` of virtual time:
    frames between daemons take none, so with instant compute a generation would run whole
    at one instant, and none would ever overlap another (as a real step's compute does)."""
    torch = pytest.importorskip("torch")

    async def run_sync(fn, *args, **_):
        await trio.sleep(COMPUTE_S)
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


async def test_sixteen_concurrent_generations_are_batched_and_exact(
    autojump_clock, tmp_path, one_torch_thread
):
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=13)
    whole = load_model(model_dir)
    reference = [greedy_generate([whole], p, n) for p, n in zip(PROMPTS, BUDGETS, strict=True)]
    async with memory_cluster(tmp_path / "net", 3) as net:
        await net.deploy(model_dir, net.daemons, [(0, 2), (2, 4), (4, 6)])
        servers = [d.daemon.shards.server for d in net.daemons]

        async def generate(i: int) -> list[int]:
            result = await net.daemons[i % 3].call(
                "generate",
                {
                    "model": "tiny",
                    "token_ids": PROMPTS[i],
                    "max_tokens": BUDGETS[i],
                    "client": f"user{i}",
                },
            )
            assert result["error"] is None, result
            return result["tokens"]

        alone = [await generate(i) for i in range(SESSIONS)]
        assert all(max(s.batching.batch_sizes) == 1 for s in servers)  # nothing to batch with
        # together, twice: all 16 at once; then 0-7 at once, and 8 + j as j gets its
        # (j % 4 + 2)th token, so that they join the batches at different steps (they leave
        # at different steps with their different budgets)
        for staggered in (False, True):
            together = await concurrently(net, staggered)
            for i in range(SESSIONS):
                assert alone[i] == reference[i], i
                assert together[i] == alone[i], (staggered, i)
            sizes = [server.batching.batch_sizes for server in servers]
            # they really ran together: through chains of 3 hops, as 3 micro-batches of at
            # most ceil(16 / 3) = 6 (daemon.shards.batching: pipelining), full ones mostly
            assert all(max(size) == PIPELINED for size in sizes), sizes
            assert all(s.batching.batched_steps > sum(BUDGETS) // 2 for s in servers), sizes
            if staggered:  # prompts of sessions joining late shared a pass with decode steps
                assert all(s.batching.shared_prefills > 0 for s in servers)
            assert not any(s.sessions for s in servers)
        for d, server in zip(net.daemons, servers, strict=True):  # and /metrics shows it
            shown = scraped(d.daemon.metrics.render())
            passes = sum(server.batching.batch_sizes.values())
            assert shown['gridmesh_shard_batch_size_count{model="tiny"}'] == passes
            alone_passes = server.batching.batch_sizes.get(1, 0)
            assert shown['gridmesh_shard_batch_size_bucket{le="1",model="tiny"}'] == alone_passes
            total = sum(size * n for size, n in server.batching.batch_sizes.items())
            assert shown['gridmesh_shard_batch_size_sum{model="tiny"}'] == total
            batched = shown['gridmesh_shard_batched_steps_total{model="tiny"}']
            assert batched == server.batching.batched_steps > 0
            assert shown['gridmesh_shard_sessions{model="tiny"}'] == 0  # all closed
            assert shown["gridmesh_shard_kv_cache_budget_bytes"] == server.cache_budget_bytes > 0
            assert d.daemon.shards.queue_length() == server.waiting_steps == 0


def scraped(text: bytes) -> dict[str, float]:
    """Prometheus text as {'name{labels}': value} (labels sorted, as the parser gives them)."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


async def concurrently(net, staggered: bool) -> dict[int, list[int]]:
    """The 16 generations at once (streamed jobs, polled), each from one of the daemons."""
    together: dict[int, list[int]] = {}
    started = [trio.Event() for _ in range(SESSIONS)]

    async def one(i: int) -> None:
        if staggered and i >= 8:
            await started[i - 8].wait()
        client = net.daemons[i % 3]
        params = {"model": "tiny", "token_ids": PROMPTS[i], "max_tokens": BUDGETS[i]}
        job = (await client.call("generate", {**params, "stream": True, "client": f"u{i}"}))["job"]
        client.at_token(job, i % 4 + 2, started[i].set)

        async def finished() -> dict | None:
            state = await client.call("generate_poll", {"job": job})
            return state if state["done"] else None

        state = await net.wait_for(finished, 60, f"generation {i} to end")
        assert state["error"] is None, state
        together[i] = state["tokens"]

    async with trio.open_nursery() as nursery:
        for i in range(SESSIONS):
            nursery.start_soon(one, i)
    return together


async def test_shards_max_batch_in_the_config_reaches_the_shard_server(
    autojump_clock, tmp_path, one_torch_thread
):
    """`[shards] max_batch = 1` turns batching off: concurrent generations run every step
    alone (and stay exact); the bounds of both keys are checked at load."""
    from daemon.settings import ConfigError, parse
    from daemon.shards.model import greedy_generate, load_model, make_tiny
    from tests.daemon.harness import FAST

    for bad in ({"max_batch": 0}, {"max_batch": 257}, {"batch_window_s": 2.0}):
        with pytest.raises(ConfigError, match=f"shards.{next(iter(bad))}"):
            parse({"shards": bad})
    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=13)
    reference = [greedy_generate([load_model(model_dir)], PROMPTS[i], 8) for i in range(4)]
    shards = {**FAST.get("shards", {}), "max_batch": 1, "pipeline": False}
    settings = {**FAST, "shards": shards}
    async with memory_cluster(tmp_path / "net", 1, settings=settings) as net:
        daemon = net.daemons[0]
        deployed = await daemon.call("block_deploy", {"model": "tiny", "model_dir": str(model_dir)})
        assert deployed["ok"], deployed
        server = daemon.daemon.shards.server
        assert server.max_batch == 1 and server.pipeline is False
        results: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            params = {"model": "tiny", "token_ids": PROMPTS[i], "max_tokens": 8}
            results[i] = (await daemon.call("generate", {**params, "client": f"u{i}"}))["tokens"]

        async with trio.open_nursery() as nursery:
            for i in range(4):
                nursery.start_soon(one, i)
        assert [results[i] for i in range(4)] == reference
        assert set(server.batching.batch_sizes) == {1}
