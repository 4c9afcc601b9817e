"""The official `openai` Python client against a devnet of 3 real daemon processes serving
the tiny model over all three: chat and completions, streamed and not, n > 1, logprobs, stop
strings, a seed giving identical output twice, a client that leaves mid-stream, and errors
raised as the client's own exception classes."""

from __future__ import annotations

import pytest

from daemon.config import REPO_CONFIGS
from daemon.devnet import Devnet, wait_for
from tests.daemon.serving.openai_helpers import EOS, LAYERS, tiny_with_template

openai = pytest.importorskip("openai")
pytest.importorskip("torch")

pytestmark = pytest.mark.procs

KEY = "test-key-" + "k" * 24
SMALL = "small-key-" + "s" * 24  # 50 tokens a day


def _config(tmp_path):
    text = (REPO_CONFIGS / "devnet.toml").read_text()
    text += f"""
[serving]
openai = true
port = 0
require_keys = true
api_keys = [
  {{ name = "tester", key = "{KEY}" }},
  {{ name = "small", key = "{SMALL}", tokens_per_day = 50 }},
]
"""
    path = tmp_path / "serving.toml"
    path.write_text(text)
    return path


def test_the_openai_client_against_three_daemons(tmp_path):
    model_dir = tiny_with_template(tmp_path)
    with Devnet(3, root=tmp_path / "net", config=_config(tmp_path)) as net:
        net.wait_all_found()
        node0, node1, node2 = net.daemons
        plan = [
            {"peer_id": d.peer_id, "start": i * LAYERS // 3, "end": (i + 1) * LAYERS // 3}
            for i, d in enumerate(net.daemons)
        ]
        deployed = node0.call(
            "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
        )
        assert deployed["ok"], deployed

        def all_announced() -> bool:
            listed = node1.call("block_list", {"model": "tiny"})["announced"].get("tiny", [])
            return len(listed) == 3

        wait_for(all_announced, 20, "every shard to be announced")
        url = node1.info["openai_url"]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/v1")
        assert node1.call("node_info")["openai_url"] == url  # what `gridmesh serve` prints
        client = openai.OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=30)
        assert [m.id for m in client.models.list()] == ["tiny"]

        messages = [{"role": "user", "content": "hello there"}]
        no_eos = {"logit_bias": {str(EOS): -100}}
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, **no_eos
        )
        text = reply.choices[0].message.content
        assert reply.choices[0].finish_reason == "length" and len(text) > 0
        assert reply.usage.completion_tokens == 8
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=messages,
                max_tokens=8,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                **no_eos,
            )
        )
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
        assert chunks[-1].usage.completion_tokens == 8

        done = client.completions.create(
            model="tiny", prompt="abc", max_tokens=6, temperature=0, logprobs=2, **no_eos
        )
        assert len(done.choices[0].logprobs.tokens) == 6
        streamed = client.completions.create(
            model="tiny", prompt="abc", max_tokens=6, temperature=0, stream=True, **no_eos
        )
        assert "".join(c.choices[0].text for c in streamed) == done.choices[0].text

        seeded = {
            "model": "tiny",
            "messages": messages,
            "max_tokens": 8,
            "n": 2,
            "seed": 7,
            **no_eos,
        }
        first = client.chat.completions.create(**seeded)
        second = client.chat.completions.create(**seeded)
        assert [c.message.content for c in first.choices] == [
            c.message.content for c in second.choices
        ]
        assert len(first.choices) == 2

        long_text = client.completions.create(
            model="tiny", prompt="abc", max_tokens=30, temperature=0, **no_eos
        )
        full = long_text.choices[0].text
        stop = full[4:6]
        cut = client.completions.create(
            model="tiny", prompt="abc", max_tokens=30, temperature=0, stop=stop, **no_eos
        )
        assert cut.choices[0].text == full[: full.index(stop)]
        assert cut.choices[0].finish_reason == "stop"

        lp = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=3, logprobs=True, top_logprobs=2, **no_eos
        )
        assert len(lp.choices[0].logprobs.content) == 3

        # a client that leaves mid-stream: its session ends on every shard server at once,
        # seen as each server's KV cache coming back (idle sessions are reaped only after 30 s)
        def free() -> list[int]:
            return [d.call("block_list", {})["local"][0]["cache_tokens_free"] for d in net.daemons]

        idle = free()
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=400, stream=True, **no_eos
        )
        chunks = iter(stream)
        next(chunks), next(chunks)  # the role, then the first text
        held = free()
        assert all(h < i for h, i in zip(held, idle, strict=True)), (held, idle)
        stream.close()
        wait_for(lambda: free() == idle, 5, "every server's session to end")

        def counted() -> bool:
            gone = node1.metric("gridmesh_rejected_messages_total", reason="client_gone")
            return gone >= 1 and node1.metric("gridmesh_serving_requests_total", status="499") >= 1

        # counted once however the daemon saw it (test_openai_gone: every way out)
        wait_for(counted, 5, "the client gone to be counted")
        assert node1.metric("gridmesh_rejected_messages_total", reason="client_gone") == 1
        assert node1.metric("gridmesh_serving_requests_total", status="499") == 1
        assert node1.metric("gridmesh_rejected_messages_total", reason="internal_error") == 0

        with pytest.raises(openai.NotFoundError) as missing:
            client.chat.completions.create(model="nope", messages=messages)
        assert missing.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            client.chat.completions.create(model="tiny", messages=messages, temperature=7)
        assert bad.value.param == "temperature"
        with pytest.raises(openai.BadRequestError) as long:
            client.chat.completions.create(model="tiny", messages=messages, max_tokens=10_000)
        assert long.value.code == "context_length_exceeded"
        wrong = openai.OpenAI(base_url=url, api_key="wrong-" + "w" * 30, max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        small = openai.OpenAI(base_url=url, api_key=SMALL, max_retries=0)
        with pytest.raises(openai.RateLimitError) as quota:
            small.completions.create(model="tiny", prompt="abc", max_tokens=100)
        assert quota.value.code == "insufficient_quota"
