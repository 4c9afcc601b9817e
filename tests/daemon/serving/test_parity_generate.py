"""Parity of the OpenAI endpoint with Hugging Face transformers, end to end.

The endpoint runs on whole daemons on the in-memory network, the model split over 3 of them
(and 2 for the plain tiny checkpoint: every token crosses the network), and is compared with
transformers in this process:
`AutoTokenizer.apply_chat_template(messages, add_generation_prompt=True)` for the prompt ids,
then `LlamaForCausalLM.generate` with transformers' own eos handling (generation_config.json's
eos ids, a list here) — `do_sample=False` for greedy, and `torch.manual_seed(seed)` then
`generate(do_sample=True, temperature=, top_k=, top_p=, min_p=, repetition_penalty=)` for a
request with that `seed`. Two checkpoints: a tiny Llama whose tokenizer is a byte-level BPE
trained by the test with a real chat template (ChatML, Llama 3 style), and the plain tiny
checkpoint with its byte tokenizer and make_tiny's own chat template.

What must be equal: the reply's text == `tokenizer.decode(transformers' ids,
skip_special_tokens=True)`; its token ids == transformers'. The endpoint does not send ids,
so each token of the reply's logprobs (a final eos included) must have the bytes of
transformers' token at that position and its log probability under the model within 1e-5,
and its top_logprobs transformers' 5 most likely tokens with theirs; `usage.completion_tokens`
== the number of transformers' tokens, `usage.prompt_tokens` == the length of
`apply_chat_template`'s ids; finish_reason "stop" when transformers ended on an eos, else
"length". (The logits themselves come from our shard chain, equal to transformers' within
float32 rounding; the tokens drawn from them are the same.)

Bit for bit with transformers' sampling (the same tokens under the same seed): `temperature`
(0 = greedy), `top_k` (1 and past the vocabulary included), `top_p`, `min_p`,
`repetition_penalty` (above and below 1), each alone and all combined, greedy with
repetition_penalty; `seed` for choice 0 (`n > 1`: choice k > 0 draws from a seed
of its own, which transformers has no counterpart for). `presence_penalty`,
`frequency_penalty` and `logit_bias` have no counterpart in transformers' `generate` and are
not compared here (tests/daemon/serving/test_sampling.py checks them by hand).
Also: a stop string ends the reply at the token where transformers' own
`generate(stop_strings=...)` ends (usage counts as many tokens), its text the text before the
stop string, finish_reason "stop" (a stop string only begun at the end is sent whole);
max_tokens ends it with "length", an eos with "stop" (the eos is counted, not in the text).
A request naming no sampling parameter samples with generation_config.json's temperature,
top_k, top_p, min_p, repetition_penalty as transformers' `generate()` does, except that a config
that names no top_k gets none from the endpoint (vLLM's reading) and transformers 5's own
default of 50 from `generate()`.
"""

from __future__ import annotations

import json

import pytest

from daemon.serving.text import ModelText
from daemon.shards import model as m
from daemon.shards.model.tiny import TINY_CHAT_TEMPLATE
from tests.daemon.harness import inline_threads
from tests.daemon.serving.openai_helpers import LAYERS, request, serving_cluster, streamed_text
from tests.daemon.serving.parity_helpers import (
    TOP,
    Expected,
    Reference,
    bpe_tiny,
    chat_tokens,
    completion_tokens,
)
from tests.daemon.serving.text_helpers import CHATS

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
NEW = 24
SAMPLED = {
    "temperature": {"temperature": 1.0},
    "temperature-0.7": {"temperature": 0.7},
    "top_k": {"temperature": 1.0, "top_k": 10},
    "top_p": {"temperature": 1.0, "top_p": 0.6},
    "min_p": {"temperature": 1.0, "min_p": 0.5},
    "repetition_penalty": {"temperature": 1.0, "repetition_penalty": 1.5},
    "repetition_reward": {"temperature": 1.0, "repetition_penalty": 0.8},
    "top_k-1": {"temperature": 1.0, "top_k": 1},
    "top_k-past-vocab": {"temperature": 2.0, "top_k": 100000},
    "all": {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.8,
        "min_p": 0.05,
        "repetition_penalty": 1.3,
    },
}
GREEDY = {"greedy": {"temperature": 0}, "greedy-rp": {"temperature": 0, "repetition_penalty": 1.3}}
SEEDS = (0, 7)


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    path = bpe_tiny(tmp_path_factory.mktemp("parity") / "bpe")
    return path, Reference.load(path)


