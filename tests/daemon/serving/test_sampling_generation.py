"""Sampling in the generation loops: the reference loop (`greedy_generate`), the shard client
(`client.generate`) on the in-memory network, with a server killed mid-generation, and
`run_generation` through whole daemons. The sampler lives with the requester: a failover
replay re-runs hops, never the sampler, so a seeded generation is the same with or without
recoveries."""

from __future__ import annotations

import threading

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.serving.sampling import Sampled, Sampler, SamplingParams  # noqa: E402
from daemon.shards.client import generate  # noqa: E402
from daemon.shards.model import greedy_generate, load_model  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.shards.memory_cluster import remote  # noqa: E402

cluster, virtual_time = memory_cluster.cluster, memory_cluster.virtual_time
model_dir = memory_cluster.model_dir

PROMPT = list(b"gridmesh samples tokens")
SAMPLED = SamplingParams(
    temperature=0.8,
    top_k=60,
    top_p=0.97,
    min_p=0.01,
    repetition_penalty=1.2,
    presence_penalty=0.3,
    frequency_penalty=0.2,
    logit_bias={ord("e"): 1.5, ord("q"): -100},
    seed=1234,
    logprobs=True,
    top_logprobs=3,
)


@pytest.fixture(scope="module")
def whole(model_dir):
    return load_model(model_dir)


def reference(whole, params: SamplingParams, n: int = 24) -> list[Sampled]:
    out: list[Sampled] = []
    with torch.no_grad():
        greedy_generate([whole], PROMPT, n, sampler=Sampler(params, PROMPT), on_token=out.append)
    return out


