"""Issue 18's "Done means", end to end on 3 whole daemons (in memory, on the real clock:
Python blocks and policies run in sandbox worker processes), through JSON-RPC `vdag_infer`
and the OpenAI-compatible endpoint (`model` naming the vDAG):

    input -> prep (Python block; preprocessing policy)
    prep  -> gen  (the tiny model's shard chain)         } two parallel branches
    prep  -> sub  (a nested vDAG: upper -> rev)          }
    gen, sub -> join (Python block; postprocessing policy)

Four nodes: two parallel branches (gen, sub) joined by a third (join), one node a nested vDAG,
one a model shard chain. The answer must be exactly what the same composition computes in
one process: the same block and policy classes called directly, the same checkpoint run by
the single-process reference loop. The shards of the model are split over two daemons, the
blocks over all three (upper on two of them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.sandbox import load_package
from tests.daemon.harness import memory_cluster
from tests.daemon.serving.openai_helpers import SERVING, request
from tests.daemon.vdags.helpers import (
    block_package,
    edge,
    node,
    policy_package,
    rule,
    sandbox_or_skip,
    sub,
    vdag,
)
from tests.daemon.vdags.test_infer_daemons import apply_when_known

LAYERS = 4
NEW = 8
PRE = "return input_data.strip().lower()"
POST = "return {'answer': input_data, 'via': context['node']}"
POST_TEXT = "return input_data + ' [' + context['node'] + ']'"  # text, for the OpenAI endpoint


def load_class(package: Path, module: str, name: str) -> Any:
    """The class a package defines, imported here: the one-process reference only."""
    namespace: dict[str, Any] = {}
    exec(compile((package / f"{module}.py").read_text(), str(package), "exec"), namespace)
    return namespace[name]


def block_call(cls: Any, value: Any, settings: dict[str, Any] | None = None) -> Any:
    """AIOS's block contract as the sandbox adapter runs it."""
    block = cls({"block_id": "x", "settings": settings or {}, "parameters": {}})

    def result(out: Any) -> Any:
        if isinstance(out, tuple) and len(out) == 2 and isinstance(out[0], bool):
            assert out[0], out
            return out[1]
        return out

    pre = getattr(block, "on_preprocess", None)
    entries = [value] if pre is None else result(pre(value))
    entries = entries if isinstance(entries, list) else [entries]
    outs = [result(block.on_data(e)) for e in entries]
    return outs[0] if len(outs) == 1 else outs


def policy_eval(package: Path, value: Any, context: dict[str, Any]) -> Any:
    cls = load_class(package, "function", "AIOSv1PolicyRule")
    return cls("r", {}, {}).eval({}, value, context)


@dataclass
class Composition:
    """The issue's vDAG (its specs, packages and policies) and what it computes in one
    process: `expected` (JSON-RPC's output), `expected_text` (the text variant's)."""

    model_dir: Path
    packages: dict[str, Path]
    prompt: str
    pipe: dict[str, Any]
    whole: dict[str, Any]
    as_text: dict[str, Any]
    expected: Any
    expected_text: str
    prepared: str


