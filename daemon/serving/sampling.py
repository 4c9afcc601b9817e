"""Sampling at the requester: one next token from the last hop's logits, per request.

A `Sampler` holds one generation's sampling state: its `SamplingParams`, the token ids seen
so far (prompt and generated, for the penalties) and a CPU `torch.Generator`. It lives with
the requester, where the last hop's logits arrive, so a sampled step costs no more round
trips than a greedy one, and a failover replay (which re-runs hops, not the sampler) leaves
its state untouched: with a `seed`, a generation gives the same tokens on every run and after
any number of recoveries.

Order of operations on the float32 logits of one step (each step is skipped at its neutral
value, so default parameters leave the logits bit for bit as the model gave them):

1. OpenAI's penalties over the *generated* tokens only (as OpenAI documents them), with
   `c[j]` the number of times token j was generated so far:
   `logits[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty`.
2. `logit_bias` is added to the logits. At its bounds it is exact, not approximate:
   -100 bans the token (its logit becomes -inf) and +100 restricts the choice to the tokens
   biased by +100 (every other token becomes -inf), as OpenAI describes those values.
3. transformers' processors, in the order `generate(do_sample=True)` applies them
   (`GenerationMixin._get_logits_processor`), with the same arithmetic:
   repetition_penalty over prompt + generated ids (a seen token's logit is multiplied by the
   penalty when negative, divided by it otherwise), then temperature (division), top_k (every
   logit below the k-th largest becomes -inf), top_p (sorted ascending, softmax, cumulative
   sum; the tokens whose cumulative probability is <= 1 - top_p are dropped, the most likely
   one always kept), min_p (tokens with a probability below min_p times the top probability
   are dropped, the top one kept).
4. temperature == 0 (greedy): the token is exactly `torch.argmax` of the logits after 1-3's
   penalties and bias (temperature and the truncations are not applied: they cannot change
   the argmax, as transformers' greedy search does not apply them either). With default
   parameters that is today's greedy output. Otherwise: `torch.multinomial` of the softmax,
   one sample, drawn from the sampler's generator.

Bit for bit with transformers 5 (`torch.manual_seed(seed)` then `generate(do_sample=True,
...)` on the same float32 logits, batch 1, `min_tokens_to_keep` 1): temperature, top_k,
top_p, min_p, repetition_penalty, each and combined, greedy included: the processed logits
are equal tensors and the sampled tokens equal (tests/daemon/serving/test_sampling_parity.py).
presence_penalty, frequency_penalty and logit_bias have no transformers counterpart in
`generate` and are tested against hand computations.

Seeds: `seed` seeds the generator with `manual_seed(seed)` (the same stream as
`torch.manual_seed(seed)` gives transformers); `choice` k > 0 (OpenAI's `n`) derives a
different seed per choice, choice 0 being the plain seed. No seed: a fresh random seed.

Logprobs report the *model's* distribution: `log_softmax` of the logits exactly as the model
gave them, before penalties, bias, temperature and truncation (vLLM's default,
`raw_logprobs`). So they are defined for greedy requests, finite for every token, the same
whatever the sampling parameters, and `top` can always list the most likely alternatives.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, NamedTuple

import msgspec
import torch
from msgspec import Meta

MAX_LOGIT_BIAS = 300  # entries, as OpenAI
MAX_TOP_LOGPROBS = 20
BIAS_LIMIT = 100.0
INLINE_VOCAB = 8192  # sampled steps over more tokens than this leave the event loop
_CHOICE_STRIDE = 0x9E3779B97F4A7C15  # odd: distinct seeds for distinct choices
_U64 = 1 << 64

TokenId = Annotated[int, Meta(ge=0, le=(1 << 31) - 1)]
Bias = Annotated[float, Meta(ge=-BIAS_LIMIT, le=BIAS_LIMIT)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
Seed = Annotated[int, Meta(ge=-(1 << 63), le=(1 << 63) - 1)]


class SamplingError(ValueError):
    """Sampling parameters that cannot apply to this model (e.g. a logit_bias id past the
    vocabulary), or a step that leaves no token to choose."""


class SamplingParams(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One request's sampling parameters (OpenAI's names and ranges). The bounds are checked
    when the params are decoded or converted (`SamplingParams.parse`, `msgspec.convert`):
    msgspec's errors name the field, e.g. "Expected `float` <= 2.0 - at `$.temperature`"."""

    temperature: Annotated[float, Meta(ge=0.0, le=2.0)] = 1.0  # 0: greedy
    top_p: Annotated[float, Meta(gt=0.0, le=1.0)] = 1.0  # 1: off
    top_k: Annotated[int, Meta(ge=0, le=(1 << 31) - 1)] = 0  # 0: off
    min_p: Annotated[float, Meta(ge=0.0, le=1.0)] = 0.0  # 0: off
    seed: Seed | None = None
    presence_penalty: Penalty = 0.0
    frequency_penalty: Penalty = 0.0
    repetition_penalty: Annotated[float, Meta(gt=0.0, le=10.0)] = 1.0  # 1: off
    logit_bias: Annotated[dict[TokenId, Bias], Meta(max_length=MAX_LOGIT_BIAS)] = msgspec.field(
        default_factory=dict
    )
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_TOP_LOGPROBS)] = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @classmethod
    def parse(cls, values: dict) -> SamplingParams:
        """Validated params from plain values (JSON-like; logit_bias keys may be strings of
        digits, as JSON has them). Raises msgspec.ValidationError naming the field."""
        return msgspec.convert(values, cls, str_keys=True)


