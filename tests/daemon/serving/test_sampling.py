"""daemon.serving.sampling: the bounds of SamplingParams, each processor against a hand
computation, logprobs, logit_bias, the penalties' counts, seeds and the legacy sampler."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")
msgspec = pytest.importorskip("msgspec")

from daemon.serving.sampling import (  # noqa: E402
    Sampled,
    Sampler,
    SamplingError,
    SamplingParams,
    legacy_sampler,
)

INF = float("-inf")
V = 8


def logits(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def random_logits(seed: int, n: int = 64, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)) * scale


def draws(params: SamplingParams, steps: int = 12, prompt=(1, 2, 3)) -> list[int]:
    sampler = Sampler(params, list(prompt))
    return [sampler(random_logits(i)).token for i in range(steps)]


# --- bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"temperature": 2.5}, "<= 2.0 - at `$.temperature`"),
        ({"temperature": -0.1}, ">= 0.0 - at `$.temperature`"),
        ({"temperature": float("nan")}, "`$.temperature`"),
        ({"top_p": 0.0}, "> 0.0 - at `$.top_p`"),
        ({"top_p": 1.01}, "<= 1.0 - at `$.top_p`"),
        ({"top_k": -1}, ">= 0 - at `$.top_k`"),
        ({"min_p": 1.5}, "<= 1.0 - at `$.min_p`"),
        ({"seed": 1 << 63}, "at `$.seed`"),
        ({"seed": -(1 << 63) - 1}, "at `$.seed`"),
        ({"presence_penalty": 2.01}, "at `$.presence_penalty`"),
        ({"frequency_penalty": -2.01}, "at `$.frequency_penalty`"),
        ({"repetition_penalty": 0.0}, "> 0.0 - at `$.repetition_penalty`"),
        ({"repetition_penalty": 10.5}, "at `$.repetition_penalty`"),
        ({"logit_bias": {"5": 100.5}}, "at `$.logit_bias[...]`"),
        ({"logit_bias": {"-1": 1}}, "`key` in `$.logit_bias`"),
        ({"logit_bias": {"x": 1}}, "`key` in `$.logit_bias`"),
        ({"logit_bias": {str(i): 1 for i in range(301)}}, "length <= 300"),
        ({"top_logprobs": 21}, "<= 20 - at `$.top_logprobs`"),
        ({"logprobs": 1}, "`$.logprobs`"),
        ({"temperature": "1"}, "got `str` - at `$.temperature`"),
        ({"best_of": 2}, "unknown field `best_of`"),
    ],
)
def test_out_of_bounds_params_are_refused_naming_the_field(values, message):
    with pytest.raises(msgspec.ValidationError) as caught:
        SamplingParams.parse(values)
    assert message in str(caught.value)


def test_in_bounds_params_parse_with_json_style_keys():
    params = SamplingParams.parse(
        {
            "temperature": 2,
            "top_p": 1,
            "seed": -(1 << 63),
            "presence_penalty": -2,
            "frequency_penalty": 2,
            "repetition_penalty": 10,
            "logit_bias": {"5": -100, "7": 100, **{str(i): 0.5 for i in range(10, 308)}},
            "top_logprobs": 20,
        }
    )
    assert params.logit_bias[5] == -100.0 and len(params.logit_bias) == 300
    assert msgspec.json.decode(b'{"logit_bias": {"3": 1.5}}', type=SamplingParams).logit_bias == {
        3: 1.5
    }
    assert SamplingParams(temperature=0).greedy and not SamplingParams().greedy


def test_sampler_refuses_params_built_past_what_the_arithmetic_allows():
    for params in (
        SamplingParams(temperature=-1.0),
        SamplingParams(top_p=0.0),
        SamplingParams(top_k=-2),
        SamplingParams(repetition_penalty=0.0),
        SamplingParams(temperature=float("nan")),
        SamplingParams(logit_bias={1: 101.0}),
        SamplingParams(top_logprobs=21),
    ):
        with pytest.raises(SamplingError):
            Sampler(params, [1])
    legacy_sampler([1], temperature=10.0)  # the JSON-RPC/gRPC range is wider: still fine


def test_logit_bias_past_the_vocabulary_is_a_clear_error():
    with pytest.raises(SamplingError, match="token id 8 is past the vocabulary"):
        Sampler(SamplingParams(logit_bias={8: 1.0}), [1], vocab_size=V)
    # the tokenizer's vocabulary may be shorter than the logits (padded embeddings)
    padded = Sampler(SamplingParams(temperature=0, logit_bias={7: 100}), [1], vocab_size=V)
    assert padded(torch.zeros(V + 56)).token == 7
    sampler = Sampler(SamplingParams(logit_bias={8: 1.0}), [1])
    with pytest.raises(SamplingError, match="past the vocabulary"):
        sampler(torch.zeros(V))
    with pytest.raises(SamplingError, match="1-D"):
        Sampler(SamplingParams(), [1])(torch.zeros(1, V))
    fixed = Sampler(SamplingParams(), [1])
    fixed(torch.zeros(V))
    with pytest.raises(SamplingError, match="expected 8"):
        fixed(torch.zeros(V + 1))


# --- greedy -----------------------------------------------------------------------------


def test_greedy_is_exactly_the_argmax_and_default_params_do_not_touch_the_logits():
    x = random_logits(0)
    greedy = Sampler(SamplingParams(temperature=0, top_k=1, top_p=0.1, min_p=0.9), [1])
    assert greedy(x).token == int(torch.argmax(x))
    # a tie: the first index, as torch.argmax (top_p alone could drop one of the tied tokens)
    tie = logits(0.0, 3.0, 3.0, 1.0)
    assert Sampler(SamplingParams(temperature=0, top_p=0.1), [1])(tie).token == 1
    plain = Sampler(SamplingParams(), [1])
    assert torch.equal(plain.process(x), x)
    assert legacy_sampler([1])(x) == Sampled(int(torch.argmax(x)), None, [])


# --- each processor against a hand computation ----------------------------------------


def test_presence_and_frequency_penalties_follow_the_generated_counts():
    params = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25)
    sampler = Sampler(params, [0, 0, 0])  # prompt tokens do not count (OpenAI)
    flat = torch.zeros(4)
    assert torch.equal(sampler.penalised(flat), flat)
    forced = [3, 3, 1]
    for token in forced:  # steer the draws with a large logit
        step = torch.zeros(4)
        step[token] = 50.0
        assert sampler(step).token == token
    counts = torch.tensor([0.0, 1.0, 0.0, 2.0])
    want = flat - (counts * 0.25 + (counts > 0).float() * 0.5)
    assert torch.equal(sampler.penalised(flat), want)
    assert sampler.penalised(flat).tolist() == [0.0, -0.75, 0.0, -1.0]
    # negative penalties (OpenAI allows them) favour what was said
    encourage = Sampler(SamplingParams(temperature=0, presence_penalty=-1.0), [])
    encourage(logits(0.0, 1.0, 0.5))
    assert encourage(logits(0.9, 0.0, 0.5)).token == 1


def test_repetition_penalty_over_prompt_and_generated_ids():
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), [0, 2])
    x = logits(4.0, 4.0, -4.0, -1.0, 3.0)
    # seen: 0 and 2 (prompt); positive divided, negative multiplied
    assert sampler.penalised(x).tolist() == [2.0, 4.0, -8.0, -1.0, 3.0]
    assert sampler(x).token == 1
    assert sampler.penalised(x).tolist() == [2.0, 2.0, -8.0, -1.0, 3.0]  # 1 is seen now
    assert sampler(x).token == 4


def test_temperature_divides_the_logits():
    x = logits(1.0, 2.0, 3.0)
    assert torch.equal(Sampler(SamplingParams(temperature=0.5), []).process(x), x / 0.5)
    assert torch.equal(Sampler(SamplingParams(temperature=1.0), []).process(x), x)


def test_top_k_keeps_the_k_largest_and_their_ties():
    x = logits(1.0, 5.0, 3.0, 3.0, 0.0)
    got = Sampler(SamplingParams(top_k=2), []).process(x)
    assert got.tolist() == [INF, 5.0, 3.0, 3.0, INF]
    assert torch.equal(Sampler(SamplingParams(top_k=100), []).process(x), x)


def test_top_p_keeps_the_smallest_set_reaching_p():
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()

    def dropped(top_p: float) -> list[bool]:
        return Sampler(SamplingParams(top_p=top_p), []).process(x).isinf().tolist()

    # ascending cumulative probabilities: 0.05, 0.20, 0.50, 1.0; dropped where <= 1 - top_p
    assert dropped(0.75) == [False, False, True, True]
    assert dropped(0.85) == [False, False, False, True]
    assert dropped(0.4) == [False, True, True, True]
    assert dropped(0.01) == [False, True, True, True]  # the top one always stays
    assert dropped(0.99) == [False, False, False, False]


def test_min_p_scales_with_the_top_probability():
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    # threshold 0.5 * 0.5 = 0.25: 0.15 and 0.05 go
    got = Sampler(SamplingParams(min_p=0.5), []).process(x)
    assert got.isinf().tolist() == [False, False, True, True]
    assert Sampler(SamplingParams(min_p=1.0), []).process(x).isinf().sum() == 3


def test_processors_apply_in_transformers_order():
    """temperature before top_p: at temperature 0.5 the distribution sharpens (p ∝ p²:
    0.685, 0.247, 0.062, 0.007; ascending cumulative 0.007, 0.068, 0.315, 1), so top_p 0.6
    keeps only the first token, where top_p before temperature would keep two (0.05, 0.20,
    0.50, 1)."""
    x = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    got = Sampler(SamplingParams(temperature=0.5, top_p=0.6), []).process(x)
    assert got.isinf().tolist() == [False, True, True, True]
    assert Sampler(SamplingParams(top_p=0.6), []).process(x).isinf().tolist() == [
        False,
        False,
        True,
        True,
    ]
    # repetition penalty before temperature: -1 * 3 / 0.5 = -6
    rep = Sampler(SamplingParams(temperature=0.5, repetition_penalty=3.0), [1])
    assert rep.process(logits(1.0, -1.0)).tolist() == [2.0, -6.0]


def test_sampled_tokens_come_only_from_what_the_warpers_keep():
    params = SamplingParams(top_k=3, seed=7)
    sampler = Sampler(params, [])
    x = logits(0.0, 1.0, 2.0, 3.0, 4.0, 5.0)
    seen = {sampler(x).token for _ in range(200)}
    assert seen == {3, 4, 5}


# --- logit_bias -------------------------------------------------------------------------


def test_logit_bias_is_added_and_exact_at_its_bounds():
    x = logits(5.0, 1.0, 0.0, 0.0)
    added = Sampler(SamplingParams(logit_bias={1: 2.5, 2: -1.0}), []).penalised(x)
    assert added.tolist() == [5.0, 3.5, -1.0, 0.0]
    # -100 bans the token: it is never drawn, not even greedily
    banned = Sampler(SamplingParams(temperature=0, logit_bias={0: -100}), [])
    assert banned(x).token == 1
    sampled = Sampler(SamplingParams(seed=1, logit_bias={0: -100, 3: -100}), [])
    assert 0 not in {sampled(x).token for _ in range(200)}
    # +100 forces it, even against a much larger logit
    forced = Sampler(SamplingParams(seed=2, logit_bias={2: 100}), [])
    assert {forced(logits(90.0, 1.0, -50.0, 0.0)).token for _ in range(50)} == {2}
    # several forced tokens: the draw is among them only
    two = Sampler(SamplingParams(seed=3, logit_bias={1: 100, 3: 100}), [])
    assert {two(x).token for _ in range(200)} == {1, 3}


def test_logit_bias_banning_every_token_is_a_clear_error():
    bias = {i: -100.0 for i in range(4)}
    for temperature in (0.0, 1.0):
        sampler = Sampler(SamplingParams(temperature=temperature, logit_bias=bias), [])
        with pytest.raises(SamplingError, match="no token"):
            sampler(logits(1.0, 2.0, 3.0, 4.0))


# --- logprobs ---------------------------------------------------------------------------


def test_logprobs_are_the_models_log_softmax_whatever_the_sampling():
    x = random_logits(3, n=32)
    raw = torch.log_softmax(x, dim=-1)
    params = SamplingParams(
        temperature=0.3,
        top_k=4,
        repetition_penalty=1.7,
        presence_penalty=1.0,
        logit_bias={0: 30.0},
        logprobs=True,
        top_logprobs=5,
        seed=4,
    )
    sampler = Sampler(params, [int(torch.argmax(x))])
    for _ in range(3):
        token, logprob, top = sampler(x)
        assert logprob == pytest.approx(float(raw[token]), abs=0)
        values, ids = torch.topk(raw, 5)
        assert top == list(zip(ids.tolist(), values.tolist(), strict=True))
        assert [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert math.isclose(sum(math.exp(v) for v in raw.tolist()), 1.0, rel_tol=1e-5)
    # greedy requests get them too; without logprobs: none, and nothing computed
    greedy = Sampler(SamplingParams(temperature=0, logprobs=True), [])(x)
    assert greedy.logprob == float(raw[int(torch.argmax(x))]) and greedy.top == []
    assert Sampler(SamplingParams(temperature=0), [])(x) == Sampled(int(torch.argmax(x)), None, [])


# --- seeds ------------------------------------------------------------------------------


def test_a_seed_gives_the_same_tokens_and_choices_differ():
    params = SamplingParams(seed=11, temperature=1.5)
    assert draws(params) == draws(params)
    assert draws(params) != draws(SamplingParams(seed=12, temperature=1.5))
    first = Sampler(params, [])
    other = Sampler(params, [], choice=1)
    plain = Sampler(params, [])
    a = [first(random_logits(i)).token for i in range(12)]
    b = [other(random_logits(i)).token for i in range(12)]
    assert a != b
    assert a == [plain(random_logits(i)).token for i in range(12)]  # choice 0: the plain seed
    # the plain seed is torch's: a generator seeded with it draws the same first token
    probs = random_logits(0).softmax(dim=-1)
    want = int(torch.multinomial(probs, 1, generator=torch.Generator().manual_seed(11)))
    assert Sampler(SamplingParams(seed=11), [])(random_logits(0)).token == want
    # extreme seeds are fine, and seed torch's generator as torch.manual_seed does
    for seed in (-(1 << 63), -1, 0, (1 << 63) - 1):
        assert draws(SamplingParams(seed=seed)) == draws(SamplingParams(seed=seed))
        torch_seed = torch.Generator().manual_seed(seed).initial_seed()
        assert Sampler(SamplingParams(seed=seed), []).generator.initial_seed() == torch_seed


def test_unseeded_samplers_draw_from_fresh_seeds():
    params = SamplingParams(temperature=2.0)
    assert len({tuple(draws(params, steps=8)) for _ in range(3)}) > 1


def test_the_legacy_sampler_draws_softmax_over_temperature():
    """The JSON-RPC/gRPC generate's tokens: softmax(logits / t) from a generator seeded by seed."""
    generator = torch.Generator().manual_seed(5)
    sampler = legacy_sampler([1, 2], temperature=0.8, seed=5)
    wants = []
    for i in range(10):
        x = random_logits(i)
        wants.append(int(torch.multinomial(torch.softmax(x / 0.8, dim=-1), 1, generator=generator)))
        assert sampler(x).token == wants[-1]
    assert sampler.generated == wants  # recorded in order
