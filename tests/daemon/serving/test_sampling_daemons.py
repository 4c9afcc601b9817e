"""`run_generation` with a Sampler through whole daemons (in one process, on memnet and the
virtual clock): each token reaches `on_token` with its logprobs, eos ids may be a set, a
logit_bias past the vocabulary is a clear invalid-params error, and a seeded sampled
generation whose middle server is killed mid-way gives the tokens of a single process."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon import errors  # noqa: E402
from daemon.serving.sampling import Sampled, Sampler, SamplingParams  # noqa: E402
from daemon.shards.generation import run_generation  # noqa: E402
from daemon.shards.model import greedy_generate, load_model, make_tiny  # noqa: E402
from tests.daemon.harness import inline_threads, memory_cluster  # noqa: E402

LAYERS = 6
PROMPT = list(b"sampled through daemons")
PARAMS = SamplingParams(
    temperature=0.9,
    top_k=80,
    repetition_penalty=1.1,
    frequency_penalty=0.5,
    seed=77,
    logprobs=True,
    top_logprobs=2,
)


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


@pytest.fixture
def one_torch_thread():
    """As the harness's daemons (shards.torch_threads = 1), for the reference run too."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


async def test_run_generation_samples_streams_and_survives_a_killed_server(
    autojump_clock, tmp_path, one_torch_thread
):
    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    want: list[Sampled] = []
    with torch.no_grad():
        greedy_generate(
            [load_model(model_dir)],
            PROMPT,
            30,
            sampler=Sampler(PARAMS, PROMPT),
            on_token=want.append,
        )
    tokens = [s.token for s in want]
    async with memory_cluster(tmp_path / "net", 4) as net:
        requester = net.daemons[0]
        await net.deploy(model_dir, net.daemons[1:], [(0, 3), (3, 6), (3, 6)])
        service = requester.daemon.shards

        # 1. every token reaches on_token (awaited) with its logprobs; the middle server is
        # killed as the 8th arrives and the generation goes on with the same tokens
        got: list[Sampled] = []
        job = service.new_job("test")

        async def on_token(sampled: Sampled) -> None:
            got.append(sampled)
            if len(got) == 8:
                middle = job.route[1]["peer_id"]
                net.kill(next(d for d in net.daemons if d.peer_id == middle))

        await run_generation(
            service, job, "tiny", PROMPT, 30, sampler=Sampler(PARAMS, PROMPT), on_token=on_token
        )
        assert job.error is None, job.error
        assert len(job.recoveries) == 1, job.recoveries
        assert job.tokens == tokens == [s.token for s in got]
        for a, b in zip(got, want, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-5)
            assert [i for i, _ in a.top] == [i for i, _ in b.top]

        # 2. eos ids as a set: the generation stops after the first of them
        stop = {tokens[5], tokens[9]}
        job = service.new_job("test")
        await run_generation(
            service, job, "tiny", PROMPT, 30, sampler=Sampler(PARAMS, PROMPT), eos_ids=stop
        )
        end = min(tokens.index(t) for t in stop) + 1
        assert job.error is None and job.tokens == tokens[:end]

        # 3. the old keywords still work (greedy), and a bad logit_bias is invalid params
        job = service.new_job("test")
        await run_generation(service, job, "tiny", PROMPT, 6, temperature=0.0, seed=None)
        with torch.no_grad():
            assert job.tokens == greedy_generate([load_model(model_dir)], PROMPT, 6)
        job = service.new_job("test")
        bad = Sampler(SamplingParams(logit_bias={5000: 1.0}), PROMPT)
        await run_generation(service, job, "tiny", PROMPT, 6, sampler=bad)
        assert job.error is not None and "past the vocabulary (size 258)" in job.error
        assert job.error_kind is errors.InvalidParams and job.done
