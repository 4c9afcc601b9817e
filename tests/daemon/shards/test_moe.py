"""Mixture-of-experts blocks against transformers' own (same weights): outputs, routed experts,
the checkpoint layouts transformers writes, and the refusals.

Float32 tolerance: both sides compute the same float32 dot products (length <= 2 * hidden)
with different kernels (oneDNN here, MKL / torch's grouped_mm there) and so in a different
summation order, and transformers' eager path adds a token's k expert outputs in expert
order where we (and its default grouped_mm path) sum them by slot. That is a few ulp per
output: up to 2.6e-7 seen on outputs up to 4.2. rtol 1e-5 / atol 1e-6 is ~40-80 ulp, far
below what a wrong expert, weight or cast would give (>= 1e-3 here). In bfloat16 the
default path of transformers (grouped_mm) and ours round at the same places, and are
compared for equality: a different cast order would show there.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

from daemon.shards.model.config import ModelError  # noqa: E402
from daemon.shards.model.moe import FUSED_PREFIX, MoESpec, SparseMoE  # noqa: E402

HIDDEN = 32
TOKEN_COUNTS = (1, 3, 17, 64)

QWEN = {
    "model_type": "qwen3_moe",
    "vocab_size": 300,
    "hidden_size": HIDDEN,
    "intermediate_size": 48,
    "moe_intermediate_size": 16,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "num_experts": 8,
    "num_experts_per_tok": 3,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
}
MIXTRAL = {
    "model_type": "mixtral",
    "vocab_size": 300,
    "hidden_size": HIDDEN,
    "intermediate_size": 16,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_local_experts": 6,
    "num_experts_per_tok": 2,
}


def _hf_config(raw: dict, impl: str = "grouped_mm"):
    fields = {k: v for k, v in raw.items() if k != "model_type"}
    if raw["model_type"] == "mixtral":
        config = transformers.MixtralConfig(**fields)
    else:
        config = transformers.Qwen3MoeConfig(**fields)
    config._experts_implementation = impl
    return config


def _hf_block(raw: dict, impl: str, dtype, seed: int = 0):
    """transformers' sparse block with random weights at a scale where routing matters."""
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    config = _hf_config(raw, impl)
    torch.manual_seed(seed)
    cls = MixtralSparseMoeBlock if raw["model_type"] == "mixtral" else Qwen3MoeSparseMoeBlock
    block = cls(config)
    with torch.no_grad():
        block.gate.weight.normal_(0, 0.5)
        block.experts.gate_up_proj.normal_(0, 0.2)
        block.experts.down_proj.normal_(0, 0.2)
    return block.to(dtype).eval()


def _per_expert(spec: MoESpec, fused: dict) -> dict:
    """transformers' in-memory (fused) block weights in the Hub's per-expert names."""
    inter = spec.expert_intermediate_size
    gate, up, down = (
        ("w1", "w3", "w2")
        if spec.layout == "mixtral"
        else (
            "gate_proj",
            "up_proj",
            "down_proj",
        )
    )
    out = {"gate.weight": fused["gate.weight"]}
    for e in range(spec.num_experts):
        out[f"experts.{e}.{gate}.weight"] = fused["experts.gate_up_proj"][e, :inter].clone()
        out[f"experts.{e}.{up}.weight"] = fused["experts.gate_up_proj"][e, inter:].clone()
        out[f"experts.{e}.{down}.weight"] = fused["experts.down_proj"][e].clone()
    return out


def _block_weights(block) -> dict:
    return {k: v.detach().clone() for k, v in block.state_dict().items()}


