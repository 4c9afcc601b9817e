"""Mixture-of-experts families (Qwen3-MoE, Mixtral) served as transformers computes them:
tiny checkpoints written by transformers (`save_pretrained`, per-expert and fused layouts),
our greedy tokens equal to its `generate` in one process, through shards and over 3
daemons; the experts one layer routes each token to equal transformers'; every expert
counts in the planner's bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daemon.shards import model as m  # noqa: E402
from tests.daemon.harness import inline_threads, memory_cluster  # noqa: E402
from tests.daemon.shards.test_families import failover_generation  # noqa: E402

NEW = 10
TEXT = b"experts take the tokens their router sends them, two of four each"
PROMPTS = [[1, *TEXT[:4]], [1, *TEXT[:13]], [1, *TEXT[:31]]]
RANGES = [(0, 1), (1, 3), (3, 4)]
SIZES = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "num_experts_per_tok": 2,
}
CASES: dict[str, tuple[str, dict, bool]] = {
    # renormalised top-2 of 4, the last layer dense (mlp_only_layers)
    "qwen3_moe": (
        "Qwen3Moe",
        {
            "num_experts": 4,
            "moe_intermediate_size": 32,
            "norm_topk_prob": True,
            "mlp_only_layers": [3],
        },
        False,
    ),
    # transformers' in-memory fused expert layout (save_original_format=False), every other
    # layer sparse, top-k weights not renormalised
    "qwen3_moe_fused": (
        "Qwen3Moe",
        {"num_experts": 4, "moe_intermediate_size": 32, "decoder_sparse_step": 2},
        True,
    ),
    # Mixtral: a window of 6 on every layer, experts of intermediate_size
    "mixtral": ("Mixtral", {"num_local_experts": 4, "sliding_window": 6}, False),
}


def _perturb(model) -> None:
    """Norms off 1 and a router at a trained model's contrast (at transformers' init scale
    every expert scores ~1/E and float rounding would pick the top-k)."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1.0 + 0.2 * torch.randn(param.shape, generator=generator))
            elif name.endswith("mlp.gate.weight"):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    return write_all(tmp_path_factory.mktemp("moe"))


def write_all(root: Path) -> dict[str, Path]:
    """Every case's checkpoint, written by transformers under `root`."""
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    out = {}
    for seed, (case, (prefix, changes, fused)) in enumerate(CASES.items()):
        config = getattr(transformers, f"{prefix}Config")(**SIZES, **changes)
        torch.manual_seed(seed)
        model = getattr(transformers, f"{prefix}ForCausalLM")(config).to(torch.float32).eval()
        _perturb(model)
        model.save_pretrained(root / case, **({"save_original_format": False} if fused else {}))
        out[case] = root / case
    return out


def reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(ref, prompt: list[int], new: int = NEW) -> list[int]:
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]), max_new_tokens=new, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


def ids(tokens: list[int]):
    return torch.tensor([tokens], dtype=torch.int64)


