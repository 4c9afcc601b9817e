"""Qwen2, Qwen3 and Mistral served exactly as transformers computes them: tiny checkpoints
written by transformers itself (`save_pretrained`, random weights, float32), our greedy
tokens equal to its `generate` for several prompts, in one process, through a chain of
shards and split over 3 daemons on the in-memory network; sliding windows smaller than the
prompts so that the window matters, in every path (eager, packed batches, the fixed-shape
decode step)."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from daemon.shards import model as m  # noqa: E402
from tests.daemon.harness import inline_threads, memory_cluster  # noqa: E402

NEW = 10
TEXT = b"the window slides over the prompt and over the tokens it generates"
PROMPTS = [[1, *TEXT[:3]], [1, *TEXT[:11]], [1, *TEXT[:29]]]
RANGES = [(0, 1), (1, 3), (3, 4)]
TOL = 2e-5
SIZES = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
# family -> (transformers class names, config changes); each window smaller than the
# longest prompt plus its generation
CASES: dict[str, tuple[str, dict]] = {
    # Qwen2.5-style: q/k/v biases, tied, rope theta 1e6, no window
    "qwen2": ("Qwen2", {"tie_word_embeddings": True, "rope_theta": 1e6}),
    # Qwen2 with use_sliding_window: the layers from max_window_layers on slide
    "qwen2_window": (
        "Qwen2",
        {"use_sliding_window": True, "sliding_window": 7, "max_window_layers": 2},
    ),
    # Qwen3: q/k norms per head, an explicit head_dim unlike hidden / heads
    "qwen3": ("Qwen3", {"head_dim": 32, "rope_theta": 1e6}),
    "qwen3_bias": ("Qwen3", {"head_dim": 16, "attention_bias": True}),
    # Mistral: a window on every layer
    "mistral": ("Mistral", {"sliding_window": 6}),
}


def _perturb(model) -> None:
    """transformers' init zeroes biases and sets norms to 1, where a missing bias or norm
    would go unseen: give every vector weight values of its own."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                noise = torch.randn(param.shape, generator=generator)
                param.copy_((1.0 + 0.2 * noise) if "norm" in name else 0.3 * noise)


def write_hf(path: Path, case: str, seed: int = 0) -> Path:
    prefix, changes = CASES[case]
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
    root = tmp_path_factory.mktemp("families")
    return {case: write_hf(root / case, case, seed) for seed, case in enumerate(CASES)}


def reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def hf_greedy(ref, prompt: list[int], new: int = NEW) -> list[int]:
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([prompt]),
            max_new_tokens=new,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
        )
    return out[0, len(prompt) :].tolist()


def ids(tokens: list[int]):
    return torch.tensor([tokens], dtype=torch.int64)