class Sampled(NamedTuple):
    """One generated token. `logprob`: its log probability under the model's distribution
    (None unless `logprobs` or `top_logprobs`); `top`: the `top_logprobs` most likely tokens
    and theirs, most likely first."""

    token: int
    logprob: float | None
    top: list[tuple[int, float]]


def _check(params: SamplingParams) -> None:
    """What the arithmetic needs, for params built in Python without msgspec's bounds (the
    JSON-RPC and gRPC `generate` allow temperatures up to 10)."""
    finite = (
        params.temperature,
        params.top_p,
        params.min_p,
        params.presence_penalty,
        params.frequency_penalty,
        params.repetition_penalty,
        *params.logit_bias.values(),
    )
    if not all(v == v and abs(v) != float("inf") for v in finite):
        raise SamplingError("sampling parameters must be finite numbers")
    if params.temperature < 0:
        raise SamplingError("temperature must be >= 0")
    if not 0 < params.top_p <= 1:
        raise SamplingError("top_p must be in (0, 1]")
    if params.top_k < 0:
        raise SamplingError("top_k must be >= 0")
    if not 0 <= params.min_p <= 1:
        raise SamplingError("min_p must be in [0, 1]")
    if params.repetition_penalty <= 0:
        raise SamplingError("repetition_penalty must be > 0")
    if not 0 <= params.top_logprobs <= MAX_TOP_LOGPROBS:
        raise SamplingError(f"top_logprobs must be in [0, {MAX_TOP_LOGPROBS}]")
    if len(params.logit_bias) > MAX_LOGIT_BIAS:
        raise SamplingError(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries")
    if any(abs(v) > BIAS_LIMIT for v in params.logit_bias.values()):
        raise SamplingError(f"logit_bias values must be in [-{BIAS_LIMIT:g}, {BIAS_LIMIT:g}]")
    if any(not isinstance(k, int) or k < 0 for k in params.logit_bias):
        raise SamplingError("logit_bias keys must be token ids (integers >= 0)")


class Sampler:
    """One generation's sampler: call it with each step's logits (1-D, over the vocabulary),
    get the next token. It records the token it returns (for the penalties), so call it once
    per generated token, in order."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int],
        *,
        choice: int = 0,
        vocab_size: int | None = None,
    ) -> None:
        """`choice`: which of a request's `n` generations this is (its own seed when seeded).
        `vocab_size`: the tokenizer's, when known: logit_bias ids are checked against it now
        (SamplingError) rather than against the logits' length at the first step."""
        _check(params)
        if choice < 0:
            raise SamplingError("choice must be >= 0")
        self.params = params
        self.prompt_ids = [int(i) for i in prompt_ids]
        self.generated: list[int] = []
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed((params.seed + choice * _CHOICE_STRIDE) % _U64)
        self._vocab: int | None = None
        self._counts: torch.Tensor | None = None  # generated tokens, per id (float32)
        self._seen: torch.Tensor | None = None  # prompt + generated ids (bool)
        self._bias: torch.Tensor | None = None  # logit_bias, with -inf where banned
        if vocab_size is not None:  # the logits may still be longer (padded embeddings)
            self._check_bias(vocab_size)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def cheap(self, vocab: int) -> bool:
        """Whether a step costs little enough to run on an event loop: greedy (an argmax), or
        a small vocabulary. A sampled step over 128k tokens takes milliseconds (the draw
        alone makes one exponential per token, the top_p sort more): callers run those in a
        worker thread."""
        return self.greedy or vocab <= INLINE_VOCAB

    def _check_bias(self, vocab: int) -> None:
        bad = sorted(k for k in self.params.logit_bias if k >= vocab)
        if bad:
            raise SamplingError(
                f"logit_bias token id {bad[0]} is past the vocabulary (size {vocab})"
            )

    def _setup(self, vocab: int) -> None:
        """Vocabulary-sized state, once the vocabulary size is known."""
        p = self.params
        if vocab < 1:
            raise SamplingError("empty logits")
        if p.logit_bias:
            self._check_bias(vocab)
            ids = torch.tensor(list(p.logit_bias), dtype=torch.int64)
            values = torch.tensor(list(p.logit_bias.values()), dtype=torch.float32)
            bias = torch.zeros(vocab, dtype=torch.float32).index_put_((ids,), values)
            forced = bias >= BIAS_LIMIT
            banned = bias <= -BIAS_LIMIT
            if bool(forced.any()):
                banned |= ~forced
            self._bias = bias.masked_fill(banned, float("-inf"))
        if p.presence_penalty or p.frequency_penalty:
            self._counts = torch.zeros(vocab, dtype=torch.float32)
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(vocab, dtype=torch.bool)
            ids = torch.tensor([i for i in self.prompt_ids if 0 <= i < vocab], dtype=torch.int64)
            self._seen = seen.index_fill_(0, ids, True)
        self._vocab = vocab

    def penalised(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits after the penalties and the bias (steps 1 to 3's repetition penalty):
        what greedy takes the argmax of. A new tensor; `logits` is left as it is."""
        return self._penalise(self._prepare(logits))

    def _penalise(self, logits: torch.Tensor) -> torch.Tensor:
        p = self.params
        scores = logits
        if self._counts is not None:
            counts = self._counts
            scores = scores - (counts * p.frequency_penalty + (counts > 0) * p.presence_penalty)
        if self._bias is not None:
            scores = scores + self._bias
        if self._seen is not None:
            penalty = p.repetition_penalty
            changed = torch.where(scores < 0, scores * penalty, scores / penalty)
            scores = torch.where(self._seen, changed, scores)
        return scores

    def _warp(self, scores: torch.Tensor) -> torch.Tensor:
        """Temperature, top_k, top_p, min_p over penalised logits, as transformers' warpers
        in its order (step 3); the distribution a sampled token is drawn from is their
        softmax."""
        p = self.params
        inf = float("-inf")
        if p.temperature != 1.0:
            scores = scores / p.temperature
        if p.top_k:
            k = min(p.top_k, scores.shape[-1])
            kth = torch.topk(scores, k).values[-1]
            scores = scores.masked_fill(scores < kth, inf)
        if p.top_p < 1.0:
            ascending, order = torch.sort(scores)  # transformers sorts ascending, unstable
            below = ascending.softmax(dim=-1).cumsum(dim=-1) <= 1 - p.top_p
            below[-1] = False  # the most likely token always stays
            drop = torch.zeros_like(below).scatter_(0, order, below)
            scores = scores.masked_fill(drop, inf)
        if p.min_p:
            probs = scores.softmax(dim=-1)
            top = probs.amax()
            drop = probs < p.min_p * top
            drop[torch.argmax(probs)] = False
            scores = scores.masked_fill(drop, inf)
        return scores

    def process(self, logits: torch.Tensor) -> torch.Tensor:
        """The processed logits of one step without drawing: penalised, then warped unless
        greedy (for tests and for callers that want the distribution)."""
        scores = self._penalise(self._prepare(logits))
        return scores if self.greedy else self._warp(scores)

    def _prepare(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() != 1:
            raise SamplingError(
                f"logits must be 1-D over the vocabulary, got {tuple(logits.shape)}"
            )
        logits = logits.detach().to(device="cpu", dtype=torch.float32)
        if self._vocab is None:
            self._setup(logits.shape[0])
        elif logits.shape[0] != self._vocab:
            raise SamplingError(f"logits over {logits.shape[0]} tokens, expected {self._vocab}")
        return logits

    def __call__(self, logits: torch.Tensor) -> Sampled:
        """The next token from one step's logits; recorded as generated."""
        logits = self._prepare(logits)
        scores = self._penalise(logits)
        if self.greedy:
            if self._bias is not None and not bool(torch.isfinite(scores).any()):
                raise SamplingError("logit_bias leaves no token to choose")
            token = int(torch.argmax(scores))
        else:
            scores = self._warp(scores)
            probs = scores.softmax(dim=-1)
            if not bool((probs > 0).any()):
                raise SamplingError("no token left to sample (every logit is -inf)")
            token = int(torch.multinomial(probs, 1, generator=self.generator))
        self._record(token)
        if not (self.params.logprobs or self.params.top_logprobs):
            return Sampled(token, None, [])
        logprobs = torch.log_softmax(logits, dim=-1)
        top: list[tuple[int, float]] = []
        if self.params.top_logprobs:
            k = min(self.params.top_logprobs, logprobs.shape[0])
            values, ids = torch.topk(logprobs, k)
            top = list(zip(ids.tolist(), values.tolist(), strict=True))
        return Sampled(token, float(logprobs[token]), top)

    def _record(self, token: int) -> None:
        self.generated.append(token)
        if self._counts is not None:
            self._counts[token] += 1
        if self._seen is not None:
            self._seen[token] = True


def legacy_sampler(
    prompt_ids: Sequence[int], *, temperature: float = 0.0, seed: int | None = None
) -> Sampler:
    """The sampler of the JSON-RPC/gRPC `generate` (temperature and seed only): greedy at 0,
    else softmax(logits / temperature) sampled from a generator seeded by `seed`, the tokens
    those APIs always gave."""
    return Sampler(SamplingParams(temperature=float(temperature), seed=seed), prompt_ids)
