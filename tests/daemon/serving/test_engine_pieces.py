"""The engine's pipeline from generated tokens to pieces (daemon.serving.engine), with the
network's generation replaced by a script of tokens: incremental detokenization (never half a
UTF-8 character), stop strings (held back until decided, never emitted, flushed at an eos),
finish reasons, usage and logprobs."""

from __future__ import annotations

import pytest
import trio

from daemon.metrics import Metrics
from daemon.serving.engine import Engine, Plan, Usage
from daemon.shards.jobs import JobTable

pytest.importorskip("torch")

EOS = 257


@pytest.fixture
def text(tmp_path):
    from daemon.serving.text import ModelText
    from daemon.shards.model import make_tiny

    return ModelText.load(make_tiny(tmp_path / "tiny", layers=1))


def _script(tokens: list[int], seen: list[int]):
    async def run_generation(service, job, model, ids, max_new, *, sampler, on_token, eos_ids):
        from daemon.serving.sampling import Sampled

        for token in tokens[:max_new]:
            await trio.sleep(0.001)  # a step's round trip: where a cancel lands
            seen.append(token)
            await on_token(Sampled(token, -0.25, [(token, -0.25)]))
            if token in eos_ids:
                break
        job.done = True
        return job

    return run_generation


async def _run(monkeypatch, text, tokens, *, stops=(), max_tokens=50, logprobs=False):
    from daemon.serving.sampling import SamplingParams
    from daemon.shards import generation

    seen: list[int] = []
    monkeypatch.setattr(generation, "run_generation", _script(tokens, seen))
    engine = Engine(JobTable(), Metrics())
    plan = Plan(
        model="tiny",
        text=text,
        prompt_ids=[1, 2, 3],
        max_tokens=max_tokens,
        n=1,
        params=SamplingParams(temperature=0, logprobs=logprobs, top_logprobs=int(logprobs)),
        vocab=258,
        stops=list(stops),
        logprobs=logprobs,
        top_logprobs=int(logprobs),
    )
    usage = Usage(3)
    pieces = []
    async with engine.run(plan, "me", usage) as channel:
        async for piece in channel:
            pieces.append(piece)
    return pieces, usage, seen


async def test_a_held_back_stop_prefix_is_flushed_at_an_eos(autojump_clock, monkeypatch, text):
    pieces, usage, _ = await _run(monkeypatch, text, [*b"abc", EOS, *b"zz"], stops=["cd"])
    assert "".join(p.text for p in pieces) == "abc"
    assert [p.text for p in pieces][-1] == "c"  # held back until the eos decided it
    assert pieces[-1].finish_reason == "stop" and usage.completion_tokens == 4


async def test_a_stop_string_cuts_and_ends_the_generation(autojump_clock, monkeypatch, text):
    tokens = list(b"hello world, and more")
    pieces, usage, seen = await _run(monkeypatch, text, tokens, stops=["o w", "xyz"])
    assert "".join(p.text for p in pieces) == "hell"
    assert pieces[-1].finish_reason == "stop"
    assert len(seen) == len(b"hello w")  # cancelled at once: no more steps
    assert usage.completion_tokens == len(seen)


async def test_utf8_split_over_tokens_is_never_emitted_in_halves(autojump_clock, monkeypatch, text):
    word = "héllo €".encode()
    pieces, _, _ = await _run(monkeypatch, text, list(word), max_tokens=len(word))
    emitted = [p.text for p in pieces if p.text]
    assert "".join(emitted) == "héllo €"
    assert all("\ufffd" not in t for t in emitted)
    assert pieces[-1].finish_reason == "length"


async def test_logprobs_name_each_token_with_its_bytes(autojump_clock, monkeypatch, text):
    pieces, _, _ = await _run(monkeypatch, text, [*"é".encode(), EOS], logprobs=True)
    infos = [info for p in pieces for info in p.tokens]
    assert [info.data for info in infos] == [b"\xc3", b"\xa9", b""]
    assert [info.logprob for info in infos] == [-0.25] * 3
    assert infos[0].top == [("\ufffd", b"\xc3", -0.25)]


def test_a_chat_without_max_tokens_gets_a_bounded_default(text):
    import dataclasses

    from daemon.serving.engine import DEFAULT_MAX_TOKENS
    from daemon.serving.openai_wire import ChatRequest, decode

    engine = Engine(JobTable(), Metrics())
    text.context_length = 1 << 20  # a long-context model
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}'
    request = decode(body, ChatRequest)  # planned from the prompt ids given below
    plan = engine._plan(request, text, 258, [1, 2, 3], request.limit(), False, 0)
    assert plan.max_tokens == DEFAULT_MAX_TOKENS
    text.defaults = dataclasses.replace(text.defaults, max_new_tokens=50)
    assert engine._plan(request, text, 258, [1, 2, 3], None, False, 0).max_tokens == 50
    text.context_length = 40  # the context bounds it too
    assert engine._plan(request, text, 258, [1, 2, 3], None, False, 0).max_tokens == 37
