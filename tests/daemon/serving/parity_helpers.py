"""Checkpoints and Hugging Face transformers references for the endpoint's parity tests.

`bpe_tiny` writes a tiny random Llama whose tokenizer is the byte-level BPE trained in
text_helpers (vocabulary = that BPE's size), with a real chat template from text_helpers in
its tokenizer_config.json and its eos ids in generation_config.json. `hf_generate` runs
transformers' own `generate` (its eos handling, its sampling under `torch.manual_seed`) and
`Expected` holds what the endpoint must then answer. `reply_tokens` reads a reply's tokens
back from its logprobs (each token's bytes and log probability).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from daemon.shards import model as m
from tests.daemon.serving.openai_helpers import LAYERS
from tests.daemon.serving.text_helpers import TEMPLATES, bpe_json_text

torch = pytest.importorskip("torch")

# per template: the token that ends an assistant turn (the tokenizer's eos_token)
TURN_END = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}
TOP = 5  # top_logprobs compared
LOGPROB_TOL = 1e-5  # our shard chain vs transformers (measured: all pass at 1e-6, not at 1e-7)


def bpe_tiny(root: Path, template: str = "chatml", *, seed: int = 11) -> Path:
    """A 6-layer tiny Llama with the trained byte-level BPE, `template`'s chat template, and
    eos ids [the template's turn end, <|end_of_text|>] in generation_config.json (and
    config.json), as a real chat checkpoint ships them."""
    import tokenizers

    text = bpe_json_text()
    bpe = tokenizers.Tokenizer.from_str(text)
    path = m.make_tiny(
        root, layers=LAYERS, vocab=bpe.get_vocab_size(with_added_tokens=True), seed=seed
    )
    (path / "tokenizer.json").write_text(text)
    bos = bpe.token_to_id("<|begin_of_text|>")
    eos = [bpe.token_to_id(TURN_END[template]), bpe.token_to_id("<|end_of_text|>")]
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": TURN_END[template],
        "pad_token": "<|end_of_text|>",
        "clean_up_tokenization_spaces": False,
        "chat_template": TEMPLATES[template],
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    generation = {"bos_token_id": bos, "eos_token_id": eos, "do_sample": False}
    (path / "generation_config.json").write_text(json.dumps(generation))
    model_config = json.loads((path / "config.json").read_text())
    model_config.update({"bos_token_id": bos, "eos_token_id": eos})
    (path / "config.json").write_text(json.dumps(model_config))
    return path


@dataclass
class Reference:
    """transformers' side of one checkpoint: its tokenizer and LlamaForCausalLM."""

    tokenizer: Any
    model: Any
    eos_ids: frozenset[int]

    @classmethod
    def load(cls, path: Path) -> Reference:
        transformers = pytest.importorskip("transformers")
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        model = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        eos = model.generation_config.eos_token_id
        eos_ids = frozenset(eos if isinstance(eos, list) else [eos])
        return cls(tokenizer, model, eos_ids)

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        ids = self.tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_dict=False
        )
        return list(ids)

    def generate(
        self,
        prompt: list[int],
        max_new: int | None,
        params: dict[str, Any] | None,
        seed: int | None = None,
        stop: list[str] | None = None,
    ) -> Expected:
        """`generate` with `params` (OpenAI names: temperature 0 is greedy), every warper
        stated so that no default of transformers' own applies, its eos ids from
        generation_config.json; sampled under `torch.manual_seed(seed)`. `params` None:
        nothing stated, generation_config.json's values (do_sample included) rule. `stop`:
        transformers' own stop_strings (it ends at the token that completes one). `max_new`
        None: generation_config.json's max_new_tokens."""
        kwargs: dict[str, Any] = {} if max_new is None else {"max_new_tokens": max_new}
        if stop:
            kwargs.update(stop_strings=stop, tokenizer=self.tokenizer)
        if params is not None:
            temperature = params.get("temperature", 1.0)
            kwargs["do_sample"] = temperature > 0
            kwargs["repetition_penalty"] = params.get("repetition_penalty", 1.0)
            if temperature > 0:
                kwargs.update(
                    temperature=temperature,
                    top_k=params.get("top_k", 0),
                    top_p=params.get("top_p", 1.0),
                    min_p=params.get("min_p"),
                )
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            out = self.model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                pad_token_id=min(self.eos_ids),
                output_logits=True,
                return_dict_in_generate=True,
                **kwargs,
            )
        ids = out.sequences[0, len(prompt) :].tolist()
        steps = [torch.log_softmax(step[0].float(), dim=-1) for step in out.logits]
        logprobs = [float(lp[token]) for lp, token in zip(steps, ids, strict=True)]
        top = []
        for lp in steps:
            values, indices = torch.topk(lp, TOP)
            top.append(list(zip(indices.tolist(), values.tolist(), strict=True)))
        return Expected(self, prompt, ids, logprobs, max_new, top)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token adds to decoded text: b"" for special tokens, else its
        byte-level symbols mapped back to bytes (GPT-2's table, built here), or the UTF-8 of
        an added token written in plain characters."""
        added = self.tokenizer.added_tokens_decoder.get(token_id)
        if token_id in self.tokenizer.all_special_ids or (added is not None and added.special):
            return b""
        token = self.tokenizer.convert_ids_to_tokens(token_id)
        table = _unicode_to_byte()
        if all(c in table for c in token):
            return bytes(table[c] for c in token)
        return token.encode("utf-8")


@dataclass
class Expected:
    """transformers' generation and what the endpoint must answer for it."""

    ref: Reference
    prompt: list[int]
    ids: list[int]  # generated, the eos included when it ended on one
    logprobs: list[float]  # the model's log probability of each generated id
    max_new: int | None
    top: list[list[tuple[int, float]]]  # the TOP most likely ids and logprobs at each step

    @property
    def ended_on_eos(self) -> bool:
        return bool(self.ids) and self.ids[-1] in self.ref.eos_ids

    @property
    def text(self) -> str:
        return self.ref.tokenizer.decode(self.ids, skip_special_tokens=True)

    @property
    def finish_reason(self) -> str:
        return "stop" if self.ended_on_eos else "length"

    def usage(self) -> dict[str, int]:
        n, k = len(self.prompt), len(self.ids)
        return {"prompt_tokens": n, "completion_tokens": k, "total_tokens": n + k}

    def before_stop(self, stops: list[str]) -> str:
        """The text before the first of `stops` (the reply to a request with them)."""
        text = self.text
        return text[: min(text.index(s) for s in stops if s in text)]

    def check_tokens(self, tokens: list[tuple[bytes, float]], *, legacy: bool = False) -> None:
        """A reply's (bytes, logprob) per token are this generation's ids, a final eos
        included (its bytes are b""): same count, same bytes, and the same log probability
        under the model (LOGPROB_TOL). `legacy`: the completions format, whose tokens are
        text (a split character reads as U+FFFD)."""
        pairs = zip(self.ids, self.logprobs, strict=True)
        want = [(self.ref.token_bytes(i), lp) for i, lp in pairs]
        if legacy:
            want = lossy(want)
        assert len(tokens) == len(want), (len(tokens), len(want))
        for at, ((data, got), (expected, lp)) in enumerate(zip(tokens, want, strict=True)):
            assert data == expected, (at, data, expected)
            assert math.isclose(got, lp, abs_tol=LOGPROB_TOL), (at, got, lp)

    def check_top(self, choice: dict[str, Any]) -> None:
        """A chat choice's top_logprobs (TOP asked) are transformers' most likely tokens at
        each step: the same bytes in the same order, the same logprobs (LOGPROB_TOL)."""
        content = choice["logprobs"]["content"]
        assert len(content) == len(self.top)
        for at, (entry, want) in enumerate(zip(content, self.top, strict=True)):
            got = [(bytes(t["bytes"]), t["logprob"]) for t in entry["top_logprobs"]]
            assert [b for b, _ in got] == [self.ref.token_bytes(i) for i, _ in want], at
            for (_, lp), (_, expected) in zip(got, want, strict=True):
                assert math.isclose(lp, expected, abs_tol=LOGPROB_TOL), (at, lp, expected)


def chat_tokens(choice: dict[str, Any]) -> list[tuple[bytes, float]]:
    """(bytes, logprob) of each token of a chat choice's logprobs."""
    return [(bytes(t["bytes"]), t["logprob"]) for t in choice["logprobs"]["content"]]


def completion_tokens(choice: dict[str, Any]) -> list[tuple[bytes, float]]:
    """(bytes, logprob) of each token of a completion choice's logprobs: the legacy format
    has text only, so a token's bytes are its text's UTF-8 (exact but for split
    characters, which read as U+FFFD; compared the same way)."""
    logprobs = choice["logprobs"]
    return [
        (t.encode("utf-8"), lp)
        for t, lp in zip(logprobs["tokens"], logprobs["token_logprobs"], strict=True)
    ]


def lossy(tokens: list[tuple[bytes, float]]) -> list[tuple[bytes, float]]:
    """Tokens' bytes as the legacy completion logprobs write them (split chars: U+FFFD)."""
    return [(b.decode("utf-8", errors="replace").encode("utf-8"), lp) for b, lp in tokens]


def _unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level table, inverted: the printable character that stands for each
    byte in a byte-level BPE's vocabulary."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {chr(b): b for b in printable}
    extra = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + extra)] = b
            extra += 1
    return table
