"""Text in, text out: parity with Hugging Face transformers (chat templates, encode/decode) on a
byte-level BPE tokenizer trained here and on the tiny checkpoints' byte tokenizer; streaming
detokenization; stop strings; bounded loading; the template sandbox."""

from __future__ import annotations

import json
import os

import pytest

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from daemon.serving import chat_template as ct  # noqa: E402
from daemon.serving.text import (  # noqa: E402
    GenerationDefaults,
    IncrementalDecoder,
    ModelText,
    StopStrings,
)
from daemon.shards import model as m  # noqa: E402
from daemon.shards.model import ModelError  # noqa: E402

MULTIBYTE = [
    "héllo wörld, ça va? naïve café",
    "中文文本，日本語のテキスト、한국어",
    "emoji 🙂🚀👩‍👩‍👧 and flags 🇫🇷🇯🇵",
    "mixed: a🙂b中c\u0301d ✓ ∑ ≠ ∞",
    "",
    " leading and trailing spaces ",
    "unseen in training: 🦀 crab, 🧪 test, 漢字かな, Ωμέγα, ñandú",
]
CORPUS = [
    "hello world, the quick brown fox jumps over the lazy dog",
    "chat templates render messages; tokens stream back one by one",
    *MULTIBYTE[:-1],
] * 30

CHATML = """{% set ns = namespace(system=false) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}
        {% set ns.system = true %}
    {% endif %}
    {{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}
{% endfor %}
{% if not ns.system %}
    {{- '<|im_start|>meta\n' + ({'html': '<&>é', 'n': messages | length} | tojson)
        + '<|im_end|>\n' }}
{% endif %}
{% if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{% endif %}
"""

LLAMA3 = """{{- bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {% endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}
    {% if message['role'] == 'assistant' %}
    {% generation %}{{- message['content'] | trim }}{% endgeneration %}
    {% else %}{{- message['content'] | trim }}{% endif %}
    {{- '<|eot_id|>' }}
    {% if loop.last and message['role'] == 'assistant' %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{% endif %}
"""

# string methods, slicing, reversed loops, selectattr, namespaces holding computed values
REASONING = """{%- set ns = namespace(last_user=messages | length - 1, sys='') %}
{%- for message in messages[::-1] %}
    {%- if message.role == 'user' and ns.last_user == messages | length - 1 %}
        {%- set ns.last_user = messages | length - 1 - loop.index0 %}
    {%- endif %}
{%- endfor %}
{%- for m in messages | selectattr('role', 'equalto', 'system') %}
    {%- set ns.sys = ns.sys ~ m.content.strip() %}
{%- endfor %}
{%- if ns.sys %}{{ '<|im_start|>system\n' ~ ns.sys | upper ~ '<|im_end|>\n' }}{% endif %}
{%- for message in messages if message.role != 'system' %}
    {%- set content = message.content %}
    {%- if message.role == 'assistant' and '</think>' in content %}
        {%- set content = content.split('</think>')[-1].lstrip('\n') %}
    {%- endif %}
    {%- if loop.index0 >= ns.last_user and message.content.startswith('!') %}
        {%- set content = content[1:] | trim %}
    {%- endif %}
    {{- '<|im_start|>' ~ message.role ~ (' (' ~ message.name ~ ')' if message.name is defined
        else '') ~ '\n' ~ content ~ '<|im_end|>\n' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}"""

TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "reasoning": REASONING}
SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATS = [
    [{"role": "user", "content": "Hi there 🙂"}],
    [
        {"role": "system", "content": "You are terse. Réponds en français."},
        {"role": "user", "content": "  中文 question with <|im_end|> inside  "},
        {"role": "assistant", "content": "Une réponse ✓"},
        {"role": "user", "content": "and again\nwith lines"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two 🚀"},
    ],
    [
        {"role": "system", "content": "  be brief "},
        {"role": "user", "content": "first", "name": "ann"},
        {"role": "assistant", "content": "<think>\nhm</think>\n\nan answer"},
        {"role": "user", "content": "!  second 中文"},
    ],
]


def _train_bpe():
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=450,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    # added tokens that are not special: kept in decoded text; one with a non-byte char
    tok.add_tokens([AddedToken("<tool>", special=False), AddedToken("Ġ中文X", special=False)])
    return tok


@pytest.fixture(scope="module")
def bpe_json():
    return _train_bpe().to_str()


def _bpe_checkpoint(path, bpe_json, template, *, eos=(6, 3), chat=True):
    path.mkdir(parents=True)
    (path / "tokenizer.json").write_text(bpe_json)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": {"content": "<|eot_id|>", "__type": "AddedToken", "special": True},
        "pad_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False,
    }
    if chat:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "config.json").write_text(
        json.dumps({"model_type": "llama", "max_position_embeddings": 4096, "eos_token_id": 1})
    )
    (path / "generation_config.json").write_text(
        json.dumps({"eos_token_id": list(eos) if len(eos) > 1 else eos[0], "temperature": 0.6})
    )
    return path


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, bpe_json):
    root = tmp_path_factory.mktemp("text")
    return {name: _bpe_checkpoint(root / name, bpe_json, t) for name, t in TEMPLATES.items()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return m.make_tiny(tmp_path_factory.mktemp("tiny") / "m", layers=1)


def _hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


# -- parity with transformers ---------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_chat_matches_transformers(checkpoints, name):
    ours = ModelText.load(checkpoints[name])
    theirs = _hf(checkpoints[name])
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


def test_encode_and_decode_match_transformers(checkpoints):
    ours = ModelText.load(checkpoints["chatml"])
    theirs = _hf(checkpoints["chatml"])
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
    ours, theirs = ModelText.load(path), _hf(path)
    for chat in CHATS:
        text = theirs.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        ids = theirs.apply_chat_template(chat, return_dict=False, add_generation_prompt=True)
        assert ours.render_chat(chat) == text
        assert ours.chat_ids(chat) == list(ids)
        assert ours.chat_ids(chat)[0] == m.BYTE_BOS_ID
    assert ours.eos_ids == {m.BYTE_EOS_ID}


def test_named_templates_and_chat_template_file(checkpoints, tmp_path, bpe_json):
    path = _bpe_checkpoint(tmp_path / "named", bpe_json, None)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["chat_template"] = [
        {"name": "tool_use", "template": "TOOLS"},
        {"name": "default", "template": CHATML},
    ]
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, theirs = ModelText.load(path), _hf(path)
    assert ours.render_chat(CHATS[1]) == theirs.apply_chat_template(
        CHATS[1], tokenize=False, add_generation_prompt=True
    )
    # chat_template.jinja wins over the config's template, in transformers too
    (path / "chat_template.jinja").write_text(LLAMA3)
    ours, theirs = ModelText.load(path), _hf(path)
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
    path = _bpe_checkpoint(tmp_path / "legacy", bpe_json, LLAMA3)
    (path / "special_tokens_map.json").write_text(
        json.dumps({"bos_token": {"content": "<|im_start|>"}, "eos_token": "<|im_end|>"})
    )
    for modern in (False, True):
        if modern:
            config = json.loads((path / "tokenizer_config.json").read_text())
            config["added_tokens_decoder"] = {}
            (path / "tokenizer_config.json").write_text(json.dumps(config))
        ours, theirs = ModelText.load(path), _hf(path)
        assert ours.render_chat(CHATS[0]) == theirs.apply_chat_template(
            CHATS[0], tokenize=False, add_generation_prompt=True
        )
        assert ours.bos_token == ("<|begin_of_text|>" if modern else "<|im_start|>")
        assert ours.eos_token == theirs.eos_token


# -- eos ids and defaults ---------------------------------------------------------------------


def test_eos_ids_as_int_and_list(tmp_path, bpe_json):
    ids = {s: i for i, s in enumerate(SPECIALS)}
    listed = ModelText.load(_bpe_checkpoint(tmp_path / "l", bpe_json, CHATML, eos=(6, 3)))
    # generation_config's list, and tokenizer_config's eos_token (<|eot_id|> = 6)
    assert listed.eos_ids == {6, 3}
    assert listed.eos_token == "<|eot_id|>" and listed.bos_token == "<|begin_of_text|>"
    single = ModelText.load(_bpe_checkpoint(tmp_path / "s", bpe_json, CHATML, eos=(1,)))
    assert single.eos_ids == {1, ids["<|eot_id|>"]}
    assert single.context_length == 4096
    assert single.defaults == GenerationDefaults(temperature=0.6)


def test_generation_defaults(tmp_path, bpe_json):
    path = _bpe_checkpoint(tmp_path / "d", bpe_json, CHATML)
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


# -- incremental decoding -----------------------------------------------------------------------


def _stream(decoder, ids):
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


def _decoders(text):
    yield text.decoder()
    if not text.tokenizer.is_byte_level:
        yield IncrementalDecoder(text.tokenizer, byte_exact=False)  # the window algorithm


@pytest.mark.parametrize("which", ["tiny", "bpe"])
def test_incremental_decoding_of_multibyte_text(which, tiny, checkpoints):
    text = ModelText.load(checkpoints["chatml"]) if which == "bpe" else None
    if text is None:
        text = ModelText(tokenizer=m.load_tokenizer(tiny), context_length=512)
    split = 0
    for sample in MULTIBYTE:
        ids = text.encode(sample, add_special_tokens=False)
        for decoder in _decoders(text):
            pieces, rest = _stream(decoder, ids)
            assert not any("\ufffd" in p for p in pieces), (sample, pieces)
            assert "".join(pieces) + rest == text.decode(ids) == sample
            assert rest == ""
            split += pieces.count("")
    assert split > 10  # characters really were split across tokens and held back


def test_byte_level_pieces_split_characters(checkpoints):
    """The BPE has pieces holding part of a character: the decoder holds them back."""
    text = ModelText.load(checkpoints["chatml"])
    ids = text.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1
    for decoder in _decoders(text):
        pieces, rest = _stream(decoder, ids)
        assert pieces[:-1] == [""] * (len(ids) - 1) and pieces[-1] == "🚀" and rest == ""
    # an incomplete character at the end comes out as U+FFFD, as decode says
    decoder = text.decoder()
    assert [decoder.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert decoder.flush() == text.decode(ids[:-1])


def test_special_tokens_decode_to_nothing(checkpoints, tiny):
    text = ModelText.load(checkpoints["chatml"])
    ids = [*text.encode("hi", add_special_tokens=False), 6, 3]
    pieces, rest = _stream(text.decoder(), ids)
    assert pieces[-2:] == ["", ""] and "".join(pieces) + rest == "hi"
    tiny_text = ModelText(tokenizer=m.load_tokenizer(tiny), context_length=512)
    pieces, rest = _stream(tiny_text.decoder(), [104, 105, m.BYTE_EOS_ID, 1000])
    assert "".join(pieces) + rest == "hi"


def test_window_decoder_is_bounded(checkpoints):
    """A run of invalid bytes (lone continuation bytes) does not grow the window without end."""
    from daemon.shards.model.tokenizer import _bytes_to_unicode

    text = ModelText.load(checkpoints["chatml"])
    lone = text.tokenizer.token_to_id(_bytes_to_unicode()[0x80])
    assert text.tokenizer.token_bytes(lone) == b"\x80"
    decoder = IncrementalDecoder(text.tokenizer, byte_exact=False)
    ids = [lone] * 100
    pieces, rest = _stream(decoder, ids)
    assert "".join(pieces) + rest == text.decode(ids) == "\ufffd" * 100
    decoder.push(lone)
    assert len(decoder._ids) <= 2 * 65


def _spm_tokenizer():
    """A SentencePiece-style tokenizer.json (Llama 2, Mistral): Metaspace text, <0xNN> byte
    fallback pieces, a decoder that strips the leading space: the window path."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator(CORPUS[:3] * 10, trainer=trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    base = len(vocab)
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", base + byte)
    return json.dumps(spec)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("spm") / "m"
    path.mkdir()
    (path / "tokenizer.json").write_text(_spm_tokenizer())
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    return path


@pytest.fixture(scope="module")
def spm(spm_dir):
    return ModelText.load(spm_dir)


def test_window_decoding_of_a_sentencepiece_tokenizer(spm):
    assert not spm.tokenizer.decodes_bytes
    held = 0
    for sample in MULTIBYTE:
        ids = spm.encode(sample, add_special_tokens=False)
        pieces, rest = _stream(spm.decoder(), ids)
        assert not any("\ufffd" in p for p in pieces), (sample, pieces)
        assert "".join(pieces) + rest == spm.decode(ids)
        held += pieces.count("")
    assert held > 20  # byte-fallback pieces were held back until their character was whole
    with pytest.raises(ValueError, match="byte by byte"):
        IncrementalDecoder(spm.tokenizer, byte_exact=True)


def _decode_property(text, ids_strategy):
    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(ids=ids_strategy)
    def check(ids):
        for decoder in _decoders(text):
            pieces, rest = _stream(decoder, ids)
            assert "".join(pieces) + rest == text.decode(ids)

    check()


def test_decoder_property_any_ids(checkpoints, tiny, spm_dir):
    """Any id sequence (broken UTF-8, specials, unknown ids): pushes + flush == decode."""
    bpe = ModelText.load(checkpoints["chatml"])
    _decode_property(bpe, st.lists(st.integers(0, 460), max_size=40))
    byte = ModelText(tokenizer=m.load_tokenizer(tiny), context_length=512)
    _decode_property(byte, st.lists(st.integers(0, 260), max_size=40))
    # the window path on SentencePiece byte-fallback pieces, runs up to its bound
    spm_text = ModelText.load(spm_dir)
    _decode_property(spm_text, st.lists(st.integers(0, 560), max_size=16))
    # the byte path is the library's decode too, Rust's lossy UTF-8 included
    library = tokenizers.Tokenizer.from_file(str(tiny / "tokenizer.json"))

    @settings(max_examples=150, deadline=None)
    @given(ids=st.lists(st.integers(0, 257), max_size=40))
    def same_as_library(ids):
        pieces, rest = _stream(byte.decoder(), ids)
        assert "".join(pieces) + rest == library.decode(ids, skip_special_tokens=True)

    same_as_library()


def test_decoder_property_texts(checkpoints):
    """Any text, encoded then streamed: no U+FFFD ever emitted, and the text comes back."""
    bpe = ModelText.load(checkpoints["chatml"])

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(sample=st.text(st.characters(exclude_categories=("Cs",)), max_size=30))
    def check(sample):
        ids = bpe.encode(sample, add_special_tokens=False)
        for decoder in _decoders(bpe):
            pieces, rest = _stream(decoder, ids)
            assert not any("\ufffd" in p for p in pieces) or "\ufffd" in sample
            assert "".join(pieces) + rest == bpe.decode(ids)

    check()


# -- stop strings -------------------------------------------------------------------------------


def test_stop_strings_examples():
    stops = StopStrings(["abc", "bd"])
    assert [stops.push(x) for x in ["xa", "b", "b", "dzz"]] == [
        ("x", False),
        ("", False),
        ("ab", False),
        ("", True),
    ]
    assert stops.flush() == "" and stops.push("more") == ("", True)
    held = StopStrings(["</end>"])
    assert held.push("text </e") == ("text ", False)
    assert held.flush() == "</e"
    assert StopStrings([]).push("abc") == ("abc", False)
    assert StopStrings(["", "x"]).stops == ("x",)
    with pytest.raises(ValueError, match="at most"):
        StopStrings(["a"] * 17)
    with pytest.raises(ValueError, match="string"):
        StopStrings([3])


@settings(max_examples=400, deadline=None)
@given(
    text=st.text("abcd🙂", max_size=40),
    stops=st.lists(st.text("abcd🙂", min_size=1, max_size=4), max_size=4),
    cuts=st.lists(st.integers(0, 40), max_size=10),
)
def test_stop_strings_property(text, stops, cuts):
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    want = text[: min(found)] if found else text
    chunks, at = [], 0
    for cut in sorted(cuts):
        chunks.append(text[at:cut])
        at = max(at, cut)
    chunks.append(text[at:])
    stopper = StopStrings(stops)
    out, stopped = "", False
    for chunk in chunks:
        piece, stopped = stopper.push(chunk)
        out += piece
        assert not any(s in out for s in stops)
        if stopped:
            break
    if not stopped:
        out += stopper.flush()
    assert out == want and stopped == bool(found)


# -- bad inputs ---------------------------------------------------------------------------------


def test_missing_template_is_a_clear_error(tiny, checkpoints, tmp_path, bpe_json):
    with pytest.raises(ModelError, match="no chat template"):
        ModelText(tokenizer=m.load_tokenizer(tiny), context_length=8).render_chat(CHATS[0])
    with pytest.raises(ModelError, match="no chat template"):
        ModelText.load(tiny).render_chat(CHATS[0])
    plain = ModelText.load(_bpe_checkpoint(tmp_path / "plain", bpe_json, None, chat=False))
    assert not plain.has_chat_template
    with pytest.raises(ModelError, match="no chat template"):
        plain.chat_ids(CHATS[0])


def test_bad_messages_and_roles(checkpoints):
    text = ModelText.load(checkpoints["llama3"])
    with pytest.raises(ct.TemplateRaised, match="Unknown role: tool"):
        text.render_chat([{"role": "tool", "content": "x"}])
    theirs = _hf(checkpoints["llama3"])
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
    path = _bpe_checkpoint(tmp_path / "huge", bpe_json, CHATML)
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
    path = _bpe_checkpoint(tmp_path / "broken", bpe_json, CHATML)
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


# -- the sandbox --------------------------------------------------------------------------------


def _render(source, **variables):
    return ct.ChatTemplate(source).render(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, variables=variables
    )


@pytest.mark.parametrize(
    "source,match",
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ cycler.__init__.__globals__['os'] }}", "unsafe"),
        ("{% set x = messages.append(1) %}", "unsafe|modif"),
        ("{{ 'a' * 100000000 }}", "repetition"),
        ("{{ [1] * 100000000 }}", "repetition"),
        ("{{ 2 ** 1000000000 }}", "power"),
        ("{{ '%100000000d' % 1 }}", "huge"),
        ("{{ '%*d' % (100000000, 1) }}", "huge"),
        ("{{ '{:>100000000}'.format(1) }}", "huge"),
        ("{{ '%100000000d' | format(1) }}", "huge"),
        ("{{ 'a' | center(100000000) }}", "width"),
        ("{{ 'a' | indent(100000000) }}", "width"),
        ("{{ messages | tojson(indent=100000000) }}", "indent"),
        ("{{ lipsum(100000) }}", "undefined|not callable|lipsum"),
        (
            "{% set ns = namespace(s='ab') %}{% for i in range(40) %}"
            "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s | length }}",
            "items",
        ),
        ("{{ ('a' * 4000000) | replace('a', 'aaaa') }}", "replace"),
        ("{% set ns = namespace(_x=1) %}", "may not start"),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "RecursionError"),
        ("{{ undefined_thing.attr }}", "undefined"),
        ("{% include 'x.txt' %}", "loader|not found"),
        ("{% import 'os' as os %}", "loader|not found"),
    ],
)
def test_sandbox_refuses(source, match):
    with pytest.raises(ModelError, match=match):
        _render(source)


@pytest.mark.parametrize(
    "source",
    [
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ dict.__call__.__globals__ }}",
        "{{ ''.format.__self__.__class__ }}",
        "{{ strftime_now.__code__ }}",
        "{{ messages | map(attribute='__class__') | list }}",
        "{{ messages | attr('__class__') }}",
        "{{ self.__init__ }}",
    ],
)
def test_sandbox_leaks_nothing(source):
    """Internals are either refused or read as undefined (empty), never rendered."""
    try:
        out = _render(source)
    except ModelError as exc:
        assert "unsafe" in str(exc) or "undefined" in str(exc)
    else:
        assert "<" not in out and "function" not in out and "class" not in out, out


def test_sandbox_bounds_time_and_output(monkeypatch):
    monkeypatch.setattr(ct, "RENDER_SECONDS", 0.2)
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ModelError, match="longer than 0.2 s"):
        _render(slow)
    monkeypatch.setattr(ct, "MAX_RENDERED_CHARS", 1000)
    with pytest.raises(ModelError, match="output over 1000"):
        _render("{% for i in range(100) %}{{ 'x' * 20 }}{% endfor %}")


def test_template_globals_as_transformers(checkpoints):
    from datetime import datetime

    year = datetime.now().strftime("%Y")
    assert _render("{{ strftime_now('%Y') }}") in (year, str(int(year) + 1))
    assert _render("{{ {'a': '<é>'} | tojson }}") == '{"a": "<é>"}'
    assert _render("{{ dict(a=1) | tojson }}") == '{"a": 1}'
    assert _render("{{ bos_token }}|{{ tools }}", bos_token="<s>") == "<s>|None"
    assert _render("{% for m in messages %}{{ m.role }}{% break %}{% endfor %}") == "user"
    text = ModelText.load(checkpoints["chatml"])
    out = text.render_chat(
        [{"role": "user", "content": "x"}],
        template_kwargs={"add_generation_prompt": False},
    )
    assert "<|im_start|>assistant" in out  # add_generation_prompt is ours to set
