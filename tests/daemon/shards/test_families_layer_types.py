"""Per-layer attention kinds (`layer_types`: full or sliding window, layer by layer) served
exactly as transformers computes them.

transformers 5 writes `"layer_types"` into a Mistral config (and reads such a config as
Ministral, whose layers alternate), and Qwen2/Qwen3 take it in place of `max_window_layers`.
Tiny checkpoints written by transformers itself: our greedy tokens equal its `generate`, in
one process, through a chain of shards and over 3 daemons; each layer's KV cache is bounded
by the window only where that layer slides; unknown kinds are refused naming the field and
the value; `gridmesh model inspect` and `make-tiny` show and write them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from daemon.cli.model import model_app  # noqa: E402
from daemon.shards import model as m  # noqa: E402
from tests.daemon.harness import inline_threads, memory_cluster  # noqa: E402
from tests.daemon.shards.test_families import (  # noqa: E402
    BASE,
    NEW,
    PROMPTS,
    RANGES,
    SIZES,
    TOL,
    _perturb,
    failover_generation,
    hf_greedy,
    ids,
    reference,
)

F, S = m.FULL, m.SLIDING
# case -> (transformers class names, config changes, the layer types transformers reads)
CASES: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    # Ministral-style: every other layer slides, written by transformers as a Mistral config
    "mistral_mixed": ("Mistral", {"sliding_window": 6, "layer_types": [S, F, S, F]}, (S, F, S, F)),
    # layer_types naming every layer sliding (what a plain Mistral config means)
    "mistral_sliding": ("Mistral", {"sliding_window": 5, "layer_types": [S] * 4}, (S,) * 4),
    # the model_type transformers gives such a config (its attention needs head_dim given)
    "ministral": (
        "Ministral",
        {"sliding_window": 7, "layer_types": [F, S, S, F], "head_dim": 16},
        (F, S, S, F),
    ),
    # Qwen2/Qwen3: explicit layer_types, a pattern max_window_layers cannot say
    "qwen2_types": (
        "Qwen2",
        {"use_sliding_window": True, "sliding_window": 6, "layer_types": [S, F, F, S]},
        (S, F, F, S),
    ),
    "qwen3_types": (
        "Qwen3",
        {"use_sliding_window": True, "sliding_window": 7, "layer_types": [F, S, F, S]},
        (F, S, F, S),
    ),
}


def write_hf(path: Path, case: str, seed: int) -> Path:
    prefix, changes, _ = CASES[case]
    config = getattr(transformers, f"{prefix}Config")(**SIZES, **changes)
    torch.manual_seed(seed)
    model = getattr(transformers, f"{prefix}ForCausalLM")(config).to(torch.float32).eval()
    _perturb(model)
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    root = tmp_path_factory.mktemp("layer_types")
    return {case: write_hf(root / case, case, 10 + seed) for seed, case in enumerate(CASES)}


@pytest.mark.parametrize("case", list(CASES))
def test_config_reads_the_layer_types_transformers_reads(hf, case):
    written = json.loads((hf[case] / "config.json").read_text())
    assert written["layer_types"] == list(CASES[case][2])  # transformers wrote them
    config = m.ModelConfig.from_dir(hf[case])
    ref = reference(hf[case])
    assert config.layer_types == tuple(ref.config.layer_types) == CASES[case][2]
    assert config.sliding_window == CASES[case][1]["sliding_window"]
    for i in range(4):
        want = config.sliding_window if config.layer_types[i] == S else None
        assert config.layer_window(i) == want
        assert ref.model.layers[i].self_attn.sliding_window == want
    # what we would write reads back the same, and names the layers where they differ
    assert m.ModelConfig.from_dict(config.to_json()) == config
    if case.startswith(("mistral", "ministral")):
        assert config.family == "mistral"
        assert ("layer_types" in config.to_json()) == (case != "mistral_sliding")


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_in_one_process_and_over_shards(hf, case):
    """The whole model and a chain of 3 shards (each layer with its own kind), several
    prompts longer than the windows."""
    ref = reference(hf[case])
    whole = m.load_model(hf[case])
    chain = [m.load_shard(hf[case], a, b) for a, b in RANGES]
    assert [w for s in chain for w in s.windows] == [
        CASES[case][1]["sliding_window"] if kind == S else None for kind in CASES[case][2]
    ]
    for prompt in PROMPTS:
        want = hf_greedy(ref, prompt)
        assert m.greedy_generate([whole], prompt, NEW) == want, prompt
        assert m.greedy_generate(chain, prompt, NEW) == want, prompt


@pytest.mark.parametrize("case", ["mistral_mixed", "qwen2_types"])
def test_decode_steps_past_the_window_match_transformers(hf, case):
    """Prefill, then one token at a time past the window, caches on both sides; then the
    fixed-shape decode step (CUDA graphs on a GPU, eager here) gives the eager logits."""
    ref, ours = reference(hf[case]), m.load_model(hf[case])
    tokens = PROMPTS[2]
    diffs = []
    with torch.no_grad():
        out = ref(ids(tokens[:5]), use_cache=True)
        cache = ours.new_cache(max_len=64)
        diffs.append((out.logits - ours(ids(tokens[:5]), cache)).abs().max().item())
        past = out.past_key_values
        for token in tokens[5:]:
            out = ref(ids([token]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            diffs.append((out.logits - ours(ids([token]), cache)).abs().max().item())
    assert max(diffs) <= TOL, diffs
    eager, static = ours.new_cache(max_len=40), ours.new_cache(max_len=40)
    ours(ids(PROMPTS[1]), eager)
    ours(ids(PROMPTS[1]), static)
    decoder = m.StaticDecoder(ours, static, graph=False)
    for t in tokens[:20]:
        assert (ours(ids([t]), eager) - decoder.step(ids([t]))).abs().max() <= 1e-5


def test_kv_cache_is_bounded_by_the_window_on_sliding_layers_only(hf):
    shard = m.load_model(hf["mistral_mixed"])  # S F S F, window 6
    config = shard.config
    cache = shard.new_cache(max_len=100)
    assert [cache.keys[i].shape[2] for i in range(4)] == [6, 100, 6, 100]
    assert [cache.is_ring(i) for i in range(4)] == [True, False, True, False]
    per_layer = 2 * 2 * 16 * 4  # keys and values of 2 kv heads of 16, float32
    assert cache.nbytes == config.kv_cache_bytes(100) == per_layer * (6 + 100 + 6 + 100)
    # a shard of the full layer 1 and the sliding layer 2
    middle = m.load_shard(hf["mistral_mixed"], 1, 3).new_cache(max_len=100)
    assert [middle.keys[i].shape[2] for i in range(2)] == [100, 6]
    assert middle.nbytes == config.kv_cache_bytes(100, 1, 3) == per_layer * 106
    everywhere = m.load_model(hf["mistral_sliding"]).new_cache(max_len=100)
    assert everywhere.nbytes == per_layer * 4 * 5


@pytest.fixture
def one_thread(monkeypatch):
    inline_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


async def test_mixed_layer_types_over_three_daemons(autojump_clock, tmp_path, hf, one_thread):
    """Mixed and all-sliding models deployed over 3 daemons (layers 0-1, 1-3, 3-4): every
    prompt's greedy tokens equal transformers' `generate`."""
    async with memory_cluster(tmp_path / "net", 3) as net:
        for case in ("mistral_mixed", "mistral_sliding", "qwen3_types"):
            ref = reference(hf[case])
            await net.deploy(hf[case], net.daemons, RANGES, model=case)
            for i, prompt in enumerate(PROMPTS):
                result = await net.daemons[i % 3].call(
                    "generate",
                    {"model": case, "token_ids": prompt, "max_tokens": NEW, "client": "u"},
                )
                assert result["error"] is None, result
                assert result["tokens"] == hf_greedy(ref, prompt), (case, prompt)


async def test_mixed_layer_types_fail_over_by_replay(autojump_clock, tmp_path, hf, one_thread):
    """The server of layers 2-4 (one sliding, one full) killed mid-generation, past the
    window: the replica replays into fresh caches and the tokens are transformers'."""
    prompt = PROMPTS[2]
    want = hf_greedy(reference(hf["mistral_mixed"]), prompt, 16)
    async with memory_cluster(tmp_path / "net", 5) as net:
        got = await failover_generation(net, hf["mistral_mixed"], "mixed", prompt, 16)
    assert got == want


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"model_type": "mistral", "layer_types": [F, "chunked_attention"]},
            r"layer_types\[1\]: unsupported 'chunked_attention'",
        ),
        ({"model_type": "mistral", "layer_types": ["bogus", F]}, r"layer_types\[0\]: .*'bogus'"),
        ({"model_type": "ministral", "layer_types": [S]}, "layer_types has 1 entries for 2"),
        ({"model_type": "mistral", "layer_types": "sliding"}, "layer_types must be a list"),
        ({"model_type": "mistral", "layer_types": [S, 3]}, "layer_types must be a list of str"),
        (
            {"model_type": "mistral", "sliding_window": None, "layer_types": [S, F]},
            "sliding layers but no sliding_window",
        ),
        (
            {"model_type": "qwen3", "use_sliding_window": True, "layer_types": [F, "x" * 500]},
            r"layer_types\[1\]: unsupported 'x{60}';",
        ),
        # transformers' Ministral ignores it; gridmesh reads no field it does not use
        (
            {"model_type": "mistral", "layer_types": [S, F], "max_window_layers": 1},
            "unknown field 'max_window_layers' for model_type 'mistral'",
        ),
        ({"model_type": "mixtral", "layer_types": [S, F]}, "unknown field 'layer_types'"),
    ],
)
def test_unknown_layer_types_are_refused_naming_field_and_value(raw, message):
    with pytest.raises(m.ModelError, match=message):
        m.ModelConfig.from_dict({**BASE, **raw})