@pytest.mark.parametrize("case", list(CASES))
def test_config_reads_the_family(hf, case):
    config = m.ModelConfig.from_dir(hf[case])
    prefix, changes = CASES[case]
    assert config.family == prefix.lower()
    assert config.qkv_bias == (prefix == "Qwen2" or bool(changes.get("attention_bias")))
    assert config.o_bias == bool(changes.get("attention_bias"))
    assert config.qk_norm == (prefix == "Qwen3")
    assert config.head_dim == changes.get("head_dim", 16)
    window = changes.get("sliding_window")
    assert config.sliding_window == window
    if case == "qwen2_window":
        assert config.layer_types == (m.FULL, m.FULL, m.SLIDING, m.SLIDING)
    else:
        assert set(config.layer_types) == {m.SLIDING if window else m.FULL}
    # every tensor transformers wrote is one the config describes, with its shape
    from safetensors import safe_open

    with safe_open(str(hf[case] / "model.safetensors"), "pt") as f:
        written = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
    assert written == config.tensor_shapes()
    # (parameters() gives a tied head once, as num_parameters counts it)
    assert config.num_parameters() == sum(p.numel() for p in reference(hf[case]).parameters())


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(hf, case):
    """Prefill, then decode one token at a time past the window, with caches on both sides."""
    ref, ours = reference(hf[case]), m.load_model(hf[case])
    tokens = PROMPTS[2]
    diffs = []
    with torch.no_grad():
        diffs.append((ref(ids(tokens)).logits - ours(ids(tokens))).abs().max().item())
        out = ref(ids(tokens[:5]), use_cache=True)
        cache = ours.new_cache(max_len=64)
        diffs.append((out.logits - ours(ids(tokens[:5]), cache)).abs().max().item())
        past = out.past_key_values
        for token in tokens[5:]:
            out = ref(ids([token]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            diffs.append((out.logits - ours(ids([token]), cache)).abs().max().item())
    assert max(diffs) <= TOL, diffs


@pytest.mark.parametrize("case", ["mistral", "qwen2_window"])
def test_chunked_prefill_over_the_ring_matches_transformers(hf, case):
    """A prompt fed in chunks longer than the window (a replay's chunks, a long prefill in
    steps): each chunk reads the window before it out of the ring; the logits of all the
    chunks are those of transformers' whole prompt."""
    ref, ours = reference(hf[case]), m.load_model(hf[case])
    tokens = PROMPTS[2]
    cache = ours.new_cache(max_len=64)
    with torch.no_grad():
        want = ref(ids(tokens)).logits
        got = torch.cat([ours(ids(tokens[i : i + 7]), cache) for i in range(0, len(tokens), 7)], 1)
    assert cache.keys[-1].shape[2] == ours.config.sliding_window  # a ring, wrapped 4 times
    assert (got - want).abs().max() <= TOL


@pytest.mark.parametrize("case", list(CASES))
def test_greedy_equals_transformers_generate(hf, case):
    """Whole model and a chain of 3 shards, several prompts (some longer than the window)."""
    ref = reference(hf[case])
    whole = m.load_model(hf[case])
    chain = [m.load_shard(hf[case], a, b) for a, b in RANGES]
    for prompt in PROMPTS:
        want = hf_greedy(ref, prompt)
        assert m.greedy_generate([whole], prompt, NEW) == want, prompt
        assert m.greedy_generate(chain, prompt, NEW) == want, prompt


@pytest.mark.parametrize("case", ["mistral", "qwen2_window"])
def test_sliding_cache_is_a_ring_of_the_window(hf, case):
    shard = m.load_model(hf[case])
    config = shard.config
    window = config.sliding_window
    cache = shard.new_cache(max_len=200)
    for layer in range(config.num_hidden_layers):
        want = window if config.layer_window(layer) else 200
        assert cache.keys[layer].shape[2] == cache.values[layer].shape[2] == want
    assert (
        cache.nbytes
        == config.kv_cache_bytes(200)
        == sum(2 * 2 * 16 * 4 * (window if config.layer_window(i) else 200) for i in range(4))
    )
    per_token = config.kv_bytes_per_token()
    assert per_token == 4 * 2 * 2 * 16 * 4
    assert config.kv_cache_bytes(window) == window * per_token  # below the window: all of it
    # a cache shorter than the window is no ring: truncation anywhere works
    short = shard.new_cache(max_len=window)
    assert not any(short.is_ring(i) for i in range(4))


def test_packed_steps_equal_lone_steps_past_the_window(hf):
    """Continuous batching (`forward_packed`): sessions at different lengths, around and
    past the window, decode together and each gets the logits it gets alone."""
    shard = m.load_model(hf["mistral"])
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[2][:7]]
    alone, together = [], []
    for prompt in prompts:
        cache = shard.new_cache(max_len=64)
        shard(ids(prompt), cache)
        alone.append((cache, [shard(ids([t]), cache) for t in TEXT[:9]]))
    caches = [shard.new_cache(max_len=64) for _ in prompts]
    # the prompts themselves packed into one pass, then 9 decode steps of all at once
    shard.forward_packed([ids(p) for p in prompts], caches)
    for t in TEXT[:9]:
        together.append(shard.decode_rows(torch.tensor([[t]] * len(prompts)), caches))
    for i in range(len(prompts)):
        for step, out in enumerate(together):
            assert (out[i : i + 1] - alone[i][1][step]).abs().max() <= 1e-5, (i, step)


def test_static_decoder_equals_eager_past_the_window(hf):
    """The fixed-shape one-token step (CUDA graphs on a GPU, eager here) writes the ring at
    `position % window` and masks by slot: the same logits as the eager path, for more
    steps than the window holds."""
    for case in ("mistral", "qwen2_window"):
        shard = m.load_model(hf[case])
        eager, static = shard.new_cache(max_len=40), shard.new_cache(max_len=40)
        shard(ids(PROMPTS[1]), eager)
        shard(ids(PROMPTS[1]), static)
        decoder = m.StaticDecoder(shard, static, graph=False)
        for t in TEXT[:20]:
            want = shard(ids([t]), eager)
            got = decoder.step(ids([t]))
            assert (want - got).abs().max() <= 1e-5, (case, t)
        assert static.length == eager.length == len(PROMPTS[1]) + 20


def test_failed_step_leaves_the_ring_as_it_was(hf, monkeypatch):
    """A multi-token step that fails in its last layer wrote nothing into any ring (its keys
    were staged), so the same step runs again to the same logits; so does a one-token step."""
    shard = m.load_model(hf["mistral"])
    cache = shard.new_cache(max_len=64)
    shard(ids(PROMPTS[2][:12]), cache)
    ref_cache = shard.new_cache(max_len=64)
    shard(ids(PROMPTS[2][:12]), ref_cache)
    want = shard(ids(PROMPTS[2][12:17]), ref_cache)
    last = list(shard.layers.values())[-1]

    def boom(*_a, **_k):
        raise RuntimeError("boom")

    monkeypatch.setattr(last.mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        shard(ids(PROMPTS[2][12:17]), cache)
    monkeypatch.undo()
    assert cache.length == 12
    got = shard(ids(PROMPTS[2][12:17]), cache)
    assert (got - want).abs().max() == 0
    # a one-position step writes its key into the ring at once, over the position its
    # window has just left: failed, it runs again to the same logits too
    want = shard(ids(PROMPTS[2][17:18]), ref_cache)
    monkeypatch.setattr(last.mlp, "forward", boom)
    with pytest.raises(RuntimeError, match="boom"):
        shard(ids(PROMPTS[2][17:18]), cache)
    monkeypatch.undo()
    assert cache.length == 17
    assert (shard(ids(PROMPTS[2][17:18]), cache) - want).abs().max() == 0


@pytest.mark.parametrize("case", ["qwen2", "qwen3_bias", "mistral"])
def test_bfloat16_close_to_transformers_bfloat16(hf, case):
    """Served in bfloat16 (biases, q/k norms and the ring too), the logits of a prompt and of
    decode steps past the window stay as close to transformers' bfloat16 model as to our
    float32 one: rounding, not a different computation."""
    ref = transformers.AutoModelForCausalLM.from_pretrained(hf[case], dtype=torch.bfloat16).eval()
    ours, whole = m.load_model(hf[case], dtype="bfloat16"), m.load_model(hf[case])
    tokens = PROMPTS[2]
    cache = ours.new_cache(max_len=64)
    with torch.no_grad():
        got = torch.cat(
            [ours(ids(tokens[:8]), cache)] + [ours(ids([t]), cache) for t in tokens[8:]], 1
        )
        want = ref(ids(tokens)).logits.float()
    exact = whole(ids(tokens))
    assert (got - want).abs().max() <= 2e-2  # seen: 2e-3..5e-3, logits up to 0.8
    assert (got - exact).abs().max() <= 2e-2


def test_a_cache_without_the_windows_is_refused(hf):
    shard = m.load_model(hf["qwen2_window"])
    plain = m.KVCache(4, 1, 2, 32, 16)  # no windows: not this shard's cache
    with pytest.raises(m.ModelError, match="sliding windows"):
        shard(ids(PROMPTS[0]), plain)
    with pytest.raises(m.ModelError, match="sliding windows"):
        shard.forward_packed([ids(PROMPTS[0])], [plain])
    with pytest.raises(m.ModelError, match="sliding windows"):
        m.StaticDecoder(shard, plain)
    assert plain.length == 0


def test_truncating_a_ring(hf):
    shard = m.load_model(hf["mistral"])  # window 6
    cache = shard.new_cache(max_len=64)
    shard(ids(PROMPTS[2][:20]), cache)
    with pytest.raises(m.ModelError, match="sliding window before it is overwritten"):
        cache.truncate(15)
    cache.truncate(19)  # one back: the ring still holds the 5 positions before 19
    want_cache = shard.new_cache(max_len=64)
    want = shard(ids(PROMPTS[2][:21]), want_cache)[:, -2:]
    got = shard(ids(PROMPTS[2][19:21]), cache)
    assert (got - want).abs().max() <= 1e-5


# --- over daemons -----------------------------------------------------------------------


@pytest.fixture
def one_thread(monkeypatch):
    inline_threads(monkeypatch)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


async def test_every_family_over_three_daemons(autojump_clock, tmp_path, hf, one_thread):
    """Each family deployed over 3 daemons (layers 0-1, 1-3, 3-4): every prompt's greedy
    tokens equal transformers' `generate`."""
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


async def test_sliding_window_batches_are_exact_over_daemons(
    autojump_clock, tmp_path, hf, monkeypatch
):
    """Several sessions of a sliding-window model at once through 3 daemons, batched on
    every server: each gets the tokens it gets alone (and transformers gives)."""
    import trio

    async def run_sync(fn, *args, **_):
        await trio.sleep(0.002)  # compute takes virtual time, so sessions overlap
        return fn(*args)

    monkeypatch.setattr(trio.to_thread, "run_sync", run_sync)
    ref = reference(hf["mistral"])
    prompts = [[1, *TEXT[: 3 + 4 * i]] for i in range(6)]
    want = [hf_greedy(ref, p, 12) for p in prompts]
    async with memory_cluster(tmp_path / "net", 3) as net:
        await net.deploy(hf["mistral"], net.daemons, RANGES, model="mistral")
        got: dict[int, list[int]] = {}

        async def one(i: int) -> None:
            result = await net.daemons[i % 3].call(
                "generate",
                {"model": "mistral", "token_ids": prompts[i], "max_tokens": 12, "client": f"u{i}"},
            )
            assert result["error"] is None, result
            got[i] = result["tokens"]

        async with trio.open_nursery() as nursery:
            for i in range(len(prompts)):
                nursery.start_soon(one, i)
        servers = [d.daemon.shards.server for d in net.daemons]
        assert all(max(s.batching.batch_sizes) > 1 for s in servers)
    assert [got[i] for i in range(len(prompts))] == want


# --- refusals ---------------------------------------------------------------------------


BASE = {
    "vocab_size": 100,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"model_type": "gpt_neox"}, "unsupported model_type 'gpt_neox'"),
        (
            {"model_type": "qwen2", "num_key_value_heads": 3},
            "not a multiple of num_key_value_heads",
        ),
        ({"model_type": "mistral", "hidden_size": 30}, "not a multiple of num_attention_heads"),
        ({"model_type": "mistral", "sliding_window": 0}, "sliding_window must be an integer >= 1"),
        ({"model_type": "mistral", "sliding_window": -4}, "sliding_window must be an integer >= 1"),
        (
            {"model_type": "qwen2", "use_sliding_window": True, "sliding_window": "big"},
            "sliding_window must be an integer",
        ),
        (
            {"model_type": "qwen2", "use_sliding_window": "yes"},
            "use_sliding_window must be a boolean",
        ),
        (
            {"model_type": "qwen3", "layer_types": ["full_attention"]},
            "layer_types has 1 entries for 2 layers",
        ),
        (
            {"model_type": "qwen3", "layer_types": ["full_attention", "sliding_attention"]},
            "sliding layers but no sliding_window",
        ),
        (
            {"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]},
            "unsupported 'chunked_attention'",
        ),
        ({"model_type": "qwen2", "max_window_layers": -1}, "max_window_layers must be an integer"),
        ({"model_type": "qwen3", "attention_bias": 1}, "attention_bias must be a boolean"),
        ({"model_type": "qwen2", "use_mrope": True}, "use_mrope=true"),
        (
            {"model_type": "mistral", "quantization_config": {}},
            "unknown field 'quantization_config'",
        ),
        (
            {"model_type": "llama", "sliding_window": 8},
            "unknown field 'sliding_window' for model_type 'llama'",
        ),
        ({"model_type": "qwen3", "head_dim": 7}, "head_dim must be even"),
    ],
)
def test_config_refusals_name_the_field(raw, message):
    with pytest.raises(m.ModelError, match=message):
        m.ModelConfig.from_dict({**BASE, **raw})


