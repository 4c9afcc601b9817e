"""The OpenAI-compatible endpoint on 3 whole daemons on the in-memory network (virtual
clock), driven with raw HTTP: chat and completions, streamed and not, n > 1, logprobs, stop
strings, seeds, greedy parity with the single-process model, /v1/models."""

from __future__ import annotations

import pytest

from tests.daemon.harness import inline_threads
from tests.daemon.serving.openai_helpers import (
    EOS,
    request,
    serving_cluster,
    streamed_text,
    tiny_with_template,
)

torch = pytest.importorskip("torch")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
PROMPT = list(b"a network of shards")


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def chat(content: str = "hello", **extra):
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **extra}


async def test_chat_and_completions_streamed_and_not_with_parity(autojump_clock, tmp_path):
    from daemon.shards.model import greedy_generate, load_model

    model_dir = tiny_with_template(tmp_path)
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, 12)
    cut = expected.index(EOS) if EOS in expected else len(expected)
    want = bytes(t for t in expected[:cut] if t < 256).decode("utf-8", errors="replace")
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        server = net.daemons[1].daemon.openai
        models = await request(server, "GET", "/v1/models")
        assert models.status == 200
        assert [m["id"] for m in models.json()["data"]] == ["tiny"]
        assert models.json()["object"] == "list"

        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        done = await request(server, "POST", COMPLETIONS, body)
        assert done.status == 200, done.body
        doc = done.json()
        assert doc["object"] == "text_completion" and doc["model"] == "tiny"
        assert doc["id"].startswith("cmpl-")
        (choice,) = doc["choices"]
        assert choice["text"] == want
        assert choice["finish_reason"] == ("stop" if cut < 12 else "length")
        assert choice["logprobs"] is None and choice["index"] == 0
        assert doc["usage"] == {
            "prompt_tokens": len(PROMPT),
            "completion_tokens": min(cut + 1, 12),
            "total_tokens": len(PROMPT) + min(cut + 1, 12),
        }

        streamed = await request(server, "POST", COMPLETIONS, {**body, "stream": True})
        assert streamed.status == 200
        assert streamed.headers["content-type"] == "text/event-stream"
        assert streamed.events[-1] == "[DONE]"
        assert streamed_text(streamed.events, chat=False) == want
        assert all(e["object"] == "text_completion" for e in streamed.events[:-1])

        reply = await request(server, "POST", CHAT, chat(max_tokens=8, temperature=0))
        assert reply.status == 200, reply.body
        doc = reply.json()
        assert doc["object"] == "chat.completion" and doc["id"].startswith("chatcmpl-")
        (choice,) = doc["choices"]
        assert choice["message"]["role"] == "assistant"
        prompt = "<|begin_of_text|><user>hello\n<assistant>"
        assert doc["usage"]["prompt_tokens"] == len(prompt.encode()) - len("<|begin_of_text|>") + 1

        opts = {"stream_options": {"include_usage": True}}
        stream = await request(
            server, "POST", CHAT, chat(max_tokens=8, temperature=0, stream=True, **opts)
        )
        events = stream.events
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert events[0]["object"] == "chat.completion.chunk"
        assert streamed_text(events) == choice["message"]["content"]
        finish = [c["finish_reason"] for e in events[:-2] for c in e["choices"]]
        assert finish[-1] == choice["finish_reason"] and set(finish[:-1]) == {None}
        assert events[-2]["choices"] == [] and events[-2]["usage"] == doc["usage"]
        assert events[-1] == "[DONE]"
        assert net.daemons[1].metric("gridmesh_serving_requests_total", status="200") == 5
        assert net.daemons[1].metric("gridmesh_serving_tokens_total", direction="out") > 0
        assert net.daemons[1].metric("gridmesh_serving_time_to_first_token_seconds_count") == 4
