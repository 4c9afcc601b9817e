"""`gridmesh model make-tiny --family NAME` writes a checkpoint transformers reads as that
family (the same logits), and `gridmesh model inspect DIR` reports a checkpoint and whether
it can be served, and why not."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")
from typer.testing import CliRunner  # noqa: E402

from daemon.cli.model import model_app  # noqa: E402
from daemon.shards import model as m  # noqa: E402

PROMPT = [m.BYTE_BOS_ID, *b"a window of six over thirty tokens, as transformers"]
FAMILY_ARGS = {
    "llama": ["--attention-bias"],
    "qwen2": ["--sliding-window", "6", "--max-window-layers", "1", "--tie"],
    "qwen3": ["--head-dim", "32"],
    "mistral": ["--sliding-window", "6"],
    "qwen3_moe": ["--experts", "5", "--experts-per-token", "2", "--expert-intermediate", "24"],
    "mixtral": ["--experts", "3", "--sliding-window", "6"],
}


def make(tmp_path: Path, family: str, *extra: str) -> Path:
    out = tmp_path / family
    result = CliRunner().invoke(
        model_app,
        ["make-tiny", str(out), "--family", family, "--layers", "3", *FAMILY_ARGS[family], *extra],
    )
    assert result.exit_code == 0, result.output
    assert f"family:     {family}" in result.output
    return out


@pytest.mark.parametrize("family", list(FAMILY_ARGS))
def test_make_tiny_family_is_what_transformers_reads(tmp_path, family):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    path = make(tmp_path, family)
    config = m.ModelConfig.from_dir(path)
    assert config.family == family
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(ref).__name__ == config.spec.architecture
    ours = m.load_model(path)
    # every weight we wrote is one transformers loaded (none left at its init); sparse
    # blocks aside, which transformers fuses in memory (the logits below check them)
    state = ref.state_dict()
    for name in config.tensor_shapes():
        if config.moe is None or not any(b in name for b in (".mlp.", ".block_sparse_moe.")):
            assert torch.equal(state[name], ours.state_dict()[name.removeprefix("model.")]), name
    with torch.no_grad():
        x = torch.tensor([PROMPT])
        assert (ref(x).logits - ours(x)).abs().max() <= 2e-5
        want = ref.generate(x, max_new_tokens=8, do_sample=False, eos_token_id=None)
    assert m.greedy_generate([ours], PROMPT, 8) == want[0, len(PROMPT) :].tolist()


def test_make_tiny_refuses_what_a_family_lacks(tmp_path):
    runner = CliRunner()
    bad = runner.invoke(model_app, ["make-tiny", str(tmp_path / "x"), "--family", "gpt2"])
    assert bad.exit_code == 1 and "unknown family 'gpt2'" in bad.output
    bad = runner.invoke(model_app, ["make-tiny", str(tmp_path / "y"), "--sliding-window", "4"])
    assert bad.exit_code == 1 and "family 'llama' has no sliding window" in bad.output
    bad = runner.invoke(
        model_app, ["make-tiny", str(tmp_path / "z"), "--family", "qwen2", "--attention-bias"]
    )
    assert bad.exit_code == 1 and "does not read attention_bias" in bad.output


def test_inspect_reports_a_servable_checkpoint(tmp_path):
    path = make(tmp_path, "qwen2")
    config = m.ModelConfig.from_dir(path)
    result = CliRunner().invoke(model_app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    assert "family:       qwen2" in out and "dtype:        float32" in out
    assert "layers:       3 (hidden 64, 4 heads, 2 kv heads of 16)" in out
    assert "q/k/v biases" in out and "tied embeddings" in out
    assert "sliding window 6 on 2 layers" in out
    assert f"parameters:   {config.num_parameters():,}" in out
    assert f"per layer:    {config.layer_bytes('float32'):,}" in out
    assert "KV cache:     768 bytes per token (256 per layer)" in out  # 3 layers x 2 x 2 x 16 x 4
    assert "servable:     yes" in out
    doc = json.loads(CliRunner().invoke(model_app, ["inspect", str(path), "--json"]).output)
    assert doc["servable"] and doc["problems"] == []
    assert doc["parameters"] == config.num_parameters()
    assert doc["total_bytes"] == config.shard_bytes(0, 3) == 4 * config.num_parameters()
    assert doc["sliding_layers"] == [1, 2] and doc["sliding_window"] == 6
    # 512 positions: the full layer holds them all, the two sliding layers 6 each
    assert doc["kv_cache_bytes_at_max_positions"] == 256 * (512 + 6 + 6)
    assert doc["experts"] is None


def test_inspect_reports_experts(tmp_path):
    path = make(tmp_path, "qwen3_moe")
    config = m.ModelConfig.from_dir(path)
    result = CliRunner().invoke(model_app, ["inspect", str(path)])
    assert result.exit_code == 0, result.output
    assert "family:       qwen3_moe" in result.output
    assert "experts:      5 per sparse layer, 2 per token, 3 sparse layers" in result.output
    # every expert counts: router 5 x 64, experts 5 x 3 x 24 x 64, attention, q/k norms, norms
    per_layer = 5 * 64 + 5 * 3 * 24 * 64 + (64 * 64 * 2 + 2 * 32 * 64) + 2 * 16 + 2 * 64
    assert config.layer_params(0) == per_layer
    assert f"per layer:    {4 * per_layer:,}" in result.output


def test_inspect_says_why_not(tmp_path):
    runner = CliRunner()
    path = make(tmp_path, "mistral")
    # a model_type gridmesh does not serve
    other = tmp_path / "other"
    shutil.copytree(path, other)
    raw = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**raw, "model_type": "falcon"}))
    result = runner.invoke(model_app, ["inspect", str(other)])
    assert result.exit_code == 1
    assert "model_type:   falcon" in result.output and "servable:     no" in result.output
    assert "unsupported model_type 'falcon'" in result.output
    # weights missing and one extra, in a config it reads
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken"
    shutil.copytree(path, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.2.self_attn.q_proj.bias"] = torch.zeros(64)
    tensors["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(broken / "model.safetensors"))
    result = runner.invoke(model_app, ["inspect", str(broken), "--json"])
    assert result.exit_code == 1
    doc = json.loads(result.output)
    assert not doc["servable"] and doc["family"] == "mistral"
    problems = "\n".join(doc["problems"])
    assert "missing tensor 'model.layers.1.mlp.up_proj.weight'" in problems
    assert "unexpected tensor 'model.layers.2.self_attn.q_proj.bias'" in problems
    assert "'model.layers.0.mlp.gate_proj.weight' has shape [3, 3]" in problems
    # no weights at all
    (broken / "model.safetensors").unlink()
    result = runner.invoke(model_app, ["inspect", str(broken)])
    assert result.exit_code == 1 and "no model.safetensors" in result.output
