"""The OpenAI-compatible endpoint on 3 whole daemons on the in-memory network (virtual
clock), driven with raw HTTP: chat and completions, streamed and not, n > 1, logprobs, stop
strings, seeds, greedy parity with the single-process model, /v1/models."""

from __future__ import annotations

import pytest
import trio

from daemon.api.httpio import WRITE_TIMEOUT_S
from tests.daemon.harness import inline_threads
from tests.daemon.serving.openai_helpers import (
    EOS,
    NO_EOS,
    Client,
    connect,
    request,
    serving_cluster,
    sessions,
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


async def test_n_logprobs_stop_strings_and_seeds(autojump_clock, tmp_path):
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        server = net.daemons[0].daemon.openai
        sampled = chat(max_tokens=10, temperature=1.0, seed=1234, n=3, **NO_EOS)
        first = await request(server, "POST", CHAT, sampled)
        again = await request(server, "POST", CHAT, sampled)
        assert first.status == 200, first.body
        texts = [c["message"]["content"] for c in first.json()["choices"]]
        assert texts == [c["message"]["content"] for c in again.json()["choices"]]
        assert [c["index"] for c in first.json()["choices"]] == [0, 1, 2]
        assert len(set(texts)) > 1  # each choice draws from its own seed
        other = await request(server, "POST", CHAT, {**sampled, "seed": 99})
        assert [c["message"]["content"] for c in other.json()["choices"]] != texts
        assert first.json()["usage"]["completion_tokens"] == 30

        # streamed with the same seed: the same text, choice by choice
        stream = await request(server, "POST", CHAT, {**sampled, "stream": True})
        roles = [e for e in stream.events[:-1] if e["choices"][0]["delta"].get("role")]
        assert sorted(e["choices"][0]["index"] for e in roles) == [0, 1, 2]
        assert [streamed_text(stream.events, i) for i in range(3)] == texts

        lp = chat(max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, **NO_EOS)
        reply = (await request(server, "POST", CHAT, lp)).json()
        content = reply["choices"][0]["logprobs"]["content"]
        assert len(content) == 6
        for item in content:
            assert item["logprob"] <= 0 and len(item["top_logprobs"]) == 3
            assert item["top_logprobs"][0]["logprob"] >= item["top_logprobs"][-1]["logprob"]
            assert bytes(item["bytes"]).decode("utf-8", "replace") == item["token"]
            # greedy: the token chosen is the most likely one
            assert item["logprob"] == pytest.approx(item["top_logprobs"][0]["logprob"])
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 5, "temperature": 0, "logprobs": 2}
        done = (await request(server, "POST", COMPLETIONS, {**body, **NO_EOS})).json()
        logprobs = done["choices"][0]["logprobs"]
        assert len(logprobs["tokens"]) == 5 and len(logprobs["token_logprobs"]) == 5
        assert all(len(top) <= 2 for top in logprobs["top_logprobs"])
        assert logprobs["text_offset"][0] == 0

        # stop strings: the text up to the first occurrence, the stop itself left out
        long = {"model": "tiny", "prompt": "abc", "max_tokens": 40, "temperature": 0, **NO_EOS}
        full = (await request(server, "POST", COMPLETIONS, long)).json()["choices"][0]["text"]
        stop = full[5:7]
        cut = (
            await request(server, "POST", COMPLETIONS, {**long, "stop": [stop, "\u2603"]})
        ).json()
        assert cut["choices"][0]["text"] == full[: full.index(stop)]
        assert cut["choices"][0]["finish_reason"] == "stop"
        assert cut["usage"]["completion_tokens"] < 40
        streamed = await request(
            server, "POST", COMPLETIONS, {**long, "stop": stop, "stream": True}
        )
        assert streamed_text(streamed.events, chat=False) == full[: full.index(stop)]
        # every generation has ended: no session is left open on any shard server
        await net.wait_for(lambda: _no_sessions(net), 1, "sessions to close")


async def _no_sessions(net) -> bool:
    return sessions(net) == 0


