"""Fixed-shape decode steps (CUDA graphs on a GPU) against the eager path."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.shards.model import (  # noqa: E402
    KVCacheFull,
    ModelError,
    StaticDecoder,
    greedy_generate,
    load_model,
    load_shard,
    make_tiny,
)

LAYERS = 4
PROMPT = list(b"static shapes")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # 4 query heads over 2 kv heads: grouped-query attention
    return make_tiny(tmp_path_factory.mktemp("tiny") / "m", layers=LAYERS, seed=11)


@pytest.mark.parametrize("span", [(0, 2), (1, 3), (2, 4), (0, 4)])
def test_static_steps_match_the_eager_path(model_dir, span):
    start, end = span
    shard = load_shard(model_dir, start, end)
    eager_cache, static_cache = shard.new_cache(max_len=40), shard.new_cache(max_len=40)
    if shard.has_embedding:
        prompt = torch.tensor([PROMPT])
        steps = [torch.tensor([[t]]) for t in (5, 77, 200, 3)]
    else:
        generator = torch.Generator().manual_seed(start)
        prompt = torch.randn(1, len(PROMPT), shard.config.hidden_size, generator=generator)
        steps = [torch.randn(1, 1, shard.config.hidden_size, generator=generator) for _ in "abcd"]
    shard(prompt, eager_cache)  # prefill: the eager path for both
    shard(prompt, static_cache)
    decoder = StaticDecoder(shard, static_cache)
    assert not decoder.use_graph  # CPU: no graph, the same fixed-shape step
    for x in steps:
        want = shard(x, eager_cache)
        got = decoder.step(x).clone()
        assert got.shape == want.shape
        assert (got - want).abs().max() <= 1e-5
    assert static_cache.length == eager_cache.length == len(PROMPT) + len(steps)


def test_static_generation_gives_the_reference_tokens(model_dir):
    shards = [load_shard(model_dir, 0, 2), load_shard(model_dir, 2, 4)]
    assert greedy_generate(shards, PROMPT, 20, static=True) == greedy_generate(shards, PROMPT, 20)


def test_static_steps_refuse_what_they_cannot_do(model_dir):
    shard = load_model(model_dir)
    cache = shard.new_cache(max_len=3)
    decoder = StaticDecoder(shard, cache)
    with pytest.raises(ModelError, match="one position of batch 1"):
        decoder.step(torch.tensor([[1, 2]]))
    for token in (1, 2, 3):
        decoder.step(torch.tensor([[token]]))
    with pytest.raises(KVCacheFull):
        decoder.step(torch.tensor([[4]]))
    with pytest.raises(ModelError, match="batch-1 cache"):
        StaticDecoder(shard, shard.new_cache(batch=2, max_len=3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_give_the_eager_tokens(model_dir):
    shard = load_model(model_dir, device="cuda")  # float32: the same tokens as eager
    eager = greedy_generate([shard], PROMPT, 24)
    assert greedy_generate([shard], PROMPT, 24, static=True) == eager


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_cuda_graph_replays_exactly_the_step_it_captured(model_dir, dtype):
    shard = load_model(model_dir, device="cuda", dtype=dtype)
    graphed, plain = shard.new_cache(max_len=16), shard.new_cache(max_len=16)
    with_graph = StaticDecoder(shard, graphed)
    without = StaticDecoder(shard, plain, graph=False)
    tolerance = 1e-4 if dtype == "float32" else 5e-2  # the same kernels, up to cuBLAS' choice
    for token in (3, 50, 200, 7, 7, 9):
        x = torch.tensor([[token]])
        diff = (with_graph.step(x) - without.step(x)).abs().max()
        assert diff <= tolerance, f"graph replay differs by {float(diff)}"
    assert with_graph.captured and not without.captured
    assert graphed.length == plain.length == 6
    for layer in range(shard.num_layers):  # the replays wrote the cache, at the right slots
        assert (graphed.keys[layer].float() - plain.keys[layer].float()).abs().max() <= tolerance