def same(got: list[Sampled], want: list[Sampled]) -> None:
    assert [s.token for s in got] == [s.token for s in want]
    for a, b in zip(got, want, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
        assert [i for i, _ in a.top] == [i for i, _ in b.top]


def test_the_reference_loop_takes_a_sampler_and_keeps_its_old_keywords(whole):
    greedy = greedy_generate([whole], PROMPT, 16)
    assert (
        greedy_generate([whole], PROMPT, 16, sampler=Sampler(SamplingParams(temperature=0), PROMPT))
        == greedy
    )
    seeded = greedy_generate([whole], PROMPT, 16, temperature=1.0, seed=9)
    assert (
        greedy_generate([whole], PROMPT, 16, sampler=Sampler(SamplingParams(seed=9), PROMPT))
        == seeded
    )
    assert seeded != greedy_generate([whole], PROMPT, 16, temperature=1.0, seed=10)
    with pytest.raises(Exception, match="belong to the sampler"):
        greedy_generate([whole], PROMPT, 2, seed=1, sampler=Sampler(SamplingParams(), PROMPT))


def test_on_token_gets_the_models_logprobs_and_eos_may_be_a_set(whole):
    out = reference(whole, SAMPLED, 12)
    ids = list(PROMPT)
    with torch.no_grad():
        for sampled in out:  # recompute each step's logits from scratch
            raw = torch.log_softmax(whole(torch.tensor([ids]))[0, -1].float(), dim=-1)
            assert sampled.logprob == pytest.approx(float(raw[sampled.token]), abs=1e-5)
            assert [i for i, _ in sampled.top] == torch.topk(raw, 3).indices.tolist()
            ids.append(sampled.token)
    assert ord("q") not in [s.token for s in out]  # banned by logit_bias
    tokens = [s.token for s in out]
    stop = {tokens[4], tokens[7]}
    cut = greedy_generate([whole], PROMPT, 12, sampler=Sampler(SAMPLED, PROMPT), eos_id=stop)
    end = min(tokens.index(t) for t in stop) + 1
    assert cut == tokens[:end]


async def test_the_client_samples_as_the_reference_loop(cluster, model_dir, whole):
    want = reference(whole, SAMPLED)
    await cluster.add("a", model_dir, 0, 3)
    await cluster.add("b", model_dir, 3, 6)
    model = remote(cluster)
    await model.open()
    got: list[Sampled] = []

    async def on_token(sampled: Sampled) -> None:  # awaited: a streaming consumer
        got.append(sampled)

    tokens = [
        t
        async for t in generate(
            model, PROMPT, 24, sampler=Sampler(SAMPLED, PROMPT), on_token=on_token
        )
    ]
    await model.close()
    assert tokens == [s.token for s in got]
    same(got, want)
    # the old keywords still give the old seeded tokens
    model = remote(cluster)
    await model.open()
    legacy = []
    async for t in generate(model, PROMPT, 12, temperature=1.0, seed=9):
        legacy.append(t)
    await model.close()
    with torch.no_grad():
        assert legacy == greedy_generate([whole], PROMPT, 12, temperature=1.0, seed=9)


@pytest.mark.parametrize("chained", [True, False], ids=["chained", "relayed"])
@pytest.mark.parametrize("hop", [0, 1, 2])
async def test_a_seeded_generation_is_the_same_after_a_server_is_killed_mid_way(
    cluster, model_dir, whole, hop, chained
):
    want = reference(whole, SAMPLED)
    for name, (a, b) in {"a": (0, 2), "m": (2, 4), "z": (4, 6)}.items():
        await cluster.add(f"{name}1", model_dir, a, b)
        await cluster.add(f"{name}2", model_dir, a, b)  # a replica of each range
    model = remote(cluster, chained=chained)
    await model.open()
    victim = model.route[hop]["peer_id"]
    got: list[Sampled] = []

    def on_token(sampled: Sampled) -> None:
        got.append(sampled)
        if len(got) == 10:
            cluster.kill(victim)

    async for _ in generate(model, PROMPT, 24, sampler=Sampler(SAMPLED, PROMPT), on_token=on_token):
        pass
    await model.close()
    assert [r["peer_id"] for r in model.recoveries] == [victim]  # it did fail over
    same(got, want)


async def test_a_seeded_generation_is_the_same_after_a_server_stalls(
    cluster, virtual_time, model_dir, whole
):
    """A server whose steps hang (no reset) is routed around on the step timeout; the tokens
    are those of an uninterrupted run."""
    want = reference(whole, SAMPLED)
    for name, (a, b) in {"a": (0, 3), "z": (3, 6)}.items():
        await cluster.add(f"{name}1", model_dir, a, b)
        await cluster.add(f"{name}2", model_dir, a, b)
    model = remote(cluster, step_timeout_s=1.0)
    await model.open()
    victim = model.route[1]["peer_id"]
    stuck = trio.Event()  # never set: the victim's steps hang

    async def hang(*args, **kw):
        await stuck.wait()

    got: list[Sampled] = []

    def on_token(sampled: Sampled) -> None:
        got.append(sampled)
        if len(got) == 6:
            cluster.servers[victim].forward = hang

    tokens = [
        t
        async for t in generate(
            model, PROMPT, 24, sampler=Sampler(SAMPLED, PROMPT), on_token=on_token
        )
    ]
    await model.close()
    assert tokens == [s.token for s in got]
    assert [r["peer_id"] for r in model.recoveries] == [victim]
    assert "no progress" in model.recoveries[0]["reason"]
    same(got, want)


class _FakeModel:
    """Only what `generate` uses of a RemoteModel: `step`, here logits of a large vocabulary
    that depend on the tokens stepped so far."""

    def __init__(self, vocab: int) -> None:
        self.vocab, self.seen = vocab, 0

    async def step(self, token_ids: list[int]) -> torch.Tensor:
        self.seen += len(token_ids)
        return torch.randn(self.vocab, generator=torch.Generator().manual_seed(self.seen)) * 4


class _WhereSampler(Sampler):
    def __call__(self, logits):
        self.threads.append(threading.get_ident())
        return super().__call__(logits)


async def test_sampled_steps_over_a_large_vocabulary_leave_the_event_loop():
    loop = threading.get_ident()
    runs = {}
    for name, params in {
        "sampled": SamplingParams(seed=3, top_p=0.9),
        "greedy": SamplingParams(temperature=0),
    }.items():
        for vocab in (1000, 50000):
            sampler = _WhereSampler(params, [1, 2])
            sampler.threads = []
            tokens = [t async for t in generate(_FakeModel(vocab), [1, 2], 6, sampler=sampler)]
            runs[name, vocab] = tokens, set(sampler.threads)
    assert runs["sampled", 1000][1] == {loop}
    assert loop not in runs["sampled", 50000][1]  # a worker thread
    assert runs["greedy", 50000][1] == {loop}  # an argmax: cheap
    # the same tokens as a sampler called inline
    inline = Sampler(SamplingParams(seed=3, top_p=0.9), [1, 2])
    fake = _FakeModel(50000)
    want = []
    logits = await fake.step([1, 2])
    for _ in range(6):
        want.append(inline(logits).token)
        logits = await fake.step([want[-1]])
    assert runs["sampled", 50000][0] == want