def body(kind: str, prompt: object, params: dict, seed: int | None, **extra: object) -> dict:
    key = "messages" if kind == CHAT else "prompt"
    out = {"model": "tiny", key: prompt, "max_tokens": NEW, **params, **extra}
    if seed is not None:
        out["seed"] = seed
    return out


def check_chat(doc: dict, want: Expected) -> None:
    (choice,) = doc["choices"]
    assert choice["message"]["content"] == want.text
    assert choice["finish_reason"] == want.finish_reason
    assert doc["usage"] == want.usage()
    want.check_tokens(chat_tokens(choice))


def check_completion(doc: dict, want: Expected) -> None:
    (choice,) = doc["choices"]
    assert choice["text"] == want.text
    assert choice["finish_reason"] == want.finish_reason
    assert doc["usage"] == want.usage()
    want.check_tokens(completion_tokens(choice), legacy=True)


def streamed_chat_tokens(events: list) -> list[tuple[bytes, float]]:
    out = []
    for event in events:
        if event == "[DONE]" or not event.get("choices"):
            continue
        logprobs = event["choices"][0].get("logprobs")
        out += [(bytes(t["bytes"]), t["logprob"]) for t in (logprobs or {}).get("content") or []]
    return out


async def test_chat_greedy_and_sampled_equal_transformers(autojump_clock, tmp_path, bpe):
    path, ref = bpe
    cases = []  # (messages, params, seed, expected)
    for messages in (CHATS[0], CHATS[1]):
        prompt = ref.chat_ids(messages)
        for params in GREEDY.values():
            cases.append((messages, params, None, ref.generate(prompt, NEW, params)))
    prompt = ref.chat_ids(CHATS[0])
    for params in SAMPLED.values():
        for seed in SEEDS:
            cases.append((CHATS[0], params, seed, ref.generate(prompt, NEW, params, seed)))
    greedy = cases[0][3].ids
    assert any(c[3].ids != greedy for c in cases if c[2] is not None)  # they do sample
    text = ModelText.load(path)  # what the endpoint renders with: apply_chat_template's ids
    assert all(text.chat_ids(c[0]) == c[3].prompt for c in cases)
    async with serving_cluster(tmp_path / "net", path) as net:
        server = net.daemons[0].daemon.openai
        for messages, params, seed, want in cases:
            doc = body(CHAT, messages, params, seed, logprobs=True, top_logprobs=TOP)
            reply = await request(server, "POST", CHAT, doc)
            assert reply.status == 200, reply.body
            check_chat(reply.json(), want)
            want.check_top(reply.json()["choices"][0])  # the model's top 5 at each step
        # streamed: the same text and tokens; no logprobs asked: the same text
        for messages, params, seed, want in (cases[0], cases[-1]):
            extra = {"stream": True, "logprobs": True}
            streamed = await request(
                server, "POST", CHAT, body(CHAT, messages, params, seed, **extra)
            )
            assert streamed.status == 200 and streamed.events[-1] == "[DONE]"
            assert streamed_text(streamed.events) == want.text
            want.check_tokens(streamed_chat_tokens(streamed.events))
            plain = await request(server, "POST", CHAT, body(CHAT, messages, params, seed))
            assert plain.json()["choices"][0]["message"]["content"] == want.text
        # n = 2: choice 0 draws from the request's seed, as transformers does
        messages, params, seed, want = cases[-1]
        reply = await request(server, "POST", CHAT, body(CHAT, messages, params, seed, n=2))
        assert reply.json()["choices"][0]["message"]["content"] == want.text


async def test_completions_greedy_and_sampled_equal_transformers(autojump_clock, tmp_path, bpe):
    path, ref = bpe
    text = "hello world, the quick brown fox"
    prompt = list(ref.tokenizer(text)["input_ids"])
    cases = [(params, None) for params in GREEDY.values()]
    cases += [(SAMPLED[name], seed) for name in ("all", "top_p", "min_p") for seed in SEEDS]
    wanted = [ref.generate(prompt, NEW, params, seed) for params, seed in cases]
    async with serving_cluster(tmp_path / "net", path) as net:
        server = net.daemons[2].daemon.openai
        for (params, seed), want in zip(cases, wanted, strict=True):
            for form in (text, prompt):  # the prompt as text, and as transformers' ids
                doc = body(COMPLETIONS, form, params, seed, logprobs=0)
                reply = await request(server, "POST", COMPLETIONS, doc)
                assert reply.status == 200, reply.body
                check_completion(reply.json(), want)
        params, seed = cases[-1]
        doc = body(COMPLETIONS, text, params, seed, stream=True)
        streamed = await request(server, "POST", COMPLETIONS, doc)
        assert streamed_text(streamed.events, chat=False) == wanted[-1].text


