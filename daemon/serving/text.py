"""Text in, text out: one checkpoint's tokenizer, chat template, eos ids and default
sampling values (`ModelText`), streamed detokenization (`IncrementalDecoder`) and OpenAI
`stop` strings (`StopStrings`).

Decoded text skips special tokens (as `tokenizer.decode(ids, skip_special_tokens=True)`), so
an eos or a chat template's markers never reach a reply; added tokens that are not special
are text and are kept.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from daemon.serving.chat_template import MAX_TEMPLATE_CHARS, ChatTemplate
from daemon.shards.model.config import CONFIG_FILE, GENERATION_FILE, ModelError
from daemon.shards.model.tokenizer import (
    MAX_CONFIG_BYTES,
    Tokenizer,
    load_tokenizer,
    read_bounded,
    read_json,
)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"  # transformers' own file; it wins over the config's
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"  # legacy: read as transformers reads it
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
MAX_STOPS = 16
MAX_STOP_CHARS = 1024
# window decoding: a run of byte-fallback pieces is held (decoded whole) up to this many ids,
# and ids whose text still ends in U+FFFD are emitted anyway past MAX_PENDING_TOKENS
MAX_BYTE_RUN = 16
MAX_PENDING_TOKENS = 64


@dataclass(frozen=True)
class GenerationDefaults:
    """Default sampling values from `generation_config.json`; None where it says nothing."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    do_sample: bool | None = None
    max_new_tokens: int | None = None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> GenerationDefaults:
        """Validate the fields of a parsed `generation_config.json` (ModelError naming one)."""

        def number(key: str, low: float, high: float, *, integer: bool = False) -> Any:
            value = raw.get(key)
            if value is None:
                return None
            kinds = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kinds) or not low <= value <= high:
                kind = "an integer" if integer else "a number"
                raise ModelError(
                    f"{GENERATION_FILE}: {key} must be {kind} in [{low}, {high}], got {value!r}"
                )
            return value if integer else float(value)

        do_sample = raw.get("do_sample")
        if do_sample is not None and not isinstance(do_sample, bool):
            raise ModelError(f"{GENERATION_FILE}: do_sample must be a boolean, got {do_sample!r}")
        return cls(
            temperature=number("temperature", 0.0, 100.0),
            top_p=number("top_p", 0.0, 1.0),
            top_k=number("top_k", 0, 1 << 31, integer=True),
            min_p=number("min_p", 0.0, 1.0),
            repetition_penalty=number("repetition_penalty", 1e-6, 100.0),
            do_sample=do_sample,
            max_new_tokens=number("max_new_tokens", 1, 1 << 31, integer=True),
        )


def _token_text(value: Any, key: str) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, Mapping):
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise ModelError(f"{TOKENIZER_CONFIG_FILE}: {key} must be a string, got {value!r}")
    return value


def _chat_template_source(model_dir: Path, config: Mapping[str, Any]) -> tuple[str | None, str]:
    """(the template, why there is none) from chat_template.jinja or tokenizer_config.json;
    a list of named templates gives the one named "default", as transformers picks it."""
    jinja_file = model_dir / CHAT_TEMPLATE_FILE
    if jinja_file.exists():
        return read_bounded(jinja_file, 4 * MAX_TEMPLATE_CHARS), ""
    raw = config.get("chat_template")
    if raw is None:
        return None, f"{model_dir}: the checkpoint has no chat template"
    if isinstance(raw, str):
        return raw, ""
    named: dict[str, Any] = {}
    if isinstance(raw, list):
        for entry in raw:
            if not isinstance(entry, Mapping) or not isinstance(entry.get("name"), str):
                raise ModelError(
                    f"{TOKENIZER_CONFIG_FILE}: chat_template list entries need a 'name' and "
                    f"a 'template'"
                )
            named[entry["name"]] = entry.get("template")
    elif isinstance(raw, Mapping):
        named = dict(raw)
    else:
        raise ModelError(f"{TOKENIZER_CONFIG_FILE}: chat_template must be a string or a list")
    if "default" not in named:
        return None, (
            f"{model_dir}: the checkpoint has several chat templates and none named 'default' "
            f"(it has {sorted(named)[:8]})"
        )
    return named["default"], ""