def composition(tmp_path: Path, layers: int = LAYERS, model_dir: Path | None = None) -> Composition:
    torch = pytest.importorskip("torch")
    from daemon.shards.model import greedy_generate, load_model, load_tokenizer, make_tiny

    model_dir = model_dir or make_tiny(tmp_path / "tiny", layers=layers, seed=5)
    packages = {name: block_package(tmp_path / "blocks", name) for name in ("upper", "rev", "join")}
    pre = policy_package(tmp_path, "pre", PRE)
    post = policy_package(tmp_path, "post", POST)
    post_text = policy_package(tmp_path, "post-text", POST_TEXT)
    prompt = "  A Network Of Blocks "

    # the same composition in one process
    tokenizer = load_tokenizer(model_dir)
    prepared = block_call(
        load_class(packages["upper"], "block", "Block"), policy_eval(pre, prompt, {})
    )
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the daemons' shards
    try:
        with torch.no_grad():
            tokens = greedy_generate(
                [load_model(model_dir)], tokenizer.encode(prepared), NEW, eos_id=tokenizer.eos_id
            )
    finally:
        torch.set_num_threads(before)
    generated = {"text": tokenizer.decode(tokens), "token_ids": tokens}
    upper = load_class(packages["upper"], "block", "Block")
    rev = load_class(packages["rev"], "block", "Block")
    nested = block_call(rev, block_call(upper, prepared))
    joined = block_call(
        load_class(packages["join"], "block", "Block"),
        {"left": generated, "right": nested},
        {"sep": " || "},
    )
    pipe = vdag("pipe", [node("u", "upper"), node("r", "rev")], [edge("u", "r")], ["u"], ["r"])
    whole = vdag(
        "done",
        [
            node("prep", "upper", preprocessingPolicyRule=rule(str(pre), load_package(pre).digest)),
            node("gen", "tiny", modelParameters={"max_tokens": NEW}),
            sub("sub", "pipe:1"),
            node(
                "join", "join", postprocessingPolicyRule=rule(str(post), load_package(post).digest)
            ),
        ],
        [
            edge("prep", "gen"),
            edge("prep", "sub"),
            edge("gen", "join", inputNames=["left"]),
            edge("sub", "join", inputNames=["right"]),
        ],
        ["prep"],
        ["join"],
    )
    as_text = json.loads(json.dumps(whole))
    as_text["vdagName"] = "done-text"
    as_text["nodes"][3]["postprocessingPolicyRule"] = rule(
        str(post_text), load_package(post_text).digest
    )
    return Composition(
        model_dir=model_dir,
        packages=packages,
        prompt=prompt,
        pipe=pipe,
        whole=whole,
        as_text=as_text,
        expected=policy_eval(post, joined, {"node": "join"}),
        expected_text=policy_eval(post_text, joined, {"node": "join"}),
        prepared=prepared,
    )


# which daemon of three serves which Python block (upper on two of them)
SERVED = ((0, ["upper"]), (1, ["upper", "rev"]), (2, ["join"]))


def serve_params(c: Composition, name: str) -> dict[str, Any]:
    settings = {"sep": " || "} if name == "join" else {}
    return {"block": name, "path": str(c.packages[name]), "settings": settings}


async def test_done_means_end_to_end(tmp_path):
    await sandbox_or_skip()
    c = composition(tmp_path)
    model_dir, prompt, expected, expected_text = c.model_dir, c.prompt, c.expected, c.expected_text
    prepared = c.prepared

    async with memory_cluster(tmp_path / "net", 3, settings=SERVING) as net:
        d0, d1, d2 = net.daemons
        await net.deploy(model_dir, [d0, d1], [(0, 2), (2, LAYERS)])
        for index, names in SERVED:
            for name in names:
                await net.daemons[index].call("vdag_block_serve", serve_params(c, name))
        pipe, whole = c.pipe, c.whole
        await apply_when_known(net, d0, pipe)
        await apply_when_known(net, d0, whole)

        # d0 runs it (it holds a shard of the model: the tokenizer for the text)
        result = await d0.call("vdag_infer", {"name": "done", "input": prompt})
        assert result["output"] == expected
        assert expected["answer"].endswith(" || " + prepared.upper()[::-1])  # what it means
        steps = {s["label"]: s for s in result["steps"]}
        assert set(steps) == {"prep", "gen", "sub/u", "sub/r", "join"}
        assert steps["gen"]["instance"] == "chain"
        assert steps["join"]["instance"] == d2.peer_id
        # the two branches ran side by side: each started before the other finished
        assert steps["gen"]["started_s"] < steps["sub/u"]["finished_s"]
        assert steps["sub/u"]["started_s"] < steps["gen"]["finished_s"]
        # and again, from another daemon holding a shard: the same answer
        again = await d1.call("vdag_infer", {"name": "done", "input": prompt})
        assert again["output"] == expected

        # through the OpenAI-compatible endpoint: `model` names the vDAG (its text variant)
        as_text = c.as_text
        await apply_when_known(net, d0, as_text)
        chat = {"model": "done-text", "messages": [{"role": "user", "content": prompt}]}
        reply = await request(d0.daemon.openai, "POST", "/v1/chat/completions", chat)
        assert reply.status == 200, reply.body
        content = json.loads(reply.body)["choices"][0]["message"]["content"]
        assert content == expected_text