def _plain_span(text: str, start: int) -> str:
    """The first two printable ASCII characters in a row from `start` on: a stop string the
    reply really contains (a U+FFFD of a split character is never one)."""
    for i in range(start, len(text) - 1):
        if text[i : i + 2].isascii() and text[i : i + 2].isprintable():
            return text[i : i + 2]
    raise AssertionError(f"no plain span in {text!r}")


async def test_stop_strings_max_tokens_and_eos_as_transformers_ends(autojump_clock, tmp_path, bpe):
    path, ref = bpe
    prompt = ref.chat_ids(CHATS[1])
    greedy = ref.generate(prompt, NEW, GREEDY["greedy"])
    sampled = ref.generate(prompt, NEW, SAMPLED["all"], 3)
    short = ref.generate(prompt, 5, SAMPLED["all"], 3)
    assert greedy.finish_reason == sampled.finish_reason == short.finish_reason == "length"
    # transformers ends on an eos (generation_config.json's list) for some seed: find one
    ended = None
    for seed in range(64):
        run = ref.generate(prompt, 48, SAMPLED["temperature"], seed)
        if run.ended_on_eos:
            ended = (seed, run)
            break
    assert ended is not None, "no seed in 0..63 ends on an eos"
    async with serving_cluster(tmp_path / "net", path) as net:
        server = net.daemons[1].daemon.openai
        for want, params, seed in ((greedy, GREEDY["greedy"], None), (sampled, SAMPLED["all"], 3)):
            stop = _plain_span(want.text, 4)
            for stops in ([stop], ["never here", stop]):
                # transformers' generate(stop_strings=...) ends at the token completing one
                cut = ref.generate(prompt, NEW, params, seed, stop=stops)
                assert cut.ids == want.ids[: len(cut.ids)] and len(cut.ids) < NEW
                before = cut.before_stop(stops)
                for stream in (False, True):
                    doc = body(CHAT, CHATS[1], params, seed, stop=stops, stream=stream)
                    reply = await request(server, "POST", CHAT, doc)
                    assert reply.status == 200, reply.body
                    if stream:
                        assert streamed_text(reply.events) == before
                        finish = [
                            c["finish_reason"] for e in reply.events[:-1] for c in e["choices"]
                        ]
                        assert finish[-1] == "stop"
                    else:
                        (choice,) = reply.json()["choices"]
                        assert choice["message"]["content"] == before
                        assert choice["finish_reason"] == "stop"
                        assert reply.json()["usage"]["completion_tokens"] == len(cut.ids)
            # a stop string whose start ends the reply but never completes: held back while
            # it might, then sent whole at max_tokens ("length")
            tail = [want.text[-2:] + "\u2603never"]
            for stream in (False, True):
                doc = body(CHAT, CHATS[1], params, seed, stop=tail, stream=stream)
                reply = await request(server, "POST", CHAT, doc)
                if stream:
                    assert streamed_text(reply.events) == want.text
                else:
                    (choice,) = reply.json()["choices"]
                    assert (choice["message"]["content"], choice["finish_reason"]) == (
                        want.text,
                        "length",
                    )
        # max_tokens: "length" after exactly that many of transformers' tokens
        doc = body(CHAT, CHATS[1], SAMPLED["all"], 3, logprobs=True)
        reply = await request(server, "POST", CHAT, {**doc, "max_tokens": 5})
        check_chat(reply.json(), short)
        assert reply.json()["choices"][0]["finish_reason"] == "length"
        # an eos: "stop", the eos counted in usage and listed in logprobs, not in the text
        seed, run = ended
        doc = body(CHAT, CHATS[1], SAMPLED["temperature"], seed, logprobs=True, max_tokens=48)
        reply = await request(server, "POST", CHAT, doc)
        check_chat(reply.json(), run)
        assert reply.json()["choices"][0]["finish_reason"] == "stop"
        assert reply.json()["choices"][0]["logprobs"]["content"][-1]["bytes"] == []
        # the eos as the last token max_tokens allows: still "stop", as transformers ended on it
        reply = await request(server, "POST", CHAT, {**doc, "max_tokens": len(run.ids)})
        check_chat(reply.json(), ref.generate(prompt, len(run.ids), SAMPLED["temperature"], seed))
        assert reply.json()["choices"][0]["finish_reason"] == "stop"


