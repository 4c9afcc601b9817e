"""Shared by the text tests: a byte-level BPE tokenizer trained here, a SentencePiece-style
one, chat templates written for these tests (ChatML, Llama-3 style, a reasoning one) and the
checkpoints that hold them."""

from __future__ import annotations

import functools
import json

import pytest

from daemon.serving.text import IncrementalDecoder
from daemon.shards import model as m

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


def train_bpe():
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


@functools.cache
def bpe_json_text() -> str:
    """The trained tokenizer.json (trained once per process)."""
    return train_bpe().to_str()


def bpe_checkpoint(path, bpe_json, template, *, eos=(6, 3), chat=True):
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


def make_checkpoints(root):
    """A checkpoint directory per template of TEMPLATES, all with the trained BPE."""
    return {name: bpe_checkpoint(root / name, bpe_json_text(), t) for name, t in TEMPLATES.items()}


def make_tiny(root):
    return m.make_tiny(root / "m", layers=1, chat_template=None)  # the tests of "no template"


def hf(path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def stream(decoder, ids):
    pieces = [decoder.push(i) for i in ids]
    return pieces, decoder.flush()


def decoders(text):
    yield text.decoder()
    if not text.tokenizer.is_byte_level:
        yield IncrementalDecoder(text.tokenizer, byte_exact=False)  # the window algorithm


def spm_tokenizer():
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


def make_spm_dir(root):
    path = root / "m"
    path.mkdir()
    (path / "tokenizer.json").write_text(spm_tokenizer())
    (path / "config.json").write_text(json.dumps({"max_position_embeddings": 64}))
    return path