def _compare(block, moe: SparseMoE, dtype, *, exact: bool) -> None:
    generator = torch.Generator().manual_seed(1)
    for tokens in TOKEN_COUNTS:
        x = torch.randn(2, tokens, HIDDEN, generator=generator).to(dtype)
        with torch.no_grad():
            want = block(x)
            got = moe(x)
            _, want_weights, want_ids = block.gate(x.reshape(-1, HIDDEN))
            ids, weights = moe.route(x)
        assert torch.equal(ids, want_ids), tokens
        assert weights.dtype == want_weights.dtype
        assert torch.equal(weights, want_weights), tokens
        assert got.shape == want.shape and got.dtype == want.dtype
        if exact:
            assert torch.equal(got, want), (tokens, (got - want).abs().max())
        else:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_qwen3_moe_block_matches_transformers_float32(impl, fused, renormalize):
    raw = {**QWEN, "norm_topk_prob": renormalize}
    spec = MoESpec.from_config(raw, "qwen3_moe")
    assert spec.renormalize is renormalize
    block = _hf_block(raw, impl, torch.float32)
    weights = _block_weights(block)
    moe = SparseMoE(spec, HIDDEN, weights if fused else _per_expert(spec, weights))
    _compare(block, moe, torch.float32, exact=False)


@pytest.mark.parametrize("raw", [QWEN, MIXTRAL], ids=["qwen3_moe", "mixtral"])
def test_bfloat16_equals_transformers_default_path(raw):
    """The cast order (Qwen3-MoE: routing weights cast to bf16 first; Mixtral: weighted
    outputs in float32, cast once) gives transformers' grouped_mm result bit for bit."""
    spec = MoESpec.from_config(raw, raw["model_type"])
    block = _hf_block(raw, "grouped_mm", torch.bfloat16)
    moe = SparseMoE(spec, HIDDEN, _per_expert(spec, _block_weights(block)))
    _compare(block, moe, torch.bfloat16, exact=True)


@pytest.mark.parametrize("impl", ["grouped_mm", "eager"])
def test_mixtral_block_matches_transformers_float32(impl):
    spec = MoESpec.from_config(MIXTRAL, "mixtral")
    assert spec.renormalize and spec.float32_weights and spec.prefix == "block_sparse_moe."
    block = _hf_block(MIXTRAL, impl, torch.float32)
    moe = SparseMoE(spec, HIDDEN, _per_expert(spec, _block_weights(block)))
    _compare(block, moe, torch.float32, exact=False)


def test_experts_compute_only_their_tokens():
    """Each expert runs once per forward on exactly the rows routed to it; an expert no
    token picked never runs (no dense all-experts compute)."""
    spec = MoESpec.from_config(QWEN, "qwen3_moe")
    block = _hf_block(QWEN, "grouped_mm", torch.float32)
    moe = SparseMoE(spec, HIDDEN, _per_expert(spec, _block_weights(block)))
    rows: dict[int, list[int]] = {e: [] for e in range(spec.num_experts)}
    for e, expert in enumerate(moe.experts):
        expert.register_forward_hook(lambda _m, args, _out, e=e: rows[e].append(args[0].shape[0]))
    for tokens in (1, 2, 40):
        for calls in rows.values():
            calls.clear()
        x = torch.randn(1, tokens, HIDDEN)
        with torch.no_grad():
            ids, _ = moe.route(x)
            moe(x)
        for e in range(spec.num_experts):
            routed = int((ids == e).sum())
            assert rows[e] == ([routed] if routed else []), (tokens, e)
        assert sum(sum(calls) for calls in rows.values()) == tokens * spec.top_k
        if tokens == 1:  # one token: top_k experts run, the others not at all
            assert sum(len(calls) for calls in rows.values()) == spec.top_k


# A whole tiny model saved by transformers: the layouts on disk ----------------------------


def _save_model(raw: dict, out, *, original: bool):
    config = _hf_config(raw)
    torch.manual_seed(0)
    cls = (
        transformers.MixtralForCausalLM
        if raw["model_type"] == "mixtral"
        else transformers.Qwen3MoeForCausalLM
    )
    model = cls(config).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate") and hasattr(layer.mlp.gate, "top_k"):
                layer.mlp.gate.weight.normal_(0, 0.5)
    model.save_pretrained(out, save_original_format=original)
    return model


def _read(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path / "model.safetensors"))


SPARSE_QWEN = {**QWEN, "decoder_sparse_step": 2, "mlp_only_layers": [3]}  # sparse: layer 1 only


