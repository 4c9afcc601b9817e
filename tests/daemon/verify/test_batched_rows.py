"""A check's step runs through its replica's batcher (`daemon.shards.batching`), so its rows
may be computed in one forward pass with other sessions' steps, while the provider computed
them alone (or the other way round). The rows are then not always the same bits (a pass of
several rows takes other matrix kernels than a pass of one: measured here, a decode step
packed with three others differs from the same step alone by about 5e-7), so checks compare
within `daemon.verify.compare`'s float32 bound: these tests hold that bound against what
batching actually changes, with room to spare."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.shards.model import load_shard, make_tiny  # noqa: E402
from daemon.verify.compare import Agreement, judge, tolerance  # noqa: E402

PREFIX = 20  # positions before the checked step (a first check catches up on them)


@pytest.fixture(scope="module")
def shard(tmp_path_factory):
    """The second half of a tiny float32 model (its input: hidden states)."""
    model_dir = make_tiny(tmp_path_factory.mktemp("m") / "m", layers=4, hidden=128, seed=3)
    return load_shard(model_dir, 2, 4)


def _prefilled(shard, x):
    cache = shard.new_cache(max_len=64)
    with torch.inference_mode():
        shard(x, cache, torch.arange(int(x.shape[1])))
    return cache


def _others(shard, n, seed):
    """`n` other sessions, each `PREFIX` positions in, and their next decode step."""
    g = torch.Generator().manual_seed(seed)
    caches = [_prefilled(shard, torch.randn(1, PREFIX, 128, generator=g)) for _ in range(n)]
    return caches, [torch.randn(1, 1, 128, generator=g) for _ in range(n)]


def _agree(got, want):
    rtol = tolerance(torch.float32)
    how, worst = judge(got, want, rtol)
    assert how is not Agreement.DIFFER, worst
    assert worst <= rtol / 4, worst  # (the bound is not just barely enough)
    return how


def test_a_catch_up_batched_with_decode_steps_agrees_with_it_alone(shard):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, PREFIX + 1, 128, generator=g)  # a first check: the prefix and the step
    with torch.inference_mode():
        alone = shard(x, shard.new_cache(max_len=64), torch.arange(PREFIX + 1))
        caches, steps = _others(shard, 3, seed=1)
        batched = shard.forward_packed([*steps, x], [*caches, shard.new_cache(max_len=64)])
    _agree(batched[-1], alone)
    _agree(batched[-1][:, -1:], alone[:, -1:])  # the step's own row


def test_a_decode_step_batched_agrees_with_it_alone(shard):
    """A check that follows its hop (one position past what its session holds) in a batch
    of the replica's own decode steps, against the provider's step computed alone."""
    g = torch.Generator().manual_seed(2)
    prefix, x = torch.randn(1, PREFIX, 128, generator=g), torch.randn(1, 1, 128, generator=g)
    with torch.inference_mode():
        mine = _prefilled(shard, prefix)
        alone = shard(x, mine, torch.arange(PREFIX, PREFIX + 1))
        caches, steps = _others(shard, 3, seed=3)
        batched = shard.forward_packed([*steps, x], [*caches, _prefilled(shard, prefix)])
    _agree(batched[-1], alone)


def test_a_one_pass_catch_up_agrees_with_the_steps_one_by_one(shard):
    """The provider ran the generation step by step; the replica's first check runs its
    prefix and the step in one pass."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1, PREFIX + 1, 128, generator=g)
    with torch.inference_mode():
        cache = shard.new_cache(max_len=64)
        positions = range(PREFIX + 1)
        stepwise = [shard(x[:, i : i + 1], cache, torch.arange(i, i + 1)) for i in positions]
        one_pass = shard(x, shard.new_cache(max_len=64), torch.arange(PREFIX + 1))
    _agree(one_pass, torch.cat(stepwise, dim=1))