class ModelText:
    """One checkpoint's text side; load once and share (it holds no per-request state)."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        context_length: int,
        chat_template: str | None = None,
        no_template_reason: str = "the checkpoint has no chat template",
        special_tokens: Mapping[str, str] | None = None,
        eos_ids: Sequence[int] = (),
        defaults: GenerationDefaults | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.special_tokens: dict[str, str] = dict(special_tokens or {})
        self.bos_token: str | None = self.special_tokens.get("bos_token")
        self.eos_token: str | None = self.special_tokens.get("eos_token")
        self.eos_ids: frozenset[int] = frozenset(eos_ids)
        self.defaults = defaults or GenerationDefaults()
        self._no_template = no_template_reason
        self._template = None if chat_template is None else ChatTemplate(chat_template)

    @classmethod
    def load(cls, model_dir: str | os.PathLike[str]) -> ModelText:
        """Read `tokenizer.json`, `tokenizer_config.json`, `chat_template.jinja`,
        `special_tokens_map.json`, `generation_config.json` (all optional) and `config.json`;
        every problem, an oversized file included, is a `ModelError` naming the file."""
        model_dir = Path(model_dir)
        tokenizer = load_tokenizer(model_dir)
        config_file = model_dir / TOKENIZER_CONFIG_FILE
        config = read_json(config_file, MAX_CONFIG_BYTES) if config_file.exists() else {}
        if not isinstance(config, Mapping):
            raise ModelError(f"{config_file}: expected a JSON object")
        template, reason = _chat_template_source(model_dir, config)
        names = dict(config)
        legacy = model_dir / SPECIAL_TOKENS_MAP_FILE
        if "added_tokens_decoder" not in config and legacy.exists():
            # transformers reads special_tokens_map.json only for configs without
            # added_tokens_decoder, and then its values win
            extra = read_json(legacy, MAX_CONFIG_BYTES)
            if not isinstance(extra, Mapping):
                raise ModelError(f"{legacy}: expected a JSON object")
            names.update({k: v for k, v in extra.items() if k in SPECIAL_TOKEN_NAMES})
        special = {}
        for key in SPECIAL_TOKEN_NAMES:
            text = _token_text(names.get(key), key)
            if text is not None:
                special[key] = text
        generation_file = model_dir / GENERATION_FILE
        generation = read_json(generation_file) if generation_file.exists() else {}
        if not isinstance(generation, Mapping):
            raise ModelError(f"{generation_file}: expected a JSON object")
        model_config = read_json(model_dir / CONFIG_FILE)
        if not isinstance(model_config, Mapping):
            raise ModelError(f"{model_dir / CONFIG_FILE}: expected a JSON object")
        context = model_config.get("max_position_embeddings")
        if isinstance(context, bool) or not isinstance(context, int) or context < 1:
            raise ModelError(
                f"{model_dir / CONFIG_FILE}: max_position_embeddings must be a positive "
                f"integer, got {context!r}"
            )
        eos_ids = set(tokenizer.eos_ids)
        if "eos_token" in special:
            eos_id = tokenizer.token_to_id(special["eos_token"])
            if eos_id is not None:
                eos_ids.add(eos_id)
        return cls(
            tokenizer=tokenizer,
            context_length=context,
            chat_template=template,
            no_template_reason=reason,
            special_tokens=special,
            eos_ids=sorted(eos_ids),
            defaults=GenerationDefaults.from_dict(generation),
        )

    @property
    def has_chat_template(self) -> bool:
        return self._template is not None

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a prompt; `add_special_tokens` adds what the tokenizer's post-processor
        names (Llama's BOS), as `tokenizer(text)` does."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens skipped."""
        return self.tokenizer.decode(ids)

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> str:
        """The chat template rendered as transformers' `apply_chat_template(tokenize=False)`
        renders it: variables `messages`, `add_generation_prompt`, the special tokens
        (`bos_token`, `eos_token`...), `tools=None`, `documents=None`, and
        `template_kwargs` (vLLM's chat_template_kwargs) over them. A `ModelError` for a
        checkpoint without a template, bad messages, or a template that fails or refuses."""
        if self._template is None:
            raise ModelError(self._no_template)
        variables = {**self.special_tokens, **(template_kwargs or {})}
        return self._template.render(
            messages, add_generation_prompt=add_generation_prompt, variables=variables
        )

    def chat_ids(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        template_kwargs: Mapping[str, Any] | None = None,
    ) -> list[int]:
        """The rendered chat encoded without adding special tokens again (the template writes
        them), as `apply_chat_template(tokenize=True)` does."""
        text = self.render_chat(
            messages, add_generation_prompt=add_generation_prompt, template_kwargs=template_kwargs
        )
        return self.encode(text, add_special_tokens=False)

    def decoder(self) -> IncrementalDecoder:
        """A fresh streaming decoder for one generated sequence."""
        return IncrementalDecoder(self.tokenizer)