@pytest.mark.parametrize("raw", [SPARSE_QWEN, MIXTRAL], ids=["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("original", [True, False], ids=["hub_layout", "fused_layout"])
def test_saved_checkpoint_matches_layer_shapes_and_model(raw, original, tmp_path):
    """transformers' save_pretrained writes the Hub's per-expert names by default and the
    fused ones with save_original_format=False: `checkpoint_layer_shapes` names exactly the
    MLP tensors of every layer in both (dense and sparse layers), and a `SparseMoE` loaded
    from the file gives the model's own block output and routed experts on its real input."""
    model = _save_model(raw, tmp_path, original=original)
    tensors = _read(tmp_path)
    saved_config = json.loads((tmp_path / "config.json").read_text())
    spec = MoESpec.from_config(saved_config, raw["model_type"])
    layers = raw["num_hidden_layers"]
    for i in range(layers):
        prefix = f"model.layers.{i}."
        layer_tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        block = {
            k: v
            for k, v in layer_tensors.items()
            if not k.startswith(("self_attn.", "input_layernorm.", "post_attention_layernorm."))
        }
        shapes = spec.checkpoint_layer_shapes(HIDDEN, i, lambda name, t=layer_tensors: name in t)
        assert {k: tuple(v.shape) for k, v in block.items()} == shapes, i
        hf_mlp = model.model.layers[i].mlp
        assert spec.is_moe_layer(i) == hasattr(hf_mlp, "experts"), i
        assert spec.layer_params(HIDDEN, i) == sum(p.numel() for p in hf_mlp.parameters())
        if not original and spec.is_moe_layer(i):
            assert all(k.startswith(FUSED_PREFIX) for k in block)
    moe_layer = next(i for i in range(layers) if spec.is_moe_layer(i))
    prefix = f"model.layers.{moe_layer}."
    layer_tensors = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
    moe = SparseMoE(spec, HIDDEN, spec.block_weights(layer_tensors))
    seen: dict[str, object] = {}
    hf_mlp = model.model.layers[moe_layer].mlp
    hf_mlp.register_forward_hook(lambda _m, args, out: seen.update(x=args[0], out=out))
    hf_mlp.gate.register_forward_hook(lambda _m, _args, out: seen.update(ids=out[2]))
    generator = torch.Generator().manual_seed(3)
    for tokens in (1, 6, 25):
        ids = torch.randint(0, raw["vocab_size"], (1, tokens), generator=generator)
        with torch.no_grad():
            model(ids)
            got = moe(seen["x"])
            routed, _ = moe.route(seen["x"])
        assert torch.equal(routed, seen["ids"]), tokens
        torch.testing.assert_close(got, seen["out"], rtol=1e-5, atol=1e-6)


def test_num_experts_as_transformers_writes_it(tmp_path):
    """transformers 5 writes `num_local_experts` for Qwen3-MoE (the Hub's configs say
    `num_experts`): both are read, and a config giving both must agree."""
    _save_model(QWEN, tmp_path, original=True)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "num_experts" not in saved or saved["num_experts"] is None
    assert MoESpec.from_config(saved, "qwen3_moe").num_experts == QWEN["num_experts"]
    assert MoESpec.from_config(QWEN, "qwen3_moe").num_experts == QWEN["num_experts"]
    both = {**QWEN, "num_local_experts": QWEN["num_experts"]}
    assert MoESpec.from_config(both, "qwen3_moe").num_experts == QWEN["num_experts"]
    with pytest.raises(ModelError, match="num_experts 8 and num_local_experts 4 disagree"):
        MoESpec.from_config({**QWEN, "num_local_experts": 4}, "qwen3_moe")


def test_sparse_layers_follow_step_and_mlp_only_layers():
    spec = MoESpec.from_config(
        {**QWEN, "num_hidden_layers": 6, "decoder_sparse_step": 2, "mlp_only_layers": [3]},
        "qwen3_moe",
    )
    assert [spec.is_moe_layer(i) for i in range(6)] == [False, True, False, False, False, True]
    assert spec.layer_shapes(HIDDEN, 0) == {
        "mlp.gate_proj.weight": (48, HIDDEN),
        "mlp.up_proj.weight": (48, HIDDEN),
        "mlp.down_proj.weight": (HIDDEN, 48),
    }
    sparse = spec.layer_shapes(HIDDEN, 1)
    assert len(sparse) == 1 + 3 * 8 and sparse["mlp.experts.7.down_proj.weight"] == (HIDDEN, 16)
    # Memory: every expert counts, not top_k of them.
    assert spec.layer_params(HIDDEN, 1) == 8 * HIDDEN + 8 * 3 * 16 * HIDDEN
    with pytest.raises(ModelError, match="layer 6 is not inside"):
        spec.is_moe_layer(6)


# Refusals ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is more than num_experts 8"),
        ({"num_experts_per_tok": 0}, "num_experts_per_tok must be an integer >= 1"),
        ({"num_experts_per_tok": None}, "missing field 'num_experts_per_tok'"),
        ({"num_experts": 0}, "num_experts must be an integer >= 1"),
        ({"num_experts": "8"}, "num_experts must be an integer"),
        ({"num_experts": True}, "num_experts must be an integer"),
        ({"num_experts": None}, "missing field 'num_experts'"),
        ({"moe_intermediate_size": -16}, "moe_intermediate_size must be an integer >= 1"),
        ({"moe_intermediate_size": 16.0}, "moe_intermediate_size must be an integer"),
        ({"intermediate_size": 0}, "intermediate_size must be an integer >= 1"),
        ({"num_hidden_layers": 0}, "num_hidden_layers must be an integer >= 1"),
        ({"decoder_sparse_step": 0}, "decoder_sparse_step must be an integer >= 1"),
        ({"norm_topk_prob": "yes"}, "norm_topk_prob must be a boolean"),
        ({"norm_topk_prob": 1}, "norm_topk_prob must be a boolean"),
        ({"mlp_only_layers": [4]}, "mlp_only_layers has 4, not a layer of"),
        ({"mlp_only_layers": [-1]}, "mlp_only_layers has -1"),
        ({"mlp_only_layers": "1"}, "mlp_only_layers must be a list of integers"),
        ({"mlp_only_layers": [1.0]}, "mlp_only_layers must be a list of integers"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act 'gelu'"),
        (
            {"intermediate_size": None, "mlp_only_layers": [0]},
            "intermediate_size is needed by the dense layers",
        ),
    ],
)
def test_inconsistent_configs_are_refused_naming_the_field(change, field):
    raw = {**QWEN, **change}
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ModelError, match=field):
        MoESpec.from_config(raw, "qwen3_moe")


