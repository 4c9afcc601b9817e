"""A model's shard chain as a vDAG node, on whole daemons on the virtual clock: chained
model nodes give exactly the single-process greedy tokens, two model nodes on parallel
branches overlap in virtual time, text goes in through the serving node's tokenizer, and
a model nobody serves fails naming the node."""

from __future__ import annotations

import pytest

from daemon.api.client import RPCCallError
from tests.daemon.harness import inline_threads, memory_cluster
from tests.daemon.vdags.helpers import edge, node, vdag

LAYERS = 4
PROMPT = list(b"a vdag of shards")
NEW = 6


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


async def test_model_chain_nodes(autojump_clock, tmp_path):
    torch = pytest.importorskip("torch")
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=3)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            model = [load_model(model_dir)]
            first = greedy_generate(model, PROMPT, NEW)
            second = greedy_generate(model, first, NEW)
            short = greedy_generate(model, PROMPT, 2)
    finally:
        torch.set_num_threads(before)
    async with memory_cluster(tmp_path / "net", 3) as net:
        d0, d1, d2 = net.daemons
        await net.deploy(model_dir, [d0, d1], [(0, 2), (2, LAYERS)])
        params = {"max_tokens": NEW}
        chain = vdag(
            "chain",
            [
                node("m1", "tiny", modelParameters=params),
                node("m2", "tiny", modelParameters=params),
            ],
            [edge("m1", "m2")],
            ["m1"],
            ["m2"],
        )
        both = vdag(
            "both",
            [
                node("long", "tiny", modelParameters=params),
                node("short", "tiny", modelParameters={"max_tokens": 2}),
            ],
            [],
            ["long", "short"],
            ["long", "short"],
        )
        for spec in (chain, both):
            await d2.call("vdag_apply", {"value": spec})

        result = await d2.call("vdag_infer", {"name": "chain", "input": PROMPT})
        # m2 reads m1's {"text", "token_ids"}: its token ids
        assert result["output"]["token_ids"] == second
        steps = {s["label"]: s for s in result["steps"]}
        assert steps["m1"]["instance"] == "chain"
        assert steps["m2"]["started_s"] >= steps["m1"]["finished_s"] > 0

        # two outputs: a map by node label; the two generations overlap in virtual time
        result = await d2.call("vdag_infer", {"name": "both", "input": {"token_ids": PROMPT}})
        assert result["output"]["long"]["token_ids"] == first
        assert result["output"]["short"]["token_ids"] == short
        steps = {s["label"]: s for s in result["steps"]}
        assert steps["long"]["started_s"] == steps["short"]["started_s"] == 0
        assert steps["short"]["started_s"] < steps["long"]["finished_s"]  # overlapping
        assert steps["long"]["started_s"] < steps["short"]["finished_s"]

        # text in: encoded by a daemon holding a shard (it has the tokenizer)
        text = bytes(PROMPT).decode()
        result = await d0.call("vdag_infer", {"name": "chain", "input": text})
        assert result["output"]["token_ids"] == second
        # a new version is what the next request runs (plans are cached until the registry
        # changes); the old one stays callable by its version
        newer = {**chain, "vdagVersion": "2"}
        newer["nodes"] = [
            node("m1", "tiny", modelParameters={"max_tokens": 2}),
            node("m2", "tiny", modelParameters={"max_tokens": 2}),
        ]
        await d2.call("vdag_apply", {"value": newer})
        result = await d2.call("vdag_infer", {"name": "chain", "input": PROMPT})
        assert result["vdag"] == "chain:2" and len(result["output"]["token_ids"]) == 2
        result = await d2.call("vdag_infer", {"name": "chain", "version": "1", "input": PROMPT})
        assert result["vdag"] == "chain:1" and result["output"]["token_ids"] == second
        # a wrong input for a model node, and the model withdrawn: errors name the node
        with pytest.raises(RPCCallError) as info:
            await d2.call("vdag_infer", {"name": "chain", "input": {"nothing": 1}})
        assert info.value.data["node"] == "m1"
        assert "a model node takes text" in info.value.message
        for daemon in (d0, d1):
            await daemon.call("block_undeploy", {"model": "tiny"})

        async def refused_now() -> str:
            try:
                await d2.call("vdag_infer", {"name": "chain", "input": PROMPT})
            except RPCCallError as exc:
                return exc.message
            return ""

        message = await net.wait_for(refused_now, 10, "the model to be withdrawn")
        assert "'m1'" in message
