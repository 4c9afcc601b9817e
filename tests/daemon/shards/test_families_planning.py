"""Each family's sizes as the shard planner counts them (`model.plan_sizes`): every expert of
a mixture of experts in the weights, a KV-cache reserve per layer bounded by the window on
sliding layers only; `[cluster] placement_kv_reserve_tokens` sets the reserve; `gridmesh
model inspect` prints what the planner counts."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
from typer.testing import CliRunner  # noqa: E402

from daemon import settings  # noqa: E402
from daemon.cli.model import model_app  # noqa: E402
from daemon.shards import model as m  # noqa: E402
from scheduler.model_memory import DEFAULT_KV_RESERVE_TOKENS, LayerCosts  # noqa: E402
from scheduler.placement import PlacementWeights  # noqa: E402
from scheduler.shard_plan import Candidate, plan_shards  # noqa: E402

F, S = m.FULL, m.SLIDING
PER_TOKEN = 2 * 2 * 16 * 4  # keys and values, 2 kv heads of 16, float32


def test_sizes_of_a_model_mixing_full_and_sliding_layers():
    config = m.tiny_config("mistral", sliding_window=8, layer_types=(S, F, S, F))
    sizes = m.plan_sizes(config)
    assert sizes["layer_windows"] == (8, None, 8, None)
    assert sizes["kv_bytes_per_token"] == PER_TOKEN
    assert sizes["layer_bytes"] == config.layer_bytes() and sizes["num_layers"] == 4
    costs = LayerCosts.of(m.model_spec(config, "mixed"), 1000)
    weights = config.layer_bytes()
    assert costs.layers == (
        weights + 8 * PER_TOKEN,
        weights + 1000 * PER_TOKEN,
        weights + 8 * PER_TOKEN,
        weights + 1000 * PER_TOKEN,
    )
    # the planner's whole-model bytes: what the shard holds plus its caches of 1000 tokens
    assert costs.total == config.shard_bytes(0, 4) + config.kv_cache_bytes(1000)
    half = m.plan_sizes(config, "bfloat16")
    assert half["kv_bytes_per_token"] == PER_TOKEN // 2
    assert half["layer_bytes"] == config.layer_bytes("bfloat16")


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_a_mixture_of_experts_counts_every_expert(family):
    config = m.tiny_config(family, experts=6, experts_per_token=2, expert_intermediate=32)
    sizes = m.plan_sizes(config)
    h = config.hidden_size
    attention = 2 * h * h + 2 * h * 32 + (2 * 16 if config.qk_norm else 0)
    per_layer = attention + 2 * h + 6 * h + 6 * 3 * 32 * h  # norms, router, 6 experts
    assert sizes["layer_bytes"] == 4 * per_layer
    assert sizes["layer_windows"] == (None,) * 4


def test_sliding_layers_let_a_node_take_more_layers():
    """The same model with and without a window, planned over a small fast node and a
    large one: the window's smaller reserve leaves room for more layers on the small one."""
    windowed = m.model_spec(m.tiny_config("mistral", sliding_window=16, layers=8), "w")
    full = m.model_spec(m.tiny_config("mistral", layers=8), "f")
    assert windowed.layer_bytes == full.layer_bytes
    weights, reserve = full.layer_bytes, 2048 * PER_TOKEN
    small = 3 * (weights + reserve) + weights // 2  # 3 full layers, or 5 windowed ones
    cands = [Candidate("small", small, 8.0), Candidate("big", 50 * weights, 1.0)]

    def on_small(spec) -> int:
        plan = plan_shards(spec, cands, memory_fraction=1.0, kv_reserve_tokens=2048)
        return next(a.layers for a in plan.assignments if a.peer_id == "small")

    assert on_small(full) == 3
    assert on_small(windowed) > 3
    without = plan_shards(full, cands, memory_fraction=1.0, kv_reserve_tokens=0)
    assert next(a.layers for a in without.assignments if a.peer_id == "small") > 3


def test_the_reserve_is_a_cluster_setting():
    config = settings.parse({"cluster": {"placement_kv_reserve_tokens": 512}})
    weights = PlacementWeights(**config.cluster.values_for(PlacementWeights))
    assert weights.kv_reserve_tokens == 512
    default = settings.parse({})
    assert PlacementWeights(**default.cluster.values_for(PlacementWeights)).kv_reserve_tokens == (
        DEFAULT_KV_RESERVE_TOKENS
    )
    with pytest.raises(settings.ConfigError, match="placement_kv_reserve_tokens"):
        settings.parse({"cluster": {"placement_kv_reserve_tokens": -1}})


def test_inspect_prints_what_the_planner_counts(tmp_path):
    path = m.make_tiny(
        tmp_path / "mixed", family="mistral", sliding_window=6, layer_types=(S, F), layers=2
    )
    config = m.ModelConfig.from_dir(path)
    result = CliRunner().invoke(model_app, ["inspect", str(path), "--json"])
    assert result.exit_code == 0, result.output

    doc = json.loads(result.output)
    tokens = DEFAULT_KV_RESERVE_TOKENS
    assert doc["kv_reserve_tokens"] == tokens
    assert doc["planned_bytes"] == doc["total_bytes"] + PER_TOKEN * (6 + tokens)
    assert doc["planned_bytes"] == config.shard_bytes(0, 2) + config.kv_cache_bytes(tokens)
    text = CliRunner().invoke(model_app, ["inspect", str(path)]).output
    assert f"planned:      {doc['planned_bytes']:,} bytes" in text
    assert "reserve of 4,096 tokens per layer (sliding layers: their window)" in text


def test_inspect_says_when_the_planner_cannot_take_a_model():
    from daemon.shards.model.checkpoint import _planned_bytes

    huge = m.ModelConfig(
        vocab_size=300,
        hidden_size=8,
        intermediate_size=8,
        num_hidden_layers=100_001,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    problems: list[str] = []
    assert _planned_bytes(huge, "float32", problems) is None
    assert problems == [
        "the shard planner cannot place it: num_layers must be an integer in [1, 100000]"
    ]