@pytest.mark.parametrize("case", list(CASES))
def test_config_and_sizes(hf, case):
    config = m.ModelConfig.from_dir(hf[case])
    prefix, changes, fused = CASES[case]
    moe = config.moe
    assert config.family == ("mixtral" if prefix == "Mixtral" else "qwen3_moe")
    assert moe.num_experts == 4 and moe.top_k == 2
    sparse = [moe.is_moe_layer(i) for i in range(4)]
    assert (
        sparse
        == {
            "qwen3_moe": [True, True, True, False],
            "qwen3_moe_fused": [False, True, False, True],
            "mixtral": [True] * 4,
        }[case]
    )
    assert config.qk_norm == (prefix == "Qwen3Moe")
    assert config.head_dim == 16  # hidden / heads: no Qwen3-style default of 128 here
    assert config.sliding_window == changes.get("sliding_window")
    # all experts count: the parameters of transformers' model, the bytes of the file
    ref = reference(hf[case])
    assert config.num_parameters() == sum(p.numel() for p in ref.parameters())
    layer_params = [sum(p.numel() for p in ref.model.layers[i].parameters()) for i in range(4)]
    assert [config.layer_params(i) for i in range(4)] == layer_params
    assert config.layer_bytes("float32") == 4 * max(layer_params)  # the planner's per layer
    assert config.shard_bytes(1, 3) == 4 * sum(layer_params[1:3])
    whole = m.load_model(hf[case])
    assert whole.nbytes() == config.shard_bytes(0, 4)
    size = sum(f.stat().st_size for f in hf[case].glob("*.safetensors"))
    assert 0 < size - whole.nbytes() < 20_000  # the file: the weights plus its headers


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_generate(hf, case):
    ref = reference(hf[case])
    whole = m.load_model(hf[case])
    chain = [m.load_shard(hf[case], a, b) for a, b in RANGES]
    with torch.no_grad():
        x = ids(PROMPTS[2])
        assert (ref(x).logits - whole(x)).abs().max() <= 2e-5
    for prompt in PROMPTS:
        want = hf_greedy(ref, prompt)
        assert m.greedy_generate([whole], prompt, NEW) == want, prompt
        assert m.greedy_generate(chain, prompt, NEW) == want, prompt


@pytest.mark.parametrize("case", ["qwen3_moe", "mixtral"])
def test_routed_experts_equal_transformers(hf, case):
    """Layer 1's router sends every token of a prompt (and of each decode step) to the
    experts transformers' router sends it to, best first."""
    ref = reference(hf[case])
    ours = m.load_model(hf[case])
    theirs, mine = [], []
    ref.model.layers[1].mlp.gate.register_forward_hook(lambda _m, _a, out: theirs.append(out[2]))
    block = ours.layers["1"].mlp
    assert isinstance(block, m.SparseMoE)
    block.register_forward_hook(lambda mod, args, _out: mine.append(mod.route(args[0])[0]))
    hf_greedy(ref, PROMPTS[2], 6)
    m.greedy_generate([ours], PROMPTS[2], 6)
    assert len(theirs) == len(mine) == 6  # the prompt, then 5 decode steps
    assert theirs[0].shape == (len(PROMPTS[2]), 2)
    for want, got in zip(theirs, mine, strict=True):
        assert torch.equal(want, got)
    assert len(torch.unique(torch.cat(mine))) == 4  # the prompt uses every expert


def test_decode_step_of_a_sparse_shard(hf):
    """The fixed-shape decode step runs a sparse block as the eager path does; it never
    captures a CUDA graph (the experts it runs depend on the tokens)."""
    shard = m.load_model(hf["mixtral"])
    eager, static = shard.new_cache(max_len=40), shard.new_cache(max_len=40)
    shard(ids(PROMPTS[1]), eager)
    shard(ids(PROMPTS[1]), static)
    decoder = m.StaticDecoder(shard, static, graph=True)
    assert not decoder.use_graph
    for t in TEXT[:12]:
        assert (shard(ids([t]), eager) - decoder.step(ids([t]))).abs().max() <= 1e-5


def test_packed_steps_of_a_sparse_shard(hf):
    shard = m.load_model(hf["qwen3_moe"])
    alone = []
    for prompt in PROMPTS:
        cache = shard.new_cache(max_len=64)
        shard(ids(prompt), cache)
        alone.append([shard(ids([t]), cache) for t in TEXT[:5]])
    caches = [shard.new_cache(max_len=64) for _ in PROMPTS]
    shard.forward_packed([ids(p) for p in PROMPTS], caches)
    for step, t in enumerate(TEXT[:5]):
        out = shard.decode_rows(torch.tensor([[t]] * len(PROMPTS)), caches)
        for i in range(len(PROMPTS)):
            assert (out[i : i + 1] - alone[i][step]).abs().max() <= 1e-5, (i, step)


