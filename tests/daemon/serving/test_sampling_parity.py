"""Sampling parity with Hugging Face transformers' `generate` on a tiny Llama checkpoint.

Two levels, for each of temperature, top_k, top_p, min_p, repetition_penalty, their
combinations, and greedy (with and without repetition_penalty):
- the sampler on transformers' own logits (`output_logits`): the processed logits are equal
  tensors (`torch.equal`) to transformers' processed scores (`output_scores`), and the tokens
  drawn under `torch.manual_seed(seed)` equal ours from a Sampler seeded with `seed`;
- end to end: our reference loop (`greedy_generate` with a Sampler) gives transformers'
  tokens, token for token.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from daemon.serving.sampling import Sampler, SamplingParams  # noqa: E402
from daemon.shards import model as m  # noqa: E402

PROMPT = [m.BYTE_BOS_ID, *b"The quick brown fox"]
NEW = 16
SEEDS = (0, 1, 2)
CASES = {
    "temperature-1": {"temperature": 1.0},
    "temperature-0.7": {"temperature": 0.7},
    "top_k": {"top_k": 10},
    "top_p": {"top_p": 0.6},
    "min_p": {"min_p": 0.5},
    "repetition_penalty": {"repetition_penalty": 1.5},
    "sharp-top_p-min_p": {"temperature": 0.3, "top_p": 0.7, "min_p": 0.1},
    "all": {
        "temperature": 0.6,
        "top_k": 20,
        "top_p": 0.8,
        "min_p": 0.05,
        "repetition_penalty": 1.3,
    },
    "greedy": {"temperature": 0.0},
    "greedy-repetition_penalty": {"temperature": 0.0, "repetition_penalty": 1.3},
}
TRUNCATING = {"top_k", "top_p", "min_p", "sharp-top_p-min_p", "all"}


@pytest.fixture(scope="module")
def transformers_mod():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return transformers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return m.make_tiny(tmp_path_factory.mktemp("parity") / "tiny", layers=2, seed=5)


@pytest.fixture(scope="module")
def reference(transformers_mod, tiny):
    return transformers_mod.LlamaForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()


_RUNS: dict[tuple[str, int], tuple[list[int], list, list]] = {}


def hf_run(ref, case: str, seed: int):
    """hf_generate of a named case, once per module."""
    if (case, seed) not in _RUNS:
        _RUNS[case, seed] = hf_generate(ref, CASES[case], seed)
    return _RUNS[case, seed]


def hf_generate(ref, case: dict, seed: int):
    """transformers' generate with `case`'s parameters (every warper it has stated, so no
    default of its own applies), its raw logits and processed scores per step."""
    temperature = case.get("temperature", 1.0)
    kwargs = {
        "do_sample": temperature > 0,
        "top_k": case.get("top_k", 0),
        "top_p": case.get("top_p", 1.0),
        "repetition_penalty": case.get("repetition_penalty", 1.0),
    }
    if temperature > 0:
        kwargs["temperature"] = temperature
    if "min_p" in case:
        kwargs["min_p"] = case["min_p"]
    torch.manual_seed(seed)
    with torch.no_grad():
        out = ref.generate(
            torch.tensor([PROMPT]),
            max_new_tokens=NEW,
            eos_token_id=None,
            output_logits=True,
            output_scores=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    tokens = out.sequences[0, len(PROMPT) :].tolist()
    assert len(tokens) == NEW
    return tokens, [x[0] for x in out.logits], [x[0] for x in out.scores]


@pytest.mark.parametrize("case", list(CASES))
def test_the_sampler_on_transformers_logits_is_bit_for_bit_transformers(reference, case):
    params = CASES[case]
    bites = changed = 0
    for seed in SEEDS:
        want, logits, scores = hf_run(reference, case, seed)
        sampler = Sampler(SamplingParams(seed=seed, **params), PROMPT)
        got = []
        for step_logits, step_scores in zip(logits, scores, strict=True):
            assert torch.equal(sampler.process(step_logits), step_scores)
            got.append(sampler(step_logits).token)
            bites += int(step_scores.isinf().sum())
            changed += int(not torch.equal(step_scores, step_logits))
        assert got == want, seed
    if case in TRUNCATING:  # the case really truncates the distribution
        assert bites > 0
    if "repetition_penalty" in params:  # and really penalises
        assert changed > 0


@pytest.mark.parametrize("case", list(CASES))
def test_the_reference_loop_gives_transformers_tokens(reference, tiny, case):
    params = CASES[case]
    whole = m.load_model(tiny)
    for seed in SEEDS:
        want, _, _ = hf_run(reference, case, seed)
        sampler = Sampler(SamplingParams(seed=seed, **params), PROMPT)
        with torch.no_grad():
            got = m.greedy_generate([whole], PROMPT, NEW, sampler=sampler)
        assert got == want, seed


def test_sampled_cases_differ_from_greedy(reference):
    """The sampled cases do sample: their tokens are not the greedy ones."""
    greedy, _, _ = hf_run(reference, "greedy", 0)
    for case in ("temperature-1", "top_k", "top_p", "min_p", "all"):
        assert hf_run(reference, case, 0)[0] != greedy
