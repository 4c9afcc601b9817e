"""A Llama `config.json`: parsing and validation, dtypes, tensor names and sizes.

`ModelError` is the error of the whole model package: a checkpoint, config or request that
it cannot serve, with the reason.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
GENERATION_FILE = "generation_config.json"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
ROPE_TYPES = ("default", "linear", "llama3")


class ModelError(ValueError):
    """A checkpoint, config or request that this package cannot serve, with the reason."""


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name ("float32", "float16", "bfloat16") of a supported dtype."""
    if isinstance(dtype, torch.dtype):
        for name, value in DTYPES.items():
            if value == dtype:
                return name
        raise ModelError(f"unsupported dtype {dtype}; use one of {', '.join(DTYPES)}")
    if dtype not in DTYPES:
        raise ModelError(f"unsupported dtype {dtype!r}; use one of {', '.join(DTYPES)}")
    return dtype


def to_dtype(dtype: str | torch.dtype) -> torch.dtype:
    return DTYPES[dtype_name(dtype)]


def _int(raw: Mapping[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = raw.get(key, default)
    if value is None:
        raise ModelError(f"config.json: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(raw: Mapping[str, Any], key: str, default: float) -> float:
    value = raw.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise ModelError(f"config.json: {key} must be a positive number, got {value!r}")
    return float(value)


def _rope_scaling(raw: Mapping[str, Any], max_positions: int) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from either the transformers 4 layout (`rope_theta` and
    `rope_scaling`) or the transformers 5 one (`rope_parameters` with `rope_theta` inside)."""
    params = raw.get("rope_scaling")
    if params is None:
        params = raw.get("rope_parameters")
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ModelError(f"config.json: rope_scaling must be an object or null, got {params!r}")
    theta_raw = dict(raw)
    if "rope_theta" not in raw or raw["rope_theta"] is None:
        theta_raw["rope_theta"] = params.get("rope_theta", 10000.0)
    theta = _float(theta_raw, "rope_theta", 10000.0)
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ModelError(
            f"config.json: unsupported rope type {rope_type!r}; supported: {', '.join(ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    where = f"rope_scaling ({rope_type})"
    scaling: dict[str, Any] = {"rope_type": rope_type}
    scaling["factor"] = _float(_required(params, "factor", where), "factor", 1.0)
    if rope_type == "llama3":
        for key in ("low_freq_factor", "high_freq_factor"):
            scaling[key] = _float(_required(params, key, where), key, 1.0)
        if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
            raise ModelError(f"config.json: {where} needs high_freq_factor > low_freq_factor")
        original = params.get("original_max_position_embeddings", max_positions)
        scaling["original_max_position_embeddings"] = _int(
            {"original_max_position_embeddings": original}, "original_max_position_embeddings"
        )
    return theta, scaling


def _required(params: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    if params.get(key) is None:
        raise ModelError(f"config.json: {where} is missing {key!r}")
    return params


@dataclass(frozen=True)
class LlamaConfig:
    """The fields of a Hugging Face Llama `config.json` that the computation depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    rope_scaling: dict | None = field(default=None, hash=False)
    head_dim: int = 0  # 0: hidden_size // num_attention_heads

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ModelError(
                    f"config.json: hidden_size {self.hidden_size} is not a multiple of "
                    f"num_attention_heads {self.num_attention_heads}"
                )
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.head_dim % 2:
            raise ModelError(f"config.json: head_dim must be even for rotary, got {self.head_dim}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ModelError(
                f"config.json: num_attention_heads {self.num_attention_heads} is not a multiple "
                f"of num_key_value_heads {self.num_key_value_heads}"
            )

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LlamaConfig:
        """Validate a parsed `config.json`; every problem is a `ModelError` naming the field."""
        if not isinstance(raw, Mapping):
            raise ModelError("config.json: expected a JSON object")
        model_type = raw.get("model_type")
        architectures = raw.get("architectures") or []
        if model_type is None and "LlamaForCausalLM" not in architectures:
            raise ModelError("config.json: missing field 'model_type' (expected 'llama')")
        if model_type is not None and model_type != "llama":
            raise ModelError(f"config.json: unsupported model_type {model_type!r}, need 'llama'")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelError(f"config.json: unsupported hidden_act {raw['hidden_act']!r}")
        for key in ("attention_bias", "mlp_bias"):
            if raw.get(key):
                raise ModelError(f"config.json: {key}=true is not supported")
        heads = _int(raw, "num_attention_heads")
        max_positions = _int(raw, "max_position_embeddings", 2048)
        theta, scaling = _rope_scaling(raw, max_positions)
        tie = raw.get("tie_word_embeddings", False)
        if not isinstance(tie, bool):
            raise ModelError(f"config.json: tie_word_embeddings must be a boolean, got {tie!r}")
        head_dim = raw.get("head_dim")
        return cls(
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=_int(raw, "hidden_size"),
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=_int(raw, "num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads", heads),
            rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=tie,
            rope_scaling=scaling,
            head_dim=0 if head_dim is None else _int(raw, "head_dim"),
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> LlamaConfig:
        """Read `config.json` from a checkpoint directory."""
        file = Path(path) / CONFIG_FILE
        try:
            raw = json.loads(file.read_text())
        except FileNotFoundError:
            raise ModelError(f"{file}: not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelError(f"{file}: cannot read: {exc}") from None
        return cls.from_dict(raw)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict in the Hugging Face `config.json` layout (`from_dict` reads it)."""
        out = asdict(self)
        out["rope_scaling"] = dict(self.rope_scaling) if self.rope_scaling else None
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            **out,
        }

    # Sizes, for the shard planner -------------------------------------------------------

    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of one decoder layer's tensors, by name relative to `model.layers.{i}.`."""
        h, d = self.hidden_size, self.head_dim
        q, kv, inter = (
            self.num_attention_heads * d,
            self.num_key_value_heads * d,
            self.intermediate_size,
        )
        return {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate_proj.weight": (inter, h),
            "mlp.up_proj.weight": (inter, h),
            "mlp.down_proj.weight": (h, inter),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the whole checkpoint, by its Hugging Face name, in file order."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size)
        }
        for i in range(self.num_hidden_layers):
            for name, shape in self.layer_shapes().items():
                shapes[f"model.layers.{i}.{name}"] = shape
        shapes["model.norm.weight"] = (self.hidden_size,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def layer_params(self) -> int:
        return sum(math.prod(shape) for shape in self.layer_shapes().values())

    def num_parameters(self) -> int:
        """Parameters of the whole model (a tied head counted once)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())

    def layer_bytes(self, dtype: str | torch.dtype = "float32") -> int:
        """Parameter bytes of one decoder layer."""
        return self.layer_params() * DTYPE_BYTES[dtype_name(dtype)]

    def embed_bytes(self, dtype: str | torch.dtype = "float32") -> int:
        """Bytes of the token embedding (held by the shard that starts at layer 0)."""
        return self.vocab_size * self.hidden_size * DTYPE_BYTES[dtype_name(dtype)]

    def head_bytes(self, dtype: str | torch.dtype = "float32") -> int:
        """Bytes of the final norm and LM head (held by the shard that ends at the last layer).

        With tied embeddings the head is the embedding matrix; a last shard that does not own
        the embedding still loads a copy of it, so it is counted here too.
        """
        return (self.hidden_size + self.vocab_size * self.hidden_size) * DTYPE_BYTES[
            dtype_name(dtype)
        ]

    def shard_bytes(self, start: int, end: int, dtype: str | torch.dtype = "float32") -> int:
        """Parameter bytes that `load_shard(start, end)` holds (a tied head shared once)."""
        self.check_range(start, end)
        total = (end - start) * self.layer_bytes(dtype)
        if start == 0:
            total += self.embed_bytes(dtype)
        if end == self.num_hidden_layers:
            total += self.head_bytes(dtype)
            if start == 0 and self.tie_word_embeddings:
                total -= self.embed_bytes(dtype)
        return total

    def check_range(self, start: int, end: int) -> None:
        if not (0 <= start < end <= self.num_hidden_layers):
            raise ModelError(
                f"layer range [{start}, {end}) is not inside [0, {self.num_hidden_layers})"
            )


def shard_tensor_names(config: LlamaConfig, start: int, end: int) -> list[str]:
    """The checkpoint tensors that the shard `[start, end)` reads, in file order."""
    config.check_range(start, end)
    names = []
    if start == 0:
        names.append("model.embed_tokens.weight")
    for i in range(start, end):
        names.extend(f"model.layers.{i}.{name}" for name in config.layer_shapes())
    if end == config.num_hidden_layers:
        names.append("model.norm.weight")
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        if head not in names:
            names.append(head)
    return names


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ModelError(f"tensor {name!r} has shape {list(got)}, config says {list(want)}")
