"""The Llama shard model: config, tiny checkpoints, loading, and equality with transformers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

from safetensors.torch import load_file, save_file  # noqa: E402

from daemon.shards import model as m  # noqa: E402

PROMPT = [m.BYTE_BOS_ID, *b"The quick brown fox jumps"]
DECODE = [*b" over"]
TOL = 1e-5
LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    # small, so this tiny model has high, medium and low frequency bands
    "original_max_position_embeddings": 32,
}
VARIANTS = {
    "default": {},
    "llama3": {"rope_scaling": LLAMA3, "rope_theta": 500000.0},
    "tied": {"tie": True},
    "mha": {"kv_heads": 4},
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {name: m.make_tiny(root / name, **kw) for name, kw in VARIANTS.items()}


@pytest.fixture(scope="module")
def tiny(ckpts) -> Path:
    return ckpts["default"]


@pytest.fixture(scope="module")
def whole(tiny) -> m.LlamaShard:
    return m.load_model(tiny)


def ids(tokens: list[int]) -> torch.Tensor:
    return torch.tensor([tokens], dtype=torch.int64)


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def run_chain(shards, tokens, caches=None, positions=None) -> torch.Tensor:
    hidden = ids(tokens)
    for i, shard in enumerate(shards):
        hidden = shard(hidden, None if caches is None else caches[i], positions)
    return hidden


# --- config -----------------------------------------------------------------------------


def test_config_from_tiny_dir(tiny):
    cfg = m.LlamaConfig.from_dir(tiny)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (258, 64, 128)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (4, 4, 2)
    assert cfg.head_dim == 16 and cfg.rope_scaling is None and not cfg.tie_word_embeddings
    assert m.LlamaConfig.from_dict(cfg.to_json()) == cfg
    raw = json.loads((tiny / "config.json").read_text())
    assert raw["architectures"] == ["LlamaForCausalLM"] and raw["model_type"] == "llama"


def test_config_defaults_and_transformers5_rope_layout():
    base = {
        "model_type": "llama",
        "vocab_size": 100,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
    }
    cfg = m.LlamaConfig.from_dict(base)
    assert cfg.num_key_value_heads == 4 and cfg.head_dim == 8
    assert cfg.rope_theta == 10000.0 and cfg.rms_norm_eps == 1e-6
    new = m.LlamaConfig.from_dict(
        {**base, "rope_parameters": {**LLAMA3, "rope_theta": 5e5}, "head_dim": 16}
    )
    assert new.rope_theta == 5e5 and new.rope_scaling == LLAMA3 and new.head_dim == 16
    old_style = {
        k: v
        for k, v in LLAMA3.items()
        if k not in ("rope_type", "original_max_position_embeddings")
    }
    defaulted = m.LlamaConfig.from_dict(
        {**base, "max_position_embeddings": 77, "rope_scaling": {**old_style, "type": "llama3"}}
    )
    assert defaulted.rope_scaling["original_max_position_embeddings"] == 77


BASE = {
    "model_type": "llama",
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"vocab_size": None}, "missing field 'vocab_size'"),
        ({"hidden_size": "64"}, "hidden_size must be an integer"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1"),
        ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads"),
        ({"hidden_size": 30}, "not a multiple of num_attention_heads"),
        ({"model_type": "gpt2"}, "unsupported model_type 'gpt2'"),
        ({"model_type": None}, "missing field 'model_type'"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"mlp_bias": True}, "mlp_bias=true is not supported"),
        ({"rms_norm_eps": -1}, "rms_norm_eps must be a positive number"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "unsupported rope type 'yarn'"),
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "missing 'low_freq_factor'"),
        ({"rope_scaling": "big"}, "rope_scaling must be an object"),
        ({"tie_word_embeddings": "yes"}, "tie_word_embeddings must be a boolean"),
    ],
)
def test_config_errors(change, message):
    raw = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    with pytest.raises(m.ModelError, match=message):
        m.LlamaConfig.from_dict(raw)


def test_config_file_errors(tmp_path):
    with pytest.raises(m.ModelError, match="not found"):
        m.LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("{nope")
    with pytest.raises(m.ModelError, match="cannot read"):
        m.LlamaConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(m.ModelError, match="expected a JSON object"):
        m.LlamaConfig.from_dir(tmp_path)


def test_sizes_for_the_planner(tiny):
    cfg = m.LlamaConfig.from_dir(tiny)
    per_layer = 64 * 64 * 2 + 2 * (32 * 64) + 3 * 64 * 128 + 2 * 64
    assert cfg.layer_bytes("float32") == 4 * per_layer
    assert cfg.layer_bytes(torch.bfloat16) == 2 * per_layer
    assert cfg.embed_bytes("float16") == 2 * 258 * 64
    assert cfg.head_bytes("float32") == 4 * (64 + 258 * 64)
    total = sum(t.numel() * 4 for t in load_file(tiny / "model.safetensors").values())
    assert cfg.shard_bytes(0, 4) == total == 4 * cfg.num_parameters()


# --- tiny checkpoints -------------------------------------------------------------------


def test_make_tiny_is_deterministic(tmp_path):
    names = ["config.json", "model.safetensors", "tokenizer.json", "generation_config.json"]
    a, b = m.make_tiny(tmp_path / "a", seed=7), m.make_tiny(tmp_path / "b", seed=7)
    c = m.make_tiny(tmp_path / "c", seed=8)
    for name in names:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (c / "model.safetensors").read_bytes()


def test_make_tiny_scale(whole, tiny):
    tensors = load_file(tiny / "model.safetensors")
    assert 0.015 < tensors["model.layers.0.mlp.up_proj.weight"].std() < 0.025
    assert 0.9 < tensors["model.norm.weight"].mean() < 1.1
    logits = whole(ids(PROMPT))
    assert logits.dtype == torch.float32 and logits.shape == (1, len(PROMPT), 258)
    assert logits.std() > 0.05  # not degenerate
    assert len(set(logits[0].argmax(-1).tolist())) > 1


# --- equality with transformers ---------------------------------------------------------


@pytest.fixture(scope="module")
def transformers_mod():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_matches_transformers(transformers_mod, ckpts, variant):
    path = ckpts[variant]
    ref = transformers_mod.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = m.load_model(path)
    diffs = []
    with torch.no_grad():
        # prefill only
        want = ref(ids(PROMPT)).logits
        got = ours(ids(PROMPT))
        diffs.append(maxdiff(want, got))
        # prefill, then decode one token at a time with caches on both sides
        out = ref(ids(PROMPT), use_cache=True)
        past = out.past_key_values
        cache = ours.new_cache(max_len=64)
        diffs.append(maxdiff(out.logits, ours(ids(PROMPT), cache)))
        for token in DECODE:
            out = ref(ids([token]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            diffs.append(maxdiff(out.logits, ours(ids([token]), cache)))
    assert cache.length == len(PROMPT) + len(DECODE)
    print(f"{variant}: max abs diff vs transformers {max(diffs):.3g}")
    assert max(diffs) <= TOL, diffs


def test_greedy_generate_matches_transformers_generate(transformers_mod, tiny, whole):
    ref = transformers_mod.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    with torch.no_grad():
        out = ref.generate(ids(PROMPT), max_new_tokens=12, do_sample=False, eos_token_id=None)
    assert m.greedy_generate([whole], PROMPT, 12) == out[0, len(PROMPT) :].tolist()


# --- shards -----------------------------------------------------------------------------


RANGES = [(0, 1), (1, 3), (3, 4)]


@pytest.fixture(scope="module")
def chain(tiny) -> list[m.LlamaShard]:
    return [m.load_shard(tiny, start, end) for start, end in RANGES]


def test_chain_of_shards_equals_whole_model(chain, whole):
    assert maxdiff(run_chain(chain, PROMPT), whole(ids(PROMPT))) <= TOL
    caches = [shard.new_cache(max_len=40) for shard in chain]
    whole_cache = whole.new_cache(max_len=40)
    assert maxdiff(run_chain(chain, PROMPT, caches), whole(ids(PROMPT), whole_cache)) <= TOL
    for token in DECODE:
        assert maxdiff(run_chain(chain, [token], caches), whole(ids([token]), whole_cache)) <= TOL
    assert not chain[0].has_head and not chain[1].has_embedding and chain[2].has_head
    hidden = chain[0](ids(PROMPT))
    assert hidden.shape == (1, len(PROMPT), 64) and hidden.dtype == torch.float32


def test_cache_truncate_and_replay(whole):
    tokens = PROMPT + DECODE
    full = whole(ids(tokens))
    cache = whole.new_cache(max_len=len(tokens))
    whole(ids(PROMPT), cache)
    steps = [whole(ids([t]), cache) for t in DECODE]
    assert maxdiff(torch.cat(steps, dim=1), full[:, len(PROMPT) :]) <= TOL
    # Failover: forget the last 4 positions, replay them as one chunk at their positions.
    keep = len(tokens) - 4
    cache.truncate(keep)
    assert cache.length == keep
    with torch.inference_mode():  # as the shard server runs it, on a cache made outside
        replay = whole(ids(tokens[keep:]), cache, torch.arange(keep, len(tokens)))
    assert maxdiff(replay, full[:, keep:]) <= TOL
    assert cache.length == len(tokens)


def test_cache_is_bounded(whole):
    cache = whole.new_cache(max_len=len(PROMPT))
    assert cache.nbytes == 2 * 4 * (1 * 2 * len(PROMPT) * 16) * 4
    whole(ids(PROMPT), cache)
    with pytest.raises(m.KVCacheFull, match="max_len"):
        whole(ids([1]), cache)
    assert cache.length == len(PROMPT)
    with pytest.raises(m.ModelError, match="cannot truncate"):
        cache.truncate(len(PROMPT) + 1)
    with pytest.raises(m.ModelError, match="cannot truncate"):
        cache.truncate(-1)


def test_shard_reads_only_its_tensors(tiny, monkeypatch):
    cfg = m.LlamaConfig.from_dir(tiny)
    read: list[str] = []
    original = m.Checkpoint.get

    def spy(self, name, shape):
        read.append(name)
        return original(self, name, shape)

    monkeypatch.setattr(m.Checkpoint, "get", spy)
    middle = m.load_shard(tiny, 1, 3)
    assert set(read) == set(middle.checkpoint_names())
    assert all(name.startswith(("model.layers.1.", "model.layers.2.")) for name in read)
    assert middle.embed_tokens is None and middle.lm_head is None and middle.norm is None
    assert {n.split(".")[1] for n, _ in middle.named_parameters()} == {"1", "2"}
    # k of n layers hold about k/n of the layer weights
    all_layers = cfg.num_hidden_layers * cfg.layer_bytes()
    assert middle.nbytes() == pytest.approx(all_layers * 2 / 4, rel=0.01)
    assert middle.nbytes() == cfg.shard_bytes(1, 3)
    first, last = m.load_shard(tiny, 0, 1), m.load_shard(tiny, 3, 4)
    assert first.nbytes() == cfg.layer_bytes() + cfg.embed_bytes() == cfg.shard_bytes(0, 1)
    assert last.nbytes() == cfg.layer_bytes() + cfg.head_bytes() == cfg.shard_bytes(3, 4)


def test_tied_embeddings(ckpts):
    path = ckpts["tied"]
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    whole = m.load_model(path)
    assert whole.lm_head.weight is whole.embed_tokens.weight
    cfg = whole.config
    assert whole.nbytes() == cfg.shard_bytes(0, 4) == 4 * cfg.num_parameters()
    last = m.load_shard(path, 2, 4)
    assert "model.embed_tokens.weight" in last.checkpoint_names() and last.embed_tokens is None
    chain = [m.load_shard(path, 0, 2), last]
    assert maxdiff(run_chain(chain, PROMPT), whole(ids(PROMPT))) <= TOL


@pytest.mark.parametrize(("dtype", "atol"), [("float16", 5e-3), ("bfloat16", 3e-2)])
def test_half_precision_close_to_float32(tiny, whole, dtype, atol):
    half = m.load_model(tiny, dtype=dtype)
    assert half.dtype == m.DTYPES[dtype]
    cache = half.new_cache(max_len=40)
    assert cache.keys[0].dtype == m.DTYPES[dtype]
    got = torch.cat([half(ids(PROMPT), cache), half(ids(DECODE[:1]), cache)], dim=1)
    want = whole(ids(PROMPT + DECODE[:1]))
    assert got.dtype == torch.float32
    assert maxdiff(got, want) <= atol


def test_sharded_index_checkpoint(tmp_path, whole):
    path = m.make_tiny(tmp_path / "sharded", shards=3)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert files == [f"model-0000{k}-of-00003.safetensors" for k in (1, 2, 3)]
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(files)
    chain = [m.load_shard(path, 0, 2), m.load_shard(path, 2, 4)]
    assert maxdiff(run_chain(chain, PROMPT), whole(ids(PROMPT))) == 0.0
    # a file the index names but that is gone
    (path / files[-1]).unlink()
    with pytest.raises(m.ModelError, match="model-00003-of-00003.safetensors is missing"):
        m.load_shard(path, 2, 4)


# --- generation -------------------------------------------------------------------------


def test_greedy_generate_over_shards_equals_whole(chain, whole):
    want = m.greedy_generate([whole], PROMPT, 16)
    assert len(want) == 16
    assert m.greedy_generate(chain, PROMPT, 16) == want
    # stops after eos
    assert m.greedy_generate(chain, PROMPT, 16, eos_id=want[3]) == want[: want.index(want[3]) + 1]
    assert m.greedy_generate(chain, PROMPT, 0) == []


def test_sampling_is_reproducible(chain, whole):
    a = m.greedy_generate(chain, PROMPT, 12, temperature=1.0, seed=123)
    b = m.greedy_generate([whole], PROMPT, 12, temperature=1.0, seed=123)
    c = m.greedy_generate(chain, PROMPT, 12, temperature=1.0, seed=124)
    assert a == b and a != c
    assert all(0 <= t < 258 for t in a)


def test_chain_must_be_contiguous(chain):
    with pytest.raises(m.ModelError, match="not contiguous"):
        m.greedy_generate([chain[0], chain[2]], PROMPT, 2)
    with pytest.raises(m.ModelError, match="must start at layer 0"):
        m.greedy_generate(chain[1:], PROMPT, 2)


def test_input_validation(chain):
    with pytest.raises(m.ModelError, match="takes hidden states"):
        chain[1](ids(PROMPT))
    with pytest.raises(m.ModelError, match="token ids"):
        chain[0](torch.zeros(1, 3, 64))
    with pytest.raises(m.ModelError, match="positions"):
        chain[0](ids(PROMPT), positions=[0, 1])
    with pytest.raises(m.ModelError, match="cache has"):
        chain[0](ids(PROMPT), chain[1].new_cache(max_len=40))


# --- broken checkpoints -----------------------------------------------------------------


def test_missing_tensor_and_wrong_shape(tmp_path):
    path = m.make_tiny(tmp_path / "broken", layers=2)
    file = path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file)
    m.load_shard(path, 0, 1)  # the other layer's shard does not need it
    with pytest.raises(m.ModelError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        m.load_shard(path, 1, 2)
    tensors["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 63)
    save_file(tensors, file)
    with pytest.raises(m.ModelError, match=r"up_proj.weight' has shape \[128, 63\]"):
        m.load_model(path)


def test_bad_checkpoint_dirs(tmp_path):
    path = m.make_tiny(tmp_path / "t", layers=2)
    with pytest.raises(m.ModelError, match="not inside"):
        m.load_shard(path, 1, 3)
    with pytest.raises(m.ModelError, match="unsupported dtype"):
        m.load_shard(path, 0, 2, dtype="int8")
    (path / "model.safetensors").unlink()
    with pytest.raises(m.ModelError, match="no model.safetensors"):
        m.load_model(path)
    raw = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**raw, "model_type": "gpt2"}))
    with pytest.raises(m.ModelError, match="unsupported model_type"):
        m.load_model(path)


# --- tokenizer --------------------------------------------------------------------------


def test_byte_tokenizer(tiny):
    tok = m.load_tokenizer(tiny)
    assert tok.is_byte_level and (tok.bos_id, tok.eos_id) == (256, 257)
    text = "héllo, wörld ✓"
    encoded = tok.encode(text)
    assert encoded == list(text.encode()) and tok.decode(encoded) == text
    assert tok.encode("a", add_bos=True) == [256, 97]
    assert tok.decode([256, 104, 105, 257]) == "hi"


def test_byte_tokenizer_file_is_a_real_tokenizers_file(tiny):
    tokenizers = pytest.importorskip("tokenizers")
    hf = tokenizers.Tokenizer.from_file(str(tiny / "tokenizer.json"))
    text = "Byte-level: héllo ✓ \n\t end"
    assert hf.encode(text, add_special_tokens=False).ids == list(text.encode())
    assert hf.decode([256, *text.encode(), 257]) == text
    # a tokenizer.json that is not ours goes through the library
    spec = json.loads((tiny / "tokenizer.json").read_text())
    spec["model"]["vocab"]["ab"] = 258
    spec["model"]["merges"] = [["a", "b"]]
    other = tiny.parent / "other_tok"
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps(spec))
    (other / "config.json").write_text(json.dumps({"bos_token_id": 256, "eos_token_id": [257]}))
    tok = m.load_tokenizer(other)
    assert not tok.is_byte_level and (tok.bos_id, tok.eos_id) == (256, 257)
    assert tok.encode("xab") == [ord("x"), 258] and tok.decode([ord("x"), 258]) == "xab"


# --- CLI --------------------------------------------------------------------------------


def test_cli_make_tiny(tmp_path):
    from typer.testing import CliRunner

    from daemon.cli.model import model_app

    result = CliRunner().invoke(
        model_app, ["make-tiny", str(tmp_path / "cli"), "--layers", "2", "--shards", "2"]
    )
    assert result.exit_code == 0, result.output
    cfg = m.LlamaConfig.from_dir(tmp_path / "cli")
    assert f"parameters: {cfg.num_parameters():,}" in result.output
    assert f"bytes:      {4 * cfg.num_parameters():,}" in result.output
    assert (tmp_path / "cli" / "model.safetensors.index.json").is_file()
    # a chat template by default (chat requests work on it as it is), none when asked
    from daemon.serving.text import ModelText

    chat = [{"role": "user", "content": "hi"}]
    assert "user" in ModelText.load(tmp_path / "cli").render_chat(chat)
    plain = CliRunner().invoke(
        model_app, ["make-tiny", str(tmp_path / "plain"), "--no-chat-template"]
    )
    assert plain.exit_code == 0, plain.output
    assert not ModelText.load(tmp_path / "plain").has_chat_template
    bad = CliRunner().invoke(model_app, ["make-tiny", str(tmp_path / "bad"), "--dtype", "int8"])
    assert bad.exit_code == 1 and "unsupported dtype" in bad.output


# --- CUDA (runs where a GPU is present) -------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cuda_matches_cpu_and_transformers(ckpts, variant):
    path = ckpts[variant]
    cpu = m.load_model(path)
    gpu = m.load_model(path, device="cuda")
    assert gpu.device.type == "cuda"
    want = cpu(ids(PROMPT + DECODE))
    cache = gpu.new_cache(max_len=40)
    got = torch.cat([gpu(ids(PROMPT), cache), gpu(ids(DECODE), cache)], dim=1)
    assert got.device.type == "cuda" and maxdiff(got.cpu(), want) <= 1e-4
    chain = [m.load_shard(path, 0, 1, device="cuda"), m.load_shard(path, 1, 4)]  # mixed devices
    assert maxdiff(run_chain(chain, PROMPT).cpu(), want[:, : len(PROMPT)]) <= 1e-4
    assert m.greedy_generate([gpu], PROMPT, 8) == m.greedy_generate([cpu], PROMPT, 8)
    for dtype in ("float16", "bfloat16"):
        half = m.load_model(path, dtype=dtype, device="cuda")
        assert maxdiff(half(ids(PROMPT)).cpu(), want[:, : len(PROMPT)]) <= 3e-2
    transformers = pytest.importorskip("transformers")
    ref = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    with torch.no_grad():
        assert maxdiff(ref(ids(PROMPT).cuda()).logits, gpu(ids(PROMPT))) <= TOL
