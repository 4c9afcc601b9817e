"""Tokenizers of checkpoints: the byte-level one of tiny checkpoints in pure Python, any
other `tokenizer.json` through the `tokenizers` library."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from daemon.shards.model.config import CONFIG_FILE, GENERATION_FILE, TOKENIZER_FILE, ModelError

# Byte-level vocabulary of the tiny checkpoints: ids 0..255 are bytes, then two specials.
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257
BYTE_BOS = "<|begin_of_text|>"
BYTE_EOS = "<|end_of_text|>"

# Bounds on what a checkpoint directory may make us read (real ones: tokenizer.json 2-35 MB).
MAX_TOKENIZER_BYTES = 64 << 20
MAX_CONFIG_BYTES = 4 << 20


def read_bounded(file: Path, limit: int) -> str:
    """The text of a checkpoint file, refused with a `ModelError` when over `limit` bytes (a
    stat first, then a read of at most limit + 1 bytes: the file may grow in between)."""
    try:
        size = file.stat().st_size
        if size <= limit:
            with file.open("rb") as handle:
                data = handle.read(limit + 1)
            size = len(data)
    except FileNotFoundError:
        raise ModelError(f"{file}: not found") from None
    except OSError as exc:
        raise ModelError(f"{file}: cannot read: {exc}") from None
    if size > limit:
        raise ModelError(f"{file}: {size} bytes, over the limit of {limit}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ModelError(f"{file}: not UTF-8: {exc}") from None


def read_json(file: Path, limit: int = MAX_CONFIG_BYTES) -> Any:
    """A bounded JSON file of a checkpoint; every problem is a `ModelError` naming the file."""
    try:
        return json.loads(read_bounded(file, limit))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{file}: not valid JSON: {exc}") from None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-ins for bytes, as used by byte-level `tokenizer.json` files."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def byte_tokenizer_json() -> dict[str, Any]:
    """A real `tokenizers` file for the byte vocabulary: a BPE with no merges over the 256
    byte symbols (id = byte value), plus BOS/EOS. The `tokenizers` library reads it too."""
    special = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    byte_level = {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": False,
        "use_regex": False,
    }
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab[BYTE_BOS] = BYTE_BOS_ID
    vocab[BYTE_EOS] = BYTE_EOS_ID
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": BYTE_BOS_ID, "content": BYTE_BOS, **special, "special": True},
            {"id": BYTE_EOS_ID, "content": BYTE_EOS, **special, "special": True},
        ],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": dict(sorted(vocab.items(), key=lambda item: item[1])),
            "merges": [],
        },
    }


def _is_byte_tokenizer(spec: Mapping[str, Any]) -> bool:
    model = spec.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or model.get("merges"):
        return False
    vocab = model.get("vocab")
    added_tokens = spec.get("added_tokens") or []
    if not isinstance(vocab, dict) or not isinstance(added_tokens, list):
        return False
    mapping = _bytes_to_unicode()
    if any(vocab.get(char) != byte for byte, char in mapping.items()):
        return False
    added = {
        t.get("id") for t in added_tokens if isinstance(t, dict) and isinstance(t.get("id"), int)
    }
    return all(i in added for i in vocab.values() if isinstance(i, int) and i >= 256)


class Tokenizer:
    """Text to token ids and back.

    Byte-level tokenizers (ours) run in pure Python; other `tokenizer.json` files go through
    the `tokenizers` library, imported only then. `encode` adds the special tokens the
    checkpoint's `tokenizer.json` post-processor names (e.g. Llama's BOS), as Hugging Face's
    tokenizers do by default; `add_special_tokens=False` leaves them out. Added tokens written
    in the text (a chat template's `<|begin_of_text|>`) become their ids on both paths.
    """

    def __init__(
        self,
        *,
        bos_id: int | None,
        eos_id: int | None,
        backend: Any | None = None,
        eos_ids: Sequence[int] = (),
        prefix: Sequence[int] = (),
        suffix: Sequence[int] = (),
        added: Mapping[str, int] | None = None,
        special_ids: Sequence[int] = (),
        byte_decoder: bool = False,
        byte_fallback_ids: Sequence[int] = (),
    ) -> None:
        self.bos_id = bos_id
        # every id that ends a generation (generation_config.json may list several)
        self.eos_ids: tuple[int, ...] = tuple(eos_ids) or (() if eos_id is None else (eos_id,))
        # as Hugging Face's eos_token_id: one id, or all of them when there are several (what
        # `generate(eos_id=...)` takes)
        self.eos_id: int | tuple[int, ...] | None = (
            self.eos_ids if len(self.eos_ids) > 1 else eos_id
        )
        self._backend = backend  # a tokenizers.Tokenizer, or None for bytes
        self._prefix, self._suffix = list(prefix), list(suffix)  # byte level: the template
        # byte level: added tokens by content, matched leftmost-longest as the library does
        self._added = {k: v for k, v in (added or {}).items() if k}
        self._added_re = (
            re.compile("|".join(re.escape(k) for k in sorted(self._added, key=len, reverse=True)))
            if self._added
            else None
        )
        self.special_ids: frozenset[int] = frozenset(special_ids)
        # the decoder is ByteLevel: a text is the UTF-8 of its tokens' bytes put together
        self._byte_decoder = backend is None or byte_decoder
        # SentencePiece byte fallback: the <0xNN> pieces, decoded together run by run
        self.byte_fallback_ids: frozenset[int] = frozenset(byte_fallback_ids)
        self._bytes_cache: dict[int, bytes] = {}

    @property
    def is_byte_level(self) -> bool:
        return self._backend is None

    @property
    def decodes_bytes(self) -> bool:
        """Whether `token_bytes` is exact: decode(ids) is the lossy UTF-8 of their bytes."""
        return self._byte_decoder

    def encode(
        self, text: str, *, add_special_tokens: bool = True, add_bos: bool = False
    ) -> list[int]:
        """Token ids of `text`, with the checkpoint's special tokens around it (BOS for Llama)
        unless `add_special_tokens` is False; `add_bos` adds BOS when the template has none."""
        if self._backend is None:
            ids = self._encode_bytes(text)
            if add_special_tokens:
                ids = [*self._prefix, *ids, *self._suffix]
        else:
            ids = list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def _encode_bytes(self, text: str) -> list[int]:
        if self._added_re is None:
            return list(text.encode("utf-8"))
        ids: list[int] = []
        at = 0
        for match in self._added_re.finditer(text):
            ids.extend(text[at : match.start()].encode("utf-8"))
            ids.append(self._added[match.group()])
            at = match.end()
        ids.extend(text[at:].encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Special and out-of-vocabulary ids are skipped; broken UTF-8 becomes U+FFFD."""
        if self._backend is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self._backend.decode(list(ids), skip_special_tokens=True)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one id adds to a decoded text (b"" for special and unknown ids); only
        meaningful when `decodes_bytes`."""
        cached = self._bytes_cache.get(token_id)
        if cached is not None:
            return cached
        if self._backend is None:
            out = bytes((token_id,)) if 0 <= token_id < 256 else b""
        elif token_id in self.special_ids or token_id < 0:
            out = b""
        else:
            token = self._backend.id_to_token(token_id)
            out = b"" if token is None else _byte_level_bytes(token)
        if len(self._bytes_cache) < 1 << 20:
            self._bytes_cache[token_id] = out
        return out

    def is_silent(self, token_id: int) -> bool:
        """Whether decode skips this id: special, or not in the vocabulary."""
        if token_id in self.special_ids or token_id < 0:
            return True
        if self._backend is None:
            return token_id >= 256
        return self._backend.id_to_token(token_id) is None

    def token_to_id(self, token: str) -> int | None:
        """The id of a token written as text (e.g. an eos token named by tokenizer_config)."""
        if self._backend is None:
            return self._added.get(token)
        return self._backend.token_to_id(token)


_CHAR_BYTES: dict[str, int] = {}


def _byte_level_bytes(token: str) -> bytes:
    """As the ByteLevel decoder reads a token: each stand-in char is its byte; a token with
    any other char (an added token such as "中文") is its own UTF-8."""
    if not _CHAR_BYTES:
        _CHAR_BYTES.update({char: byte for byte, char in _bytes_to_unicode().items()})
    try:
        return bytes(_CHAR_BYTES[c] for c in token)
    except KeyError:
        return token.encode("utf-8")


def _byte_fallback_ids(spec: Any, backend: Any) -> list[int]:
    """The ids of the `<0xNN>` pieces of a model with `byte_fallback` (Llama 2, Mistral)."""
    model = spec.get("model") if isinstance(spec, dict) else None
    if not isinstance(model, dict) or model.get("byte_fallback") is not True:
        return []
    ids = (backend.token_to_id(f"<0x{byte:02X}>") for byte in range(256))
    return [i for i in ids if i is not None]


def _is_byte_level_decoder(spec: Any) -> bool:
    """A `tokenizer.json` whose decoder is ByteLevel (alone or a Sequence of only that)."""
    decoder = spec.get("decoder") if isinstance(spec, dict) else None
    if not isinstance(decoder, dict):
        return False
    parts = decoder.get("decoders") if decoder.get("type") == "Sequence" else [decoder]
    return (
        isinstance(parts, list)
        and bool(parts)
        and all(isinstance(p, dict) and p.get("type") == "ByteLevel" for p in parts)
    )


def _token_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _token_ids(value: Any) -> list[int]:
    """`eos_token_id` as config files write it: one id or a list of ids."""
    values = value if isinstance(value, list) else [value]
    return [v for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _template(spec: Any) -> tuple[list[int], list[int]]:
    """The special token ids a `tokenizer.json` post-processor puts before and after a single
    sequence (TemplateProcessing, alone or inside a Sequence); ([], []) for anything else."""
    post = spec.get("post_processor") if isinstance(spec, dict) else None
    if not isinstance(post, dict):
        return [], []
    procs = post.get("processors") if post.get("type") == "Sequence" else [post]
    for proc in procs if isinstance(procs, list) else []:
        if not isinstance(proc, dict) or proc.get("type") != "TemplateProcessing":
            continue
        special = proc.get("special_tokens")
        special = special if isinstance(special, dict) else {}
        single = proc.get("single")
        before: list[int] = []
        after: list[int] = []
        seen_text = False
        for item in single if isinstance(single, list) else []:
            if not isinstance(item, dict):
                continue
            if "Sequence" in item:
                seen_text = True
                continue
            token = item.get("SpecialToken")
            name = token.get("id") if isinstance(token, dict) else None
            entry = special.get(name) if isinstance(name, str) else None
            ids = _token_ids(entry.get("ids")) if isinstance(entry, dict) else []
            (after if seen_text else before).extend(ids)
        return before, after
    return [], []


def load_tokenizer(model_dir: str | os.PathLike[str]) -> Tokenizer:
    """The tokenizer of a checkpoint directory, from its `tokenizer.json` (at most
    `MAX_TOKENIZER_BYTES`)."""
    model_dir = Path(model_dir)
    file = model_dir / TOKENIZER_FILE
    text = read_bounded(file, MAX_TOKENIZER_BYTES)
    try:
        spec = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ModelError(f"{file}: cannot read: {exc}") from None
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None}
    eos_ids: list[int] = []
    for name in (CONFIG_FILE, GENERATION_FILE):  # generation_config.json wins
        try:
            extra = read_json(model_dir / name)
        except ModelError:
            continue
        for key in ids:
            if isinstance(extra, dict) and _token_id(extra.get(key)) is not None:
                ids[key] = _token_id(extra.get(key))
                if key == "eos_token_id":
                    eos_ids = _token_ids(extra.get(key))
    if isinstance(spec, dict) and _is_byte_tokenizer(spec):
        added_tokens = [
            t
            for t in spec.get("added_tokens") or []
            if isinstance(t, dict) and isinstance(t.get("content"), str)
        ]
        by_content = {t["content"]: t.get("id") for t in added_tokens}
        bos = ids["bos_token_id"] if ids["bos_token_id"] is not None else by_content.get(BYTE_BOS)
        eos = ids["eos_token_id"] if ids["eos_token_id"] is not None else by_content.get(BYTE_EOS)
        prefix, suffix = _template(spec)
        added = {
            k: v
            for k, v in by_content.items()
            if isinstance(v, int) and not isinstance(v, bool) and v >= 256
        }
        return Tokenizer(
            bos_id=bos,
            eos_id=eos,
            eos_ids=eos_ids,
            prefix=prefix,
            suffix=suffix,
            added=added,
            special_ids=list(added.values()),
        )
    try:
        import tokenizers
    except ImportError:
        raise ModelError(f"{file}: needs the 'tokenizers' package") from None
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:
        raise ModelError(f"{file}: invalid tokenizer: {exc}") from None
    special = [i for i, t in backend.get_added_tokens_decoder().items() if t.special]
    return Tokenizer(
        bos_id=ids["bos_token_id"],
        eos_id=ids["eos_token_id"],
        eos_ids=eos_ids,
        backend=backend,
        special_ids=special,
        byte_decoder=_is_byte_level_decoder(spec),
        byte_fallback_ids=_byte_fallback_ids(spec, backend),
    )
