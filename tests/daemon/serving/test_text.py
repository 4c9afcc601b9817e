"""Text in, text out: parity with Hugging Face transformers (chat templates, encode/decode) on a
byte-level BPE tokenizer trained here and on the tiny checkpoints' byte tokenizer; eos ids and
default sampling values; bounded loading and clear errors."""

from __future__ import annotations

import json
import os

import pytest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from daemon.serving import chat_template as ct  # noqa: E402
from daemon.serving.text import GenerationDefaults, ModelText  # noqa: E402
from daemon.shards import model as m  # noqa: E402
from daemon.shards.model import ModelError  # noqa: E402
from tests.daemon.serving.text_helpers import (  # noqa: E402
    CHATML,
    CHATS,
    LLAMA3,
    MULTIBYTE,
    SPECIALS,
    TEMPLATES,
    bpe_checkpoint,
    bpe_json_text,
    hf,
    make_checkpoints,
    make_tiny,
)


@pytest.fixture(scope="module")
def bpe_json():
    return bpe_json_text()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return make_checkpoints(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"))


# -- parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_matches_transformers(checkpoints, name):
    ours = ModelText.load(checkpoints[name])
    theirs = hf(checkpoints[name])
    for chat in CHATS:
        for prompt in (True, False):
            text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=prompt)
            ids = theirs.apply_chat_template(
                chat, tokenize=True, return_dict=False, add_generation_prompt=prompt
            )
            assert ours.render_chat(chat, add_generation_prompt=prompt) == text
            assert ours.chat_ids(chat, add_generation_prompt=prompt) == list(ids)
    # the template wrote the specials: each appears once, as its id (no BOS added again)
    ids = ours.chat_ids(CHATS[1])
    if name == "llama3":
        assert ids[0] == ours.tokenizer.token_to_id("<|begin_of_text|>")
        assert ids.count(ids[0]) == 1
    assert ours.tokenizer.token_to_id("<|im_end|>") in ours.chat_ids(CHATS[1])


def test_chat_ids_do_not_add_bos_twice(tmp_path, bpe_json):
    """With a post-processor that adds BOS (Llama 3's), prompts get it and chats do not get
    it again: the template wrote it, as in apply_chat_template."""
    from tokenizers import Tokenizer, processors

    tok = Tokenizer.from_str(bpe_json)
    bos = tok.token_to_id("<|begin_of_text|>")
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    path = bpe_checkpoint(tmp_path / "bos", tok.to_str(), LLAMA3)
    ours, theirs = ModelText.load(path), hf(path)
    assert (
        ours.encode("hi")
        == theirs("hi")["input_ids"]
        == [bos, *ours.encode("hi", add_special_tokens=False)]
    )
    for chat in CHATS:
        ids = ours.chat_ids(chat)
        assert ids == list(
            theirs.apply_chat_template(chat, return_dict=False, add_generation_prompt=True)
        )
        assert ids[0] == bos and ids[1] != bos


def test_encode_and_decode_match_transformers(checkpoints):
    ours = ModelText.load(checkpoints["chatml"])
    theirs = hf(checkpoints["chatml"])
    texts = [*MULTIBYTE, "<|im_start|>user\nhi<|im_end|>", "a <tool> Ġ中文X b"]
    for text in texts:
        for specials in (True, False):
            want = theirs(text, add_special_tokens=specials)["input_ids"]
            assert ours.encode(text, add_special_tokens=specials) == want
        ids = ours.encode(text)
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)
    # specials are skipped in decoded text; added tokens that are not special are kept
    ids = ours.encode("<|im_start|>x <tool><|eot_id|>")
    assert ours.decode(ids) == "x <tool>"


def test_byte_tokenizer_matches_the_library_and_transformers(tiny, tmp_path):
    """The pure-Python byte path turns special-token text into ids as the library does."""
    ours = m.load_tokenizer(tiny)
    library = tokenizers.Tokenizer.from_file(str(tiny / "tokenizer.json"))
    for text in [*MULTIBYTE, "<|begin_of_text|>a<|end_of_text|>", "x<|end_of_text"]:
        assert ours.encode(text, add_special_tokens=False) == library.encode(text).ids
        ids = ours.encode(text)
        assert ours.decode(ids) == library.decode(ids, skip_special_tokens=True)
    assert ours.encode("<|begin_of_text|>a") == [256, 97]


