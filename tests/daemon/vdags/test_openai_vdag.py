"""The OpenAI-compatible endpoint with `model` naming a vDAG (whole daemons in memory, the
virtual clock): a chat completion and a completion answered with the vDAG's text output,
the same text as vdag_infer gives; a served model stays the engine's; streaming refused;
a failing vDAG answered in OpenAI's shape naming the node."""

from __future__ import annotations

import json

import pytest

from tests.daemon.harness import inline_threads
from tests.daemon.serving.openai_helpers import request, serving_cluster, tiny_with_template
from tests.daemon.vdags.helpers import edge, node, vdag


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


CHAIN = vdag(
    "story",
    [
        node("first", "tiny", modelParameters={"max_tokens": 4}),
        node("second", "tiny", modelParameters={"max_tokens": 3}),
    ],
    [edge("first", "second")],
    ["first"],
    ["second"],
)


async def test_model_naming_a_vdag(autojump_clock, tmp_path):
    pytest.importorskip("torch")
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        daemon = net.daemons[1]
        server = daemon.daemon.openai
        await daemon.call("vdag_apply", {"value": CHAIN})
        expected = await daemon.call("vdag_infer", {"name": "story", "input": "once upon"})
        text = expected["output"]["text"]
        assert isinstance(text, str) and len(expected["output"]["token_ids"]) <= 3

        chat = {"model": "story", "messages": [{"role": "user", "content": "once upon"}]}
        reply = await request(server, "POST", "/v1/chat/completions", chat)
        assert reply.status == 200, reply.body
        doc = json.loads(reply.body)
        assert doc["object"] == "chat.completion" and doc["model"] == "story"
        assert doc["choices"][0]["message"] == {"role": "assistant", "content": text}
        reply = await request(
            server, "POST", "/v1/completions", {"model": "story", "prompt": "once upon"}
        )
        assert reply.status == 200, reply.body
        assert json.loads(reply.body)["choices"][0]["text"] == text
        # a served model is still the engine's
        reply = await request(
            server, "POST", "/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2}
        )
        assert reply.status == 200 and json.loads(reply.body)["id"].startswith("cmpl-")
        assert "vdag" not in json.loads(reply.body)["id"]
        # refusals in OpenAI's shape
        reply = await request(server, "POST", "/v1/chat/completions", {**chat, "stream": True})
        assert reply.status == 400
        assert json.loads(reply.body)["error"]["param"] == "stream"
        reply = await request(server, "POST", "/v1/chat/completions", {**chat, "model": "nope"})
        assert reply.status == 404  # neither a model nor a vDAG
        bad = {**chat, "messages": [{"role": "user", "content": "x" * 600}]}
        reply = await request(server, "POST", "/v1/chat/completions", bad)
        error = json.loads(reply.body)["error"]
        assert reply.status == 503 and "vDAG node 'first' failed" in error["message"]
        assert daemon.metric("gridmesh_serving_requests_total", status="200") >= 3