def test_missing_and_extra_experts_are_refused(hf, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    def rewrite(name: str, change) -> Path:
        dst = tmp_path / name
        shutil.copytree(hf["qwen3_moe"], dst)
        tensors = load_file(dst / "model.safetensors")
        change(tensors)
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        return dst

    missing = rewrite("missing", lambda t: t.pop("model.layers.2.mlp.experts.3.up_proj.weight"))
    with pytest.raises(m.ModelError, match="missing tensor 'model.layers.2.mlp.experts.3.up_proj"):
        m.load_shard(missing, 2, 4)

    def add_expert(t):
        t["model.layers.0.mlp.experts.4.up_proj.weight"] = torch.zeros(32, 64)

    extra = rewrite("extra", add_expert)
    with pytest.raises(m.ModelError, match="unexpected tensor 'model.layers.0.mlp.experts.4"):
        m.load_shard(extra, 0, 2)

    def dense_in_sparse(t):  # layer 3 is dense: experts there are not described
        t["model.layers.3.mlp.gate.weight"] = torch.zeros(4, 64)

    odd = rewrite("odd", dense_in_sparse)
    with pytest.raises(m.ModelError, match="unexpected tensor 'model.layers.3.mlp.gate.weight'"):
        m.load_shard(odd, 3, 4)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_experts": 0}, "num_experts must be an integer >= 1"),
        ({"num_experts_per_tok": 9}, "num_experts_per_tok 9 is more than num_experts"),
        ({"mlp_only_layers": [7]}, "mlp_only_layers has 7"),
        ({"router_bias": True}, "unknown field 'router_bias'"),
    ],
)
def test_moe_config_refusals(change, message):
    raw = {
        **SIZES,
        "model_type": "qwen3_moe",
        "num_experts": 4,
        "moe_intermediate_size": 32,
        **change,
    }
    with pytest.raises(m.ModelError, match=message):
        m.ModelConfig.from_dict(raw)


def test_make_tiny_moe_is_what_transformers_reads(tmp_path):
    """Our own writer: the Hub's per-expert layout, read by transformers to our logits."""
    path = m.make_tiny(
        tmp_path / "q", family="qwen3_moe", experts=6, experts_per_token=3, mlp_only_layers=(0,)
    )
    config = m.ModelConfig.from_dir(path)
    assert (config.moe.num_experts, config.moe.top_k) == (6, 3)
    assert not config.moe.is_moe_layer(0) and config.moe.is_moe_layer(1)
    ref = reference(path)
    ours = m.load_model(path)
    with torch.no_grad():
        assert (ref(ids(PROMPTS[2])).logits - ours(ids(PROMPTS[2]))).abs().max() <= 2e-5
    with pytest.raises(m.ModelError, match="family 'mistral' has no experts"):
        m.make_tiny(tmp_path / "x", family="mistral", experts=4)


@pytest.fixture
def one_thread(monkeypatch):
    inline_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


async def test_moe_families_over_three_daemons(autojump_clock, tmp_path, hf, one_thread):
    async with memory_cluster(tmp_path / "net", 3) as net:
        for case in CASES:
            ref = reference(hf[case])
            await net.deploy(hf[case], net.daemons, RANGES, model=case)
            for i, prompt in enumerate(PROMPTS):
                result = await net.daemons[i % 3].call(
                    "generate",
                    {"model": case, "token_ids": prompt, "max_tokens": NEW, "client": "u"},
                )
                assert result["error"] is None, result
                assert result["tokens"] == hf_greedy(ref, prompt), (case, prompt)


async def test_moe_fails_over_by_replay(autojump_clock, tmp_path, hf, one_thread):
    """Mixtral (experts and a window of 6): a server killed mid-generation, the replica
    replays, the tokens are transformers'."""
    prompt = PROMPTS[2]
    want = hf_greedy(reference(hf["mixtral"]), prompt, 16)
    async with memory_cluster(tmp_path / "net", 5) as net:
        assert await failover_generation(net, hf["mixtral"], "mixtral", prompt, 16) == want