def test_tiny_chat_with_a_written_template(tiny, tmp_path):
    path = tmp_path / "tiny"
    path.mkdir()
    for f in tiny.iterdir():
        (path / f.name).write_bytes(f.read_bytes())
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": m.BYTE_BOS,
                "eos_token": m.BYTE_EOS,
                "chat_template": LLAMA3.replace("<|eot_id|>", m.BYTE_EOS),
            }
        )
    )
    ours, theirs = ModelText.load(path), hf(path)
    for chat in CHATS:
        text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = theirs.apply_chat_template(chat, return_dict=False, add_generation_prompt=True)
        assert ours.render_chat(chat) == text
        assert ours.chat_ids(chat) == list(ids)
        assert ours.chat_ids(chat)[0] == m.BYTE_BOS_ID
    assert ours.eos_ids == {m.BYTE_EOS_ID}


def test_named_templates_and_chat_template_file(checkpoints, tmp_path, bpe_json):
    path = bpe_checkpoint(tmp_path / "named", bpe_json, None)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": CHATML},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = ModelText.load(path), hf(path)
    assert ours.render_chat(CHATS[1]) == theirs.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True
    )
    # chat_template.jinja wins over the config's template, in transformers too
    (path / "chat_template.jinja").write_text(LLAMA3)
    ours, theirs = ModelText.load(path), hf(path)
    want = theirs.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    assert ours.render_chat(CHATS[0]) == want
    assert want.startswith("<|begin_of_text|>")
    (path / "chat_template.jinja").unlink()
    config["chat_template"] = [{"name": "tool_use", "template": "TOOLS"}]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="none named 'default'.*tool_use"):
        ModelText.load(path).render_chat(CHATS[0])


def test_legacy_special_tokens_map(tmp_path, bpe_json):
    """special_tokens_map.json names the special tokens when tokenizer_config.json has no
    added_tokens_decoder, as transformers reads it; with one, it is ignored."""
    path = bpe_checkpoint(tmp_path / "legacy", bpe_json, LLAMA3)
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    for modern in (False, True):
        if modern:
            config = json.loads((path / "tokenizer_config.json").read_text())
            config["added_tokens_decoder"] = {}
            (path / "tokenizer_config.json").write_text(json.dumps(config))
        ours, theirs = ModelText.load(path), hf(path)
        assert ours.render_chat(CHATS[0]) == theirs.apply_chat_template(
            CHATS[0], tokenize=False, add_generation_prompt=True
        )
        assert ours.bos_token == ("<|begin_of_text|>" if modern else "<|im_start|>")
        assert ours.eos_token == theirs.eos_token


# -- eos ids and defaults ---------------------------------------------------------------------


def test_eos_ids_as_int_and_list(tmp_path, bpe_json):
    ids = {s: i for i, s in enumerate(SPECIALS)}
    listed = ModelText.load(bpe_checkpoint(tmp_path / "l", bpe_json, CHATML, eos=(6, 3)))
    # generation_config's list, and tokenizer_config's eos_token (<|eot_id|> = 6)
    assert listed.eos_ids == {6, 3}
    assert listed.eos_token == "<|eot_id|>" and listed.bos_token == "<|begin_of_text|>"
    single = ModelText.load(bpe_checkpoint(tmp_path / "s", bpe_json, CHATML, eos=(1,)))
    assert single.eos_ids == {1, ids["<|eot_id|>"]}
    assert single.context_length == 4096
    assert single.defaults == GenerationDefaults(temperature=0.6)


def test_generation_defaults(tmp_path, bpe_json):
    path = bpe_checkpoint(tmp_path / "d", bpe_json, CHATML)
    raw = {
        "eos_token_id": 6,
        "temperature": 0.7,
        "top_p": 0.9,
        "top_k": 40,
        "min_p": 0.05,
        "repetition_penalty": 1.1,
        "do_sample": True,
        "max_new_tokens": 256,
    }
    (path / "generation_config.json").write_text(json.dumps(raw))
    got = ModelText.load(path).defaults
    assert got == GenerationDefaults(**{k: v for k, v in raw.items() if k != "eos_token_id"})
    for key, bad in [("temperature", "hot"), ("top_p", 1.5), ("top_k", 2.5), ("do_sample", 1)]:
        (path / "generation_config.json").write_text(json.dumps({**raw, key: bad}))
        with pytest.raises(ModelError, match=key):
            ModelText.load(path)
    (path / "generation_config.json").unlink()
    assert ModelText.load(path).defaults == GenerationDefaults()


