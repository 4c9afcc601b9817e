"""Every family on a GPU (#17: "the CUDA-graph decode path works for each family"): the
tiny checkpoints of test_families and test_families_moe, loaded on CUDA in float32, give
transformers' greedy tokens eagerly and through the fixed-shape decode step that CUDA graphs
replay (static=True), and a graph's replay equals the eager step past the sliding window.
Skipped without CUDA (CI has none); run on a lent GPU with
`pytest tests/daemon/shards/test_families_cuda.py`."""

from __future__ import annotations

from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

from daemon.shards import model as m  # noqa: E402
from tests.daemon.shards import test_families as dense  # noqa: E402
from tests.daemon.shards import test_families_moe as moe  # noqa: E402

NEW = 12
PROMPT = [1, *b"the window slides over the prompt"]
CASES = [*dense.CASES, *moe.CASES]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    transformers.logging.set_verbosity_error()
    root = tmp_path_factory.mktemp("families_cuda")
    out = {case: dense.write_hf(root / case, case, seed) for seed, case in enumerate(dense.CASES)}
    out.update(moe.write_all(root))
    return out


def _reference_tokens(path: Path) -> list[int]:
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return dense.hf_greedy(ref, PROMPT, NEW)


@pytest.mark.parametrize("case", CASES)
def test_every_family_on_cuda_eager_and_graphed_gives_transformers_tokens(checkpoints, case):
    path = checkpoints[case]
    want = _reference_tokens(path)
    gpu = m.load_model(path, device="cuda")
    assert gpu.device.type == "cuda"
    assert m.greedy_generate([gpu], PROMPT, NEW) == want
    assert m.greedy_generate([gpu], PROMPT, NEW, static=True) == want  # CUDA graphs
    # split over two shards on the GPU, as two daemons would hold it
    layers = gpu.config.num_hidden_layers
    chain = [
        m.load_shard(path, 0, layers // 2, device="cuda"),
        m.load_shard(path, layers // 2, layers, device="cuda"),
    ]
    assert m.greedy_generate(chain, PROMPT, NEW, static=True) == want


@pytest.mark.parametrize("case", CASES)
def test_a_graph_replay_equals_the_eager_step_past_the_window(checkpoints, case):
    shard = m.load_model(checkpoints[case], device="cuda")
    graphed, plain = shard.new_cache(max_len=80), shard.new_cache(max_len=80)
    shard(torch.tensor([PROMPT]), graphed)
    shard(torch.tensor([PROMPT]), plain)
    with_graph = m.StaticDecoder(shard, graphed)
    without = m.StaticDecoder(shard, plain, graph=False)
    for token in b"and over the tokens it generates":  # more steps than any window holds
        x = torch.tensor([[token]])
        diff = (with_graph.step(x) - without.step(x)).abs().max()
        assert diff <= 1e-4, f"{case}: graph replay differs by {float(diff)}"