class IncrementalDecoder:
    """Streaming detokenization: `push` returns only text that is final, never half a UTF-8
    character or a byte-level piece whose character is still incomplete; the pushes and the
    `flush` put together equal `tokenizer.decode(all ids)`.

    Byte-level tokenizers (ours, and `tokenizer.json` files whose decoder is ByteLevel) go
    through a UTF-8 incremental decoder over each token's bytes: exact, O(1) per token. Other
    decoders (SentencePiece-style Metaspace, ByteFallback) decode a window of ids (the
    prefix/read offsets of text-generation-inference) and emit when the text does not end in
    U+FFFD; a run of byte-fallback pieces is held until it ends (ByteFallback decodes a run as
    a whole), up to MAX_BYTE_RUN ids. The window is at most MAX_PENDING_TOKENS + a few ids,
    after which what is held is emitted as it decodes: only a stream of invalid bytes gets
    there, and only then (or with a run of over MAX_BYTE_RUN pieces that is not UTF-8) may
    the stream differ from decode() in which bytes became U+FFFD.
    """

    def __init__(self, tokenizer: Tokenizer, *, byte_exact: bool | None = None) -> None:
        self._tokenizer = tokenizer
        self._bytes = tokenizer.decodes_bytes if byte_exact is None else byte_exact
        if self._bytes and not tokenizer.decodes_bytes:
            raise ValueError("this tokenizer does not decode byte by byte")
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._ids: list[int] = []  # window mode: ids from the prefix offset on
        self._read = 0  # window mode: ids before this index of _ids are emitted

    def push(self, token_id: int) -> str:
        """The new text that is now safe to emit ("" while a character is incomplete)."""
        if self._bytes:
            return self._utf8.decode(self._tokenizer.token_bytes(token_id))
        self._ids.append(token_id)
        pending = len(self._ids) - self._read
        tokenizer = self._tokenizer
        if pending <= MAX_BYTE_RUN and (
            token_id in tokenizer.byte_fallback_ids or tokenizer.is_silent(token_id)
        ):
            # ByteFallback decodes a run of <0xNN> pieces together (all U+FFFD when it is
            # not UTF-8; skipped specials do not end a run), so what a run says is known only
            # once it ends; a silent id has nothing to say
            return ""
        decode = self._tokenizer.decode
        prefix = decode(self._ids[: self._read]) if self._read else ""
        text = decode(self._ids)
        if pending > MAX_PENDING_TOKENS or (
            len(text) > len(prefix) and not text.endswith("\ufffd")
        ):
            # the last emitted token stays as the prefix: decoders that strip a leading
            # space (Metaspace) then see the same context again
            self._ids = self._ids[self._read :]
            self._read = len(self._ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """What is left at the end of the sequence (an incomplete character as U+FFFD)."""
        if self._bytes:
            return self._utf8.decode(b"", final=True)
        decode = self._tokenizer.decode
        prefix = decode(self._ids[: self._read]) if self._read else ""
        text = decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(prefix) :]


class StopStrings:
    """OpenAI's `stop`: text is emitted up to the first occurrence of any stop string, which
    is never emitted itself; a tail that could still become a stop is held back."""

    def __init__(self, stops: Sequence[str]) -> None:
        if isinstance(stops, str):
            stops = [stops]
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop strings, got {len(stops)}")
        for stop in stops:
            if not isinstance(stop, str) or len(stop) > MAX_STOP_CHARS:
                raise ValueError(f"a stop must be a string of at most {MAX_STOP_CHARS} characters")
        self.stops: tuple[str, ...] = tuple(dict.fromkeys(s for s in stops if s))
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> tuple[str, bool]:
        """(text to emit now, whether a stop string was reached)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        found = [i for i in (buffer.find(s) for s in self.stops) if i >= 0]
        if found:
            self._held = ""
            self.stopped = True
            return buffer[: min(found)], True
        keep = self._held_back(buffer)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def _held_back(self, buffer: str) -> int:
        """The length of the longest tail of `buffer` that begins some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The held-back tail at the end of the stream (it never became a stop)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held