# -- bad inputs ---------------------------------------------------------------------------------


def test_missing_template_is_a_clear_error(tiny, checkpoints, tmp_path, bpe_json):
    with pytest.raises(ModelError, match="no chat template"):
        ModelText(tokenizer=m.load_tokenizer(tiny), context_length=8).render_chat(CHATS[0])
    with pytest.raises(ModelError, match="no chat template"):
        ModelText.load(tiny).render_chat(CHATS[0])
    plain = ModelText.load(bpe_checkpoint(tmp_path / "plain", bpe_json, None, chat=False))
    assert not plain.has_chat_template
    with pytest.raises(ModelError, match="no chat template"):
        plain.chat_ids(CHATS[0])


def test_bad_messages_and_roles(checkpoints):
    text = ModelText.load(checkpoints["llama3"])
    with pytest.raises(ct.TemplateRaised, match="Unknown role: tool"):
        text.render_chat([{"role": "tool", "content": "x"}])
    theirs = hf(checkpoints["llama3"])
    with pytest.raises(Exception, match="Unknown role: tool"):
        theirs.apply_chat_template([{"role": "tool", "content": "x"}], tokenize=False)
    bad = [
        ([], "non-empty list"),
        ("hello", "non-empty list"),
        ([{"content": "x"}], "role"),
        ([{"role": "", "content": "x"}], "role"),
        ([{"role": 3, "content": "x"}], "role"),
        (["user"], "must be an object"),
        ([{"role": "user", "content": 5}], "content must be a string"),
        ([{"role": "user", "content": [{"type": "image_url"}]}], "only text parts"),
        ([{"role": "user", "content": [{"type": "text", "text": 1}]}], "string 'text'"),
        ([{"role": "user", "content": "x", "extra": object()}], "unsupported value"),
    ]
    for messages, match in bad:
        with pytest.raises(ModelError, match=match):
            text.render_chat(messages)
    parts = [{"type": "text", "text": "one"}, {"type": "text", "text": "two"}]
    assert text.render_chat([{"role": "user", "content": parts}]) == text.render_chat(
        [{"role": "user", "content": "one\ntwo"}]
    )
    # None values are dropped, as transformers drops them
    assert text.render_chat(
        [{"role": "user", "content": "x", "name": None}], add_generation_prompt=False
    ) == theirs.apply_chat_template(
        [{"role": "user", "content": "x", "name": None}], tokenize=False
    )


def test_huge_files_are_refused(tmp_path, bpe_json):
    path = bpe_checkpoint(tmp_path / "huge", bpe_json, CHATML)
    config = path / "tokenizer_config.json"
    original = config.read_text()
    with config.open("a") as handle:
        handle.write(" " * (4 << 20))
    with pytest.raises(ModelError, match="tokenizer_config.json.*over the limit"):
        ModelText.load(path)
    config.write_text(original)
    big = json.loads(original)
    big["chat_template"] = "x" * (256 * 1024 + 1)
    config.write_text(json.dumps(big))
    with pytest.raises(ModelError, match="chat template of 262145 characters"):
        ModelText.load(path)
    config.write_text(original)
    os.truncate(path / "tokenizer.json", (64 << 20) + 1)  # sparse: nothing is written
    with pytest.raises(ModelError, match="tokenizer.json.*over the limit"):
        ModelText.load(path)


def test_broken_files_are_clear_errors(tmp_path, bpe_json):
    path = bpe_checkpoint(tmp_path / "broken", bpe_json, CHATML)
    (path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ModelError, match="tokenizer_config.json: not valid JSON"):
        ModelText.load(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    with pytest.raises(ModelError, match="does not compile"):
        ModelText.load(path)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": 5}))
    with pytest.raises(ModelError, match="eos_token must be a string"):
        ModelText.load(path)
    (path / "tokenizer_config.json").write_text("{}")
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 0}))
    with pytest.raises(ModelError, match="max_position_embeddings"):
        ModelText.load(path)
    (path / "config.json").unlink()
    with pytest.raises(ModelError, match="config.json: not found"):
        ModelText.load(path)