def test_family_defaults_as_transformers():
    """What each family reads when a field is absent, as transformers' configs default it."""
    mistral = m.ModelConfig.from_dict({**BASE, "model_type": "mistral"})
    assert mistral.sliding_window == 4096 and mistral.layer_types == (m.SLIDING,) * 2
    assert (
        m.ModelConfig.from_dict(
            {**BASE, "model_type": "mistral", "sliding_window": None}
        ).sliding_window
        is None
    )
    qwen3 = m.ModelConfig.from_dict({**BASE, "model_type": "qwen3"})
    assert qwen3.head_dim == 128 and qwen3.qk_norm and not qwen3.qkv_bias
    # use_sliding_window off: the window is ignored, whatever sliding_window says
    qwen2 = m.ModelConfig.from_dict({**BASE, "model_type": "qwen2", "sliding_window": 4096})
    assert qwen2.sliding_window is None and qwen2.qkv_bias and not qwen2.o_bias
    on = m.ModelConfig.from_dict(
        {**BASE, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 1}
    )
    assert on.sliding_window == 4096 and on.layer_types == (m.FULL, m.SLIDING)
    # without model_type, the architecture names the family
    arch = m.ModelConfig.from_dict({**BASE, "architectures": ["Qwen2ForCausalLM"]})
    assert arch.family == "qwen2"