def test_layer_types_defaults_as_transformers_reads_them():
    # "attention" is transformers' older name of "full_attention" (it remaps it too)
    old = m.ModelConfig.from_dict(
        {**BASE, "model_type": "mistral", "sliding_window": 8, "layer_types": ["attention", S]}
    )
    assert old.layer_types == (F, S) and old.layer_window(0) is None
    # no window and every layer full: nothing slides
    plain = m.ModelConfig.from_dict(
        {**BASE, "model_type": "mistral", "sliding_window": None, "layer_types": [F, F]}
    )
    assert plain.layer_types == (F, F) and plain.kv_cache_bytes(50) == 50 * 2 * 2 * 2 * 8 * 4
    # a window, yet every layer full: the window is read by no layer
    unused = m.ModelConfig.from_dict(
        {**BASE, "model_type": "mistral", "sliding_window": 4, "layer_types": [F, F]}
    )
    assert [unused.layer_window(i) for i in range(2)] == [None, None]
    assert unused.to_json()["layer_types"] == [F, F]  # written, since it is not the default
    # Qwen: layer_types wins over max_window_layers, as transformers' config does
    qwen = m.ModelConfig.from_dict(
        {
            **BASE,
            "model_type": "qwen2",
            "use_sliding_window": True,
            "max_window_layers": 0,
            "layer_types": [S, F],
        }
    )
    assert qwen.layer_types == (S, F)