def test_config_refusals_mixtral_and_types():
    with pytest.raises(ModelError, match="model_type 'qwen2_moe' has no mixture-of-experts"):
        MoESpec.from_config(QWEN, "qwen2_moe")
    with pytest.raises(ModelError, match="expected a JSON object"):
        MoESpec.from_config([1, 2], "qwen3_moe")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="num_experts_per_tok 7 is more than num_experts 6"):
        MoESpec.from_config({**MIXTRAL, "num_experts_per_tok": 7}, "mixtral")
    with pytest.raises(ModelError, match="intermediate_size must be an integer"):
        MoESpec.from_config({**MIXTRAL, "intermediate_size": "16"}, "mixtral")
    # Mixtral ignores Qwen's fields: every layer is sparse, always renormalised.
    spec = MoESpec.from_config({**MIXTRAL, "norm_topk_prob": False}, "mixtral")
    assert spec.renormalize and all(spec.is_moe_layer(i) for i in range(2))


def _weights() -> tuple[MoESpec, dict]:
    spec = MoESpec.from_config(QWEN, "qwen3_moe")
    block = _hf_block(QWEN, "grouped_mm", torch.float32)
    return spec, _block_weights(block)


def test_missing_extra_and_misshapen_expert_weights_are_refused():
    spec, fused = _weights()
    per_expert = _per_expert(spec, fused)
    for name in ("experts.3.up_proj.weight", "gate.weight", "experts.7.down_proj.weight"):
        with pytest.raises(ModelError, match=f"missing tensor '{name}'"):
            SparseMoE(spec, HIDDEN, {k: v for k, v in per_expert.items() if k != name})
    extra = {**per_expert, "experts.8.gate_proj.weight": torch.zeros(16, HIDDEN)}
    with pytest.raises(ModelError, match=r"unexpected tensors .*experts\.8\.gate_proj\.weight"):
        SparseMoE(spec, HIDDEN, extra)
    with pytest.raises(ModelError, match="mixes the fused .* and per-expert"):
        SparseMoE(
            spec, HIDDEN, {**per_expert, "experts.gate_up_proj": fused["experts.gate_up_proj"]}
        )
    with pytest.raises(ModelError, match=r"'experts.2.gate_proj.weight' has shape \[8, 32\]"):
        SparseMoE(
            spec, HIDDEN, {**per_expert, "experts.2.gate_proj.weight": torch.zeros(8, HIDDEN)}
        )
    with pytest.raises(ModelError, match="missing tensor 'experts.down_proj'"):
        SparseMoE(spec, HIDDEN, {k: v for k, v in fused.items() if k != "experts.down_proj"})
    with pytest.raises(ModelError, match=r"'experts.gate_up_proj' has shape \[7, 32, 32\]"):
        SparseMoE(spec, HIDDEN, {**fused, "experts.gate_up_proj": torch.zeros(7, 32, HIDDEN)})


