"""Tokenizer parity with Hugging Face (BOS as the checkpoint's template says) and stopping on
any of several eos ids, on tokenizers and models the tests make themselves."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
tokenizers = pytest.importorskip("tokenizers")
trio = pytest.importorskip("trio")

from daemon.shards import model as m  # noqa: E402
from daemon.shards.client import RemoteModel, generate  # noqa: E402
from daemon.shards.server import ShardServer  # noqa: E402
from p2p.streams import stream_pair  # noqa: E402
from scheduler.routing import Server  # noqa: E402

TEXTS = ["hello world", "hello", "", " well, hold the door", "héllo ✓"]


def _bpe_checkpoint(path, post_processor, eos=(1, 2)):
    """A small BPE tokenizer.json with Llama-style specials, and config files naming them."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    chars = sorted(set("".join(TEXTS)) | set("abcdefghijklmnopqrstuvwxyz ,"))
    vocab = {"<s>": 0, "</s>": 1, "<|eot|>": 2}
    for char in chars:
        vocab.setdefault(char, len(vocab))
    vocab.update({"he": len(vocab), "ll": len(vocab) + 1})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("h", "e"), ("l", "l")], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Split(" ", "isolated")
    tok.add_special_tokens(["<s>", "</s>", "<|eot|>"])
    if post_processor is not None:
        tok.post_processor = post_processor
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>"})
    )
    (path / "config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": list(eos)}))
    return path


def _templates():
    from tokenizers import processors

    llama2 = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)]
    )
    # Llama 3 writes ByteLevel then the BOS template, inside a Sequence
    llama3 = processors.Sequence([processors.ByteLevel(trim_offsets=False), llama2])
    both = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B", special_tokens=[("<s>", 0), ("</s>", 1)]
    )
    return {"llama2": llama2, "llama3": llama3, "bos_and_eos": both, "none": None}


@pytest.mark.parametrize("name", ["llama2", "llama3", "bos_and_eos", "none"])
def test_encode_matches_transformers(tmp_path, name):
    transformers = pytest.importorskip("transformers")
    path = _bpe_checkpoint(tmp_path / name, _templates()[name])
    ours = m.load_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in TEXTS:
        assert ours.encode(text) == theirs(text)["input_ids"], (name, text)
        assert (
            ours.encode(text, add_special_tokens=False)
            == theirs(text, add_special_tokens=False)["input_ids"]
        )
    if name != "none":
        assert ours.encode("hello")[0] == 0  # BOS first, as transformers puts it


def test_byte_level_tokenizer_follows_its_template(tmp_path):
    """Our pure-Python byte path adds the template's specials exactly as the library does."""
    path = m.make_tiny(tmp_path / "tiny", layers=1)
    spec = json.loads((path / "tokenizer.json").read_text())
    spec["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [
            {"SpecialToken": {"id": m.BYTE_BOS, "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
        ],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {m.BYTE_BOS: {"id": m.BYTE_BOS, "ids": [256], "tokens": [m.BYTE_BOS]}},
    }
    (path / "tokenizer.json").write_text(json.dumps(spec))
    ours = m.load_tokenizer(path)
    assert ours.is_byte_level
    library = tokenizers.Tokenizer.from_file(str(path / "tokenizer.json"))
    for text in TEXTS:
        assert ours.encode(text) == library.encode(text).ids == [256, *text.encode()]
    assert ours.encode("a", add_bos=True) == [256, 97]  # never twice
    # make_tiny's own file has no template: no specials, as transformers reads it too
    plain = m.load_tokenizer(m.make_tiny(tmp_path / "plain", layers=1))
    assert plain.encode("ab") == [97, 98]


def test_every_eos_id_of_a_list_is_kept(tmp_path):
    path = _bpe_checkpoint(tmp_path / "eos", _templates()["llama3"], eos=(1, 2))
    tok = m.load_tokenizer(path)
    assert tok.eos_ids == (1, 2) and tok.eos_id == (1, 2)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert m.load_tokenizer(path).eos_id == 2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return m.make_tiny(tmp_path_factory.mktemp("eos") / "m", layers=2, seed=5)


@pytest.fixture(scope="module")
def free_run(tiny):
    """24 greedy tokens without any eos, and two distinct ids from them to stop on."""
    tokens = m.greedy_generate([m.load_model(tiny)], list(b"stop here"), 24)
    first_a = tokens[5]
    later = next(t for t in tokens[8:] if t not in tokens[:8])
    return tokens, first_a, later


def test_greedy_generate_stops_on_any_eos_of_a_list(tiny, free_run):
    tokens, a, b = free_run
    shard = m.load_model(tiny)
    for eos in ([b, a], (a,), a):  # the second id of a list stops it too
        out = m.greedy_generate([shard], list(b"stop here"), 24, eos_id=eos)
        assert out == tokens[: tokens.index(a) + 1]
    out = m.greedy_generate([shard], list(b"stop here"), 24, eos_id=[b])
    assert out == tokens[: tokens.index(b) + 1]


async def test_client_generate_stops_on_any_eos_of_a_list(tiny, free_run):
    tokens, a, b = free_run
    server = ShardServer(opener=None)
    await server.load("tiny", tiny, 0, 2)

    class OneServer:
        def __init__(self, nursery) -> None:
            self.nursery = nursery

        async def open_stream(self, peer_id: str, protocol: str):
            client_end, server_end = stream_pair("client", peer_id)
            self.nursery.start_soon(server.handle_stream, server_end)
            return client_end

        async def announced(self) -> list[Server]:
            return [Server("s", 0, 2, ms_per_layer=1.0, rtt_ms=1.0)]

    async with trio.open_nursery() as nursery:
        net = OneServer(nursery)
        model = RemoteModel(net, net.announced, model_id="tiny", num_layers=2, max_length=64)
        await model.open()
        out = [t async for t in generate(model, list(b"stop here"), 24, eos_id=[b, a])]
        await model.close()
        nursery.cancel_scope.cancel()
    assert out == tokens[: tokens.index(a) + 1]


def _json_values():
    from hypothesis import strategies as st

    leaves = st.none() | st.booleans() | st.integers(-5, 300) | st.text(max_size=8)
    return st.recursive(
        leaves,
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["type", "single", "special_tokens", "ids", "id", "SpecialToken"])
                | st.text(max_size=6),
                inner,
                max_size=4,
            )
        ),
        max_leaves=20,
    )


def test_any_post_processor_or_added_tokens_is_a_tokenizer_or_a_model_error(tmp_path):
    """A checkpoint's tokenizer.json comes from whoever made it: odd structures in the parts
    we read never raise anything but ModelError."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    path = m.make_tiny(tmp_path / "fuzz", layers=1)
    base = json.loads((path / "tokenizer.json").read_text())
    templates = st.fixed_dictionaries(
        {"type": st.sampled_from(["TemplateProcessing", "Sequence"]), "single": _json_values()},
        optional={"special_tokens": _json_values(), "processors": _json_values()},
    )

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(post=templates | _json_values(), added=st.none() | _json_values())
    def check(post, added):
        spec = {**base, "post_processor": post}
        if added is not None:
            spec["added_tokens"] = added
        (path / "tokenizer.json").write_text(json.dumps(spec))
        try:
            tok = m.load_tokenizer(path)
        except m.ModelError:
            return
        assert all(isinstance(i, int) for i in tok.encode("héllo"))

    check()