def test_inspect_and_make_tiny_show_the_layer_types(tmp_path, hf):
    runner = CliRunner()
    result = runner.invoke(model_app, ["inspect", str(hf["mistral_mixed"])])
    assert result.exit_code == 0, result.output
    assert "attention:    sliding window 6 on 2 layers (0, 2), full on 2 (1, 3)" in result.output
    assert "KV cache:     1,024 bytes per token (256 per layer)" in result.output
    assert "sliding layers hold at most 6 tokens" in result.output
    report = runner.invoke(model_app, ["inspect", str(hf["mistral_mixed"]), "--json"])
    doc = json.loads(report.output)
    assert doc["servable"] and doc["layer_types"] == [S, F, S, F]
    assert doc["sliding_layers"] == [0, 2]
    assert doc["kv_cache_bytes_at_max_positions"] == 256 * (6 + 256 + 6 + 256)
    result = runner.invoke(model_app, ["inspect", str(hf["mistral_sliding"])])
    assert "attention:    sliding window 5 on all layers" in result.output
    # make-tiny writes a mixed model transformers reads as such (Ministral), same tokens
    out = tmp_path / "tiny"
    result = runner.invoke(
        model_app,
        ["make-tiny", str(out), "--family", "mistral", "--sliding-window", "5"]
        + ["--layer-types", f"{F},{S},{S},{F}"],
    )
    assert result.exit_code == 0, result.output
    config = m.ModelConfig.from_dir(out)
    assert config.layer_types == (F, S, S, F)
    ref = reference(out)
    assert type(ref).__name__ == "MinistralForCausalLM"
    prompt = [m.BYTE_BOS_ID, *b"a window of five over the prompt, layers 1 and 2"]
    assert m.greedy_generate([m.load_model(out)], prompt, 8) == hf_greedy(ref, prompt, 8)
    bad = runner.invoke(
        model_app,
        ["make-tiny", str(tmp_path / "x"), "--family", "llama", "--layer-types", F],
    )
    assert bad.exit_code == 1 and "family 'llama' reads no layer_types" in bad.output
    bad = runner.invoke(
        model_app,
        ["make-tiny", str(tmp_path / "y"), "--family", "mistral", "--layer-types", "full,x"],
    )
    assert bad.exit_code == 1 and "layer_types has 2 entries for 4 layers" in bad.output