def _error(reply, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert reply.status == status, (reply.status, reply.body[:500])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


async def test_bad_requests_get_openai_errors_and_the_daemon_serves_on(autojump_clock, tmp_path):
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        server = net.daemons[2].daemon.openai
        error = _error(
            await request(server, "POST", CHAT, {**chat(), "model": "nope"}),
            404,
            "model",
            "model_not_found",
        )
        assert error["type"] == "invalid_request_error"
        _error(await request(server, "POST", COMPLETIONS, b"{not json"), 400)
        _error(await request(server, "POST", CHAT, chat(n="3")), 400, "n")
        _error(await request(server, "POST", CHAT, chat(n=10_000)), 400, "n")
        _error(await request(server, "POST", CHAT, chat(temperature=5)), 400, "temperature")
        _error(await request(server, "POST", CHAT, chat(max_tokens=10**12)), 400, "max_tokens")
        _error(
            await request(server, "POST", CHAT, chat(max_tokens=600)),
            400,
            "max_tokens",
            "context_length_exceeded",
        )
        long_prompt = {"model": "tiny", "prompt": [1] * 512, "max_tokens": 1}
        _error(
            await request(server, "POST", COMPLETIONS, long_prompt),
            400,
            code="context_length_exceeded",
        )
        _error(
            await request(server, "POST", CHAT, chat(repetition_penalty=-1)),
            400,
            "repetition_penalty",
        )
        _error(
            await request(server, "POST", CHAT, chat(presence_penalty=-3)), 400, "presence_penalty"
        )
        _error(await request(server, "POST", CHAT, chat(top_k=-2)), 400, "top_k")
        _error(await request(server, "POST", CHAT, chat(bogus_field=1)), 400, "bogus_field")
        _error(
            await request(server, "POST", CHAT, chat(tools=[{"type": "function"}])), 400, "tools"
        )
        _error(
            await request(server, "POST", CHAT, chat(logit_bias={"999999": 5})), 400, "logit_bias"
        )
        _error(await request(server, "POST", CHAT, chat(top_logprobs=2)), 400, "top_logprobs")
        _error(await request(server, "POST", CHAT, chat(stop=["a"] * 5)), 400, "stop")
        _error(
            await request(server, "POST", CHAT, {"model": "tiny", "messages": []}), 400, "messages"
        )
        image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        _error(
            await request(server, "POST", CHAT, {"model": "tiny", "messages": image}),
            400,
            "messages",
        )
        _error(
            await request(server, "POST", COMPLETIONS, {"model": "tiny", "prompt": ["a", "b"]}),
            400,
            "prompt",
        )
        _error(
            await request(server, "POST", COMPLETIONS, {"model": "tiny", "prompt": [300]}),
            400,
            "prompt",
        )
        _error(
            await request(
                server, "POST", COMPLETIONS, {"model": "tiny", "prompt": "a", "echo": True}
            ),
            400,
            "echo",
        )
        _error(
            await request(server, "POST", CHAT, chat(stream_options={"include_usage": True})),
            400,
            "stream_options",
        )
        huge = b'{"model": "tiny", "prompt": "' + b"x" * (10 << 20) + b'"}'
        _error(await request(server, "POST", COMPLETIONS, huge), 413, code="too_large")
        _error(await request(server, "GET", CHAT), 405)
        _error(await request(server, "POST", "/v1/embeddings", {}), 404)
        # documented fields that change nothing are accepted and ignored
        harmless = chat(
            max_tokens=2, user="u1", parallel_tool_calls=False, store=False, metadata={"a": "b"}
        )
        assert (await request(server, "POST", CHAT, harmless)).status == 200
        assert net.daemons[2].metric("gridmesh_rejected_messages_total", source="openai") >= 20
        assert net.daemons[2].metric("gridmesh_serving_requests_total", status="400") >= 20


async def test_a_client_gone_mid_stream_ends_its_sessions_on_every_server(autojump_clock, tmp_path):
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        served = net.daemons[0]
        async with trio.open_nursery() as nursery:
            client = Client(connect(served.daemon.openai, nursery))
            await client.send("POST", CHAT, chat(max_tokens=400, stream=True, **NO_EOS))
            reply = await client.head()
            assert reply.status == 200
            assert (await client.next_sse(reply))["choices"][0]["delta"]["role"] == "assistant"
            assert (await client.next_sse(reply))["choices"][0]["delta"]["content"] is not None
            # mid-generation: a session on each of the 3 shard servers
            assert [len(d.daemon.shards.server.sessions) for d in net.daemons] == [1, 1, 1]
            await client.stream.aclose()
            await net.wait_for(lambda: _no_sessions(net), 0.5, "every server's session to end")
        assert served.metric("gridmesh_serving_requests_total", status="499") == 1
        assert served.metric("gridmesh_rejected_messages_total", reason="client_gone") == 1
        assert served.metric("gridmesh_serving_tokens_total", direction="out") < 400


async def test_a_reader_that_never_drains_is_paused_then_cancelled_others_are_served(
    autojump_clock, tmp_path
):
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        served = net.daemons[1]
        server = served.daemon.openai
        async with trio.open_nursery() as nursery:
            # lockstep: nothing is buffered, and this client never reads a byte
            stuck = Client(connect(server, nursery, lockstep=True))
            await stuck.send("POST", CHAT, chat(max_tokens=400, stream=True, **NO_EOS))
            await net.wait_for(lambda: _sessions_open(net), 5, "the stuck stream to start")
            started = trio.current_time()
            # everyone else is served meanwhile
            body = {"model": "tiny", "prompt": "abc", "max_tokens": 20, **NO_EOS}
            other = await request(server, "POST", COMPLETIONS, body)
            assert other.status == 200 and other.json()["usage"]["completion_tokens"] == 20
            # paused at the buffer's bound, then cancelled: its sessions end before the
            # write timeout would have closed the connection
            await net.wait_for(lambda: _no_sessions(net), 20, "the stuck generation to end")
            assert trio.current_time() - started < WRITE_TIMEOUT_S
            assert served.metric("gridmesh_serving_tokens_total", direction="out") < 400 + 20

            async def closed() -> bool:
                return (
                    served.metric("gridmesh_rejected_messages_total", reason="write_timeout") == 1
                )

            await net.wait_for(closed, WRITE_TIMEOUT_S + 5, "the stuck connection to be closed")
            assert server.connections == 0


async def _sessions_open(net) -> bool:
    return sessions(net) > 0


async def test_keys_quota_and_the_queue(autojump_clock, tmp_path):
    from daemon.api.openai_http import OpenAIServer
    from daemon.serving.access import Access
    from daemon.serving.engine import Engine
    from daemon.serving.settings import ApiKey, ServingConfig
    from daemon.shards.jobs import MAX_JOBS

    key, small = "k" * 32, "s" * 32
    settings = ServingConfig(
        openai=True,
        require_keys=True,
        api_keys=(
            ApiKey(name="alice", key=key),
            ApiKey(name="bob", key=small, tokens_per_day=100, requests_per_minute=2),
        ),
    )
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        daemon = net.daemons[0].daemon
        server = OpenAIServer(daemon.openai.engine, Access(settings), daemon.metrics)
        body = {"model": "tiny", "prompt": "abc", "max_tokens": 4}
        error = _error(await request(server, "POST", COMPLETIONS, body), 401)
        assert error["type"] == "invalid_request_error"
        wrong = {"authorization": "Bearer " + "w" * 32}
        _error(await request(server, "POST", COMPLETIONS, body, wrong), 401, code="invalid_api_key")
        _error(await request(server, "GET", "/v1/models", None, wrong), 401)
        alice = {"authorization": f"Bearer {key}"}
        assert (await request(server, "POST", COMPLETIONS, body, alice)).status == 200
        assert (await request(server, "GET", "/v1/models", None, alice)).status == 200
        bob = {"authorization": f"Bearer {small}"}
        # bob's 100 tokens a day: 3 prompt + 200 reserved up front is over
        over = {**body, "max_tokens": 200}
        error = _error(
            await request(server, "POST", COMPLETIONS, over, bob), 429, code="insufficient_quota"
        )
        assert error["type"] == "insufficient_quota"
        assert (await request(server, "POST", COMPLETIONS, body, bob)).status == 200
        # bob's 2 requests a minute are spent (the refused one counted too)
        _error(
            await request(server, "POST", COMPLETIONS, body, bob), 429, code="rate_limit_exceeded"
        )

        # the queue: every job slot taken, one request waits, the next is refused
        engine = Engine(daemon.shards, daemon.metrics, max_queue=1)
        queued = OpenAIServer(engine, daemon.openai.access, daemon.metrics)
        held = [daemon.shards.new_job("") for _ in range(MAX_JOBS)]
        results = {}

        async def waiting() -> None:
            results["waited"] = await request(queued, "POST", COMPLETIONS, body)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(waiting)
            await net.wait_for(lambda: _queued(engine), 2, "a request to wait")
            assert net.daemons[0].metric("gridmesh_serving_queue_length") == 1
            full = _error(await request(queued, "POST", COMPLETIONS, body), 429, code="queue_full")
            assert "queue is full" in full["message"]
            for job in held:
                job.done = True  # they end: the waiting request goes on
        assert results["waited"].status == 200
        assert net.daemons[0].metric("gridmesh_serving_queue_length") == 0


async def _queued(engine) -> bool:
    return engine.admission.waiting == 1


async def test_a_daemon_without_a_shard_needs_model_dirs_and_a_dead_route_is_an_error(
    autojump_clock, tmp_path
):
    from daemon.api.openai_http import OpenAIServer
    from daemon.serving.engine import Engine

    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir, holders=2) as net:
        bystander = net.daemons[2].daemon  # holds no shard: no tokenizer of its own
        assert (await request(bystander.openai, "GET", "/v1/models")).json()["data"] == []
        error = _error(
            await request(bystander.openai, "POST", CHAT, chat(max_tokens=2)),
            404,
            "model",
            "model_not_found",
        )
        assert "model_dirs" in error["message"]
        engine = Engine(bystander.shards, bystander.metrics, model_dirs={"tiny": str(model_dir)})
        given = OpenAIServer(engine, bystander.openai.access, bystander.metrics)
        assert (await request(given, "GET", "/v1/models")).json()["data"][0]["id"] == "tiny"
        assert (await request(given, "POST", CHAT, chat(max_tokens=2))).status == 200

        net.kill(net.daemons[1])  # layers 3..6 have no server left
        failed = await request(given, "POST", CHAT, chat(max_tokens=4))
        assert failed.status >= 500 and failed.json()["error"]["type"] == "server_error"
        streamed = await request(given, "POST", CHAT, chat(max_tokens=4, stream=True))
        assert streamed.status == 200  # the head went out before the route failed
        assert "error" in streamed.events[-2] and streamed.events[-1] == "[DONE]"
        # and it serves on
        assert (await request(given, "GET", "/v1/models")).status == 200


async def test_concurrent_streams_each_give_what_they_give_alone(autojump_clock, tmp_path):
    model_dir = tiny_with_template(tmp_path)
    async with serving_cluster(tmp_path / "net", model_dir) as net:
        server = net.daemons[0].daemon.openai
        bodies = [
            {
                "model": "tiny",
                "prompt": f"prompt number {i}" * (i + 1),
                "max_tokens": 6 + 3 * i,
                "temperature": 0,  # batched logits may differ in the last bits: no draws
                "stream": True,
                **NO_EOS,
            }
            for i in range(8)
        ]
        alone = [
            streamed_text((await request(server, "POST", COMPLETIONS, b)).events, chat=False)
            for b in bodies
        ]
        together: dict[int, str] = {}

        async def one(i: int) -> None:
            reply = await request(server, "POST", COMPLETIONS, bodies[i])
            together[i] = streamed_text(reply.events, chat=False)

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(one, i)
        assert [together[i] for i in range(8)] == alone
        assert net.daemons[0].metric("gridmesh_serving_inter_token_latency_seconds_count") > 0