def _rewrite(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint `src` with its tensors changed by `change(dict)`."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(dst / "model.safetensors")
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_extra_weights_are_refused(hf, tmp_path):
    missing = _rewrite(
        hf["qwen2"], tmp_path / "missing", lambda t: t.pop("model.layers.2.self_attn.k_proj.bias")
    )
    with pytest.raises(m.ModelError, match="missing tensor 'model.layers.2.self_attn.k_proj.bias'"):
        m.load_model(missing)
    m.load_shard(missing, 0, 2)  # a shard without layer 2 does not need it

    def add_bias(t):
        t["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(64)

    extra = _rewrite(hf["mistral"], tmp_path / "extra", add_bias)
    with pytest.raises(
        m.ModelError, match="unexpected tensor 'model.layers.1.self_attn.o_proj.bias'"
    ):
        m.load_shard(extra, 1, 3)
    m.load_shard(extra, 2, 4)  # not in the layers this shard loads

    def add_norm(t):
        t["model.layers.0.self_attn.q_norm.weight"] = torch.ones(16)

    qwen2_with_norm = _rewrite(hf["qwen2"], tmp_path / "norm", add_norm)
    with pytest.raises(m.ModelError, match="unexpected tensor 'model.layers.0.self_attn.q_norm"):
        m.load_model(qwen2_with_norm)

    def add_head_bias(t):
        t["lm_head.bias"] = torch.zeros(300)

    head = _rewrite(hf["qwen3"], tmp_path / "head", add_head_bias)
    with pytest.raises(m.ModelError, match="unexpected tensor 'lm_head.bias'"):
        m.load_shard(head, 3, 4)


async def failover_generation(net, model_dir: Path, model: str, prompt: list[int], new: int):
    """Deploy `model` over 4 of `net`'s daemons (layers 2-4 twice), generate `new` tokens
    from daemon 0 and SIGKILL (in memory) the server of layers 2-4 on the route as the 5th
    token arrives: the generation's tokens, after failing over by replay to the replica."""
    servers = net.daemons[1:5]
    await net.deploy(model_dir, servers, [(0, 2), (2, 4), (2, 4), (0, 2)], model=model)
    client = net.daemons[0]
    job = (
        await client.call(
            "generate",
            {"model": model, "token_ids": prompt, "max_tokens": new, "stream": True},
        )
    )["job"]
    killed: list[str] = []

    def kill() -> None:
        middle = client.daemon.shards.jobs[job].route[1]["peer_id"]
        killed.append(middle)
        net.kill(next(d for d in net.daemons if d.peer_id == middle))

    client.at_token(job, 5, kill)

    async def finished() -> dict | None:
        state = await client.call("generate_poll", {"job": job})
        return state if state["done"] else None

    state = await net.wait_for(finished, 60, "the generation to end")
    assert state["error"] is None, state
    assert len(killed) == 1 and [r["peer_id"] for r in state["recoveries"]] == killed, state
    return state["tokens"]


async def test_sliding_window_fails_over_by_replay(autojump_clock, tmp_path, hf, one_thread):
    """A server of a sliding-window model killed mid-generation (past the window): the
    replica replays the recorded inputs into a fresh ring and the tokens are transformers'."""
    prompt = PROMPTS[2]
    want = hf_greedy(reference(hf["mistral"]), prompt, 16)
    async with memory_cluster(tmp_path / "net", 5) as net:
        assert await failover_generation(net, hf["mistral"], "mistral", prompt, 16) == want