async def test_llama3_template_chat_equals_transformers(autojump_clock, tmp_path_factory):
    path = bpe_tiny(tmp_path_factory.mktemp("llama3") / "bpe", "llama3", seed=5)
    ref = Reference.load(path)
    cases = [(CHATS[1], GREEDY["greedy"], None), (CHATS[2], SAMPLED["all"], 1)]
    wanted = [ref.generate(ref.chat_ids(c), NEW, p, s) for c, p, s in cases]
    assert ref.chat_ids(CHATS[1])[0] == ref.tokenizer.bos_token_id  # the template's BOS
    async with serving_cluster(tmp_path_factory.mktemp("net"), path) as net:
        server = net.daemons[0].daemon.openai
        for (messages, params, seed), want in zip(cases, wanted, strict=True):
            doc = body(CHAT, messages, params, seed, logprobs=True)
            reply = await request(server, "POST", CHAT, doc)
            assert reply.status == 200, reply.body
            check_chat(reply.json(), want)


@pytest.mark.parametrize("daemons", [2, 3])
async def test_plain_tiny_checkpoint_equals_transformers(autojump_clock, tmp_path, daemons):
    """make_tiny's checkpoint (its byte tokenizer, eos 257) with its own chat template, split
    over 2 and 3 daemons: chat, and completions from text and from ids, greedy and
    sampled."""
    path = m.make_tiny(tmp_path / "tiny", layers=LAYERS, seed=3, chat_template=TINY_CHAT_TEMPLATE)
    ref = Reference.load(path)
    text = "a network of shards 🙂"
    prompt = list(ref.tokenizer(text)["input_ids"])
    assert prompt == list(text.encode())  # bytes, no BOS (the tokenizer adds none)
    cases = [(GREEDY["greedy"], None), (SAMPLED["all"], 0), (SAMPLED["temperature"], 7)]
    wanted = [ref.generate(prompt, NEW, params, seed) for params, seed in cases]
    chats = [ref.generate(ref.chat_ids(CHATS[1]), NEW, p, s) for p, s in cases]
    async with serving_cluster(tmp_path / "net", path, count=daemons) as net:
        server = net.daemons[-1].daemon.openai
        for (params, seed), want, chat in zip(cases, wanted, chats, strict=True):
            for form in (text, prompt):
                doc = body(COMPLETIONS, form, params, seed, logprobs=0)
                reply = await request(server, "POST", COMPLETIONS, doc)
                assert reply.status == 200, reply.body
                check_completion(reply.json(), want)
            doc = body(CHAT, CHATS[1], params, seed, logprobs=True)
            reply = await request(server, "POST", CHAT, doc)
            assert reply.status == 200, reply.body
            check_chat(reply.json(), chat)