def test_any_leading_shape_and_dtype_conversion():
    """`[tokens, hidden]` and `[batch, seq, hidden]` route the same tokens alike (packed
    steps are `[1, sum, hidden]`); `.to(bfloat16)` converts every expert's weights."""
    spec, fused = _weights()
    moe = SparseMoE(spec, HIDDEN, fused)
    x = torch.randn(2, 5, HIDDEN, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        whole = moe(x)
        flat = moe(x.reshape(10, HIDDEN))
        rows = torch.cat([moe(x[b : b + 1, s : s + 1]) for b in range(2) for s in range(5)])
    assert flat.shape == (10, HIDDEN)
    torch.testing.assert_close(flat, whole.reshape(10, HIDDEN), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rows.reshape(2, 5, HIDDEN), whole, rtol=1e-5, atol=1e-6)
    moe = moe.to(torch.bfloat16)
    assert {p.dtype for p in moe.parameters()} == {torch.bfloat16}
    assert sum(p.numel() for p in moe.parameters()) == spec.layer_params(HIDDEN, 0)
    with torch.no_grad():
        assert moe(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("fused", [False, True], ids=["per_expert", "fused"])
def test_packed_experts_compute_what_plain_ones_do(fused):
    """`Linear.pack` on each expert's three matrices (fused checkpoints' per-expert views too)
    computes the same within float32 rounding; a batching server's `pack_linears` leaves the
    experts plain (a few rows each: the plain layout is faster) and packs the rest."""
    from daemon.shards.model import linear as linear_module

    if not linear_module._ONEDNN:
        pytest.skip("this torch has no oneDNN")
    spec, weights = _weights()
    if not fused:
        weights = _per_expert(spec, weights)
    moe = SparseMoE(spec, HIDDEN, weights)
    x = torch.randn(1, 9, HIDDEN, generator=torch.Generator().manual_seed(5))
    host = torch.nn.ModuleDict({"moe": moe, "proj": linear_module.Linear(torch.randn(4, 4))})
    with torch.no_grad():
        plain = moe(x)
        assert linear_module.pack_linears(host) == 1 and host["proj"].packed
        experts = [m for m in moe.modules() if isinstance(m, linear_module.Linear)]
        assert len(experts) == 3 * spec.num_experts and not any(m.packed for m in experts)
        assert all(m.pack() for m in experts)
        packed = moe(x)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-6)