def test_make_tiny_chat_template_renders_as_transformers(tmp_path):
    """make_tiny's chat template: the same bytes for the same arguments, rendered and
    tokenized by daemon.serving as transformers' apply_chat_template does, BOS once and the
    byte vocabulary's EOS ending each turn; without one, no tokenizer_config.json."""
    a = m.make_tiny(tmp_path / "a", layers=1, chat_template=TINY_CHAT_TEMPLATE)
    b = m.make_tiny(tmp_path / "b", layers=1, chat_template=TINY_CHAT_TEMPLATE)
    for name in ("tokenizer_config.json", "tokenizer.json", "model.safetensors"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    plain = m.make_tiny(tmp_path / "c", layers=1, chat_template=None)
    assert not (plain / "tokenizer_config.json").exists()
    ours, theirs = ModelText.load(a), Reference.load(a).tokenizer
    assert ours.eos_ids == {m.BYTE_EOS_ID}
    for chat in CHATS:
        for prompt in (True, False):
            text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            ids = theirs.apply_chat_template(chat, add_generation_prompt=prompt, return_dict=False)
            assert ours.render_chat(chat, add_generation_prompt=prompt) == text
            assert ours.chat_ids(chat, add_generation_prompt=prompt) == list(ids)
            assert list(ids).count(m.BYTE_BOS_ID) == 1 and ids[0] == m.BYTE_BOS_ID
            assert list(ids).count(m.BYTE_EOS_ID) == len(chat)
    want = f"{m.BYTE_BOS}<|im_start|>user\nHi there 🙂{m.BYTE_EOS}\n<|im_start|>assistant\n"
    assert ours.render_chat(CHATS[0]) == want


@pytest.mark.parametrize(
    "config",
    [
        {"do_sample": True, "temperature": 0.6, "top_p": 0.9},  # Llama 3's: no top_k
        {"do_sample": True, "temperature": 0.7, "top_k": 20, "min_p": 0.05, "max_new_tokens": 12},
        {"do_sample": True, "repetition_penalty": 1.3, "top_p": 0.8, "top_k": 0},
    ],
)
async def test_generation_config_defaults_sample_as_transformers(autojump_clock, tmp_path, config):
    """A request that names no sampling parameter samples with generation_config.json's
    values, as transformers' `generate()` does when nothing is stated, except for top_k: a
    config that names none gets no top_k here (as vLLM; OpenAI has no top_k) where
    transformers 5 applies its own default of 50 (pinned below). A request without
    max_tokens gets its max_new_tokens, as `generate()` without one; a request naming some
    values gets the file's for the others."""
    path = bpe_tiny(tmp_path / "bpe")
    generation = json.loads((path / "generation_config.json").read_text())
    (path / "generation_config.json").write_text(json.dumps({**generation, **config}))
    ref = Reference.load(path)
    prompt = ref.chat_ids(CHATS[0])
    stated = {"temperature": 1.0, "top_k": 0, **config}
    del stated["do_sample"]
    new = stated.pop("max_new_tokens", NEW)
    wanted = {seed: ref.generate(prompt, new, stated, seed) for seed in SEEDS}
    from_config = "max_new_tokens" in config
    # transformers with nothing stated: generation_config.json's values
    theirs = ref.generate(prompt, None if from_config else NEW, None, SEEDS[0]).ids
    assert len(theirs) == new
    if "top_k" in config:
        assert theirs == wanted[SEEDS[0]].ids
    else:
        assert theirs == ref.generate(prompt, new, {**stated, "top_k": 50}, SEEDS[0]).ids
        assert theirs != wanted[SEEDS[0]].ids
    assert wanted[SEEDS[0]].ids != ref.generate(prompt, new, {"temperature": 1.0}, SEEDS[0]).ids
    async with serving_cluster(tmp_path / "net", path) as net:
        server = net.daemons[0].daemon.openai
        for seed, want in wanted.items():
            doc = body(CHAT, CHATS[0], {}, seed, logprobs=True)
            if from_config:
                del doc["max_tokens"]
            reply = await request(server, "POST", CHAT, doc)
            assert reply.status == 200, reply.body
            check_chat(reply.json(), want)
            # a value the request names wins over the file's; the others still apply
            reply = await request(server, "POST", CHAT, {**doc, "temperature": 1.3})
            mixed = ref.generate(prompt, new, {**stated, "temperature": 1.3}, seed)
            check_chat(reply.json(), mixed)


async def test_text_parts_are_joined_with_newlines_as_the_text_side_does(autojump_clock, tmp_path):
    """A message whose content is text parts reads as those texts joined with newlines (as
    daemon.serving.text renders such a message, and vLLM): the same prompt and reply as the
    joined string."""
    path = m.make_tiny(tmp_path / "tiny", layers=LAYERS, seed=3, chat_template=TINY_CHAT_TEMPLATE)
    parts = [{"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
    joined = [{"role": "user", "content": "first\nsecond"}]
    rendered = ModelText.load(path).chat_ids([{"role": "user", "content": parts}])
    assert rendered == ModelText.load(path).chat_ids(joined)
    async with serving_cluster(tmp_path / "net", path) as net:
        server = net.daemons[0].daemon.openai
        replies = []
        for messages in ([{"role": "user", "content": parts}], joined):
            doc = body(CHAT, messages, GREEDY["greedy"], None)
            reply = await request(server, "POST", CHAT, doc)
            assert reply.status == 200, reply.body
            replies.append(reply.json())
        assert replies[0]["usage"]["prompt_tokens"] == len(rendered)
        assert replies[0]["usage"] == replies[1]["usage"]
        assert replies[0]["choices"][0]["message"] == replies[1]["choices"][0]["message"]
