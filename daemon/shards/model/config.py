"""A model's `config.json` (any family of `families`): parsing and validation, dtypes,
tensor names and sizes.

`ModelError` is the error of the whole model package: a checkpoint, config or request that
it cannot serve, with the reason.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from daemon.shards.model.families import (
    ALWAYS,
    ARCHITECTURES,
    FAMILIES,
    FROM_CONFIG,
    MODEL_TYPES,
    Family,
)

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
FULL, SLIDING = "full_attention", "sliding_attention"


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


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = raw.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise ModelError(f"config.json: {key} must be a boolean, got {value!r}")
    return value


def _switch(rule: str, attention_bias: bool) -> bool:
    """A family's bias rule (families.NEVER / ALWAYS / FROM_CONFIG) applied."""
    return rule == ALWAYS or (rule == FROM_CONFIG and attention_bias)


def _family_of(raw: Mapping[str, Any]) -> Family:
    model_type = raw.get("model_type")
    if model_type is None:
        architectures = raw.get("architectures") or []
        if isinstance(architectures, list):
            for name in architectures:
                if isinstance(name, str) and name in ARCHITECTURES:
                    return ARCHITECTURES[name]
        raise ModelError(
            f"config.json: missing field 'model_type' (expected one of {', '.join(MODEL_TYPES)})"
        )
    if not isinstance(model_type, str) or model_type not in MODEL_TYPES:
        raise ModelError(
            f"config.json: unsupported model_type {str(model_type)[:60]!r}; "
            f"supported: {', '.join(MODEL_TYPES)}"
        )
    return MODEL_TYPES[model_type]


def _moe_json(moe: Any, family: str) -> dict[str, Any]:
    """The config.json fields of a `moe.MoESpec` (what `MoESpec.from_config` reads back)."""
    if family == "mixtral":
        return {"num_local_experts": moe.num_experts, "num_experts_per_tok": moe.top_k}
    return {
        "num_experts": moe.num_experts,
        "num_experts_per_tok": moe.top_k,
        "moe_intermediate_size": moe.expert_intermediate_size,
        "norm_topk_prob": moe.renormalize,
        "decoder_sparse_step": moe.decoder_sparse_step,
        "mlp_only_layers": sorted(moe.mlp_only_layers),
    }


def _window(
    raw: Mapping[str, Any], family: Family, layers: int
) -> tuple[int | None, tuple[str, ...]]:
    """(sliding_window, layer_types) as transformers' config of `family` computes them."""
    if family.window == "none":
        return None, ()
    on = True if family.window_flag is None else _bool(raw, family.window_flag, False)
    window = raw.get("sliding_window", family.default_window) if on else None
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise ModelError(
            f"config.json: sliding_window must be an integer >= 1 or null, got {window!r}"
        )
    if family.window == "every_layer":
        return window, ()
    given = raw.get("layer_types")
    if given is not None:
        if not isinstance(given, list) or not all(isinstance(kind, str) for kind in given):
            raise ModelError("config.json: layer_types must be a list of strings")
        # "attention": transformers' older name of "full_attention", read as that still
        return window, tuple(FULL if kind == "attention" else kind for kind in given)
    if family.window == "layer_types":
        return window, ()
    first = _int(raw, "max_window_layers", family.default_max_window_layers, minimum=0)
    return window, tuple(
        SLIDING if window is not None and i >= first else FULL for i in range(layers)
    )


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Hugging Face `config.json` that the computation depends on, for any
    family of `families.FAMILIES` (a Llama config by default)."""

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
    family: str = "llama"
    qkv_bias: bool = False  # biases on q_proj, k_proj, v_proj
    o_bias: bool = False  # a bias on o_proj
    qk_norm: bool = False  # RMSNorm per head on queries and keys, before rotary
    sliding_window: int | None = None  # positions a query sees (itself included)
    # per layer, "full_attention" or "sliding_attention"; () = every layer sliding if
    # `sliding_window` is set, else every layer full
    layer_types: tuple[str, ...] = ()
    # the sparse blocks of a mixture-of-experts family (a `moe.MoESpec`), None: dense MLPs
    moe: Any = None

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ModelError(f"unknown family {self.family!r}; known: {', '.join(FAMILIES)}")
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
        window = self.sliding_window
        if window is not None and (
            isinstance(window, bool) or not isinstance(window, int) or window < 1
        ):
            raise ModelError(f"config.json: sliding_window must be an integer >= 1, got {window!r}")
        types = (
            tuple(self.layer_types)
            or ((SLIDING if window is not None else FULL),) * self.num_hidden_layers
        )
        if len(types) != self.num_hidden_layers:
            raise ModelError(
                f"config.json: layer_types has {len(types)} entries for "
                f"{self.num_hidden_layers} layers"
            )
        for i, kind in enumerate(types):
            if kind not in (FULL, SLIDING):
                raise ModelError(
                    f"config.json: layer_types[{i}]: unsupported {str(kind)[:60]!r}; "
                    f"use {FULL!r} or {SLIDING!r}"
                )
            if kind == SLIDING and window is None:
                raise ModelError(
                    "config.json: layer_types has sliding layers but no sliding_window"
                )
        object.__setattr__(self, "layer_types", types)

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of layer `layer` (a global index), None for full attention."""
        return self.sliding_window if self.layer_types[layer] == SLIDING else None

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelConfig:
        """Validate a parsed `config.json`; every problem is a `ModelError` naming the field.

        The family comes from `model_type` (or, without one, `architectures`); a field that
        the family does not read, or a value of one that it cannot compute, is refused."""
        if not isinstance(raw, Mapping):
            raise ModelError("config.json: expected a JSON object")
        family = _family_of(raw)
        unknown = sorted(str(key) for key in raw if key not in family.known_fields)
        if unknown:
            raise ModelError(
                f"config.json: unknown field {unknown[0]!r} for model_type {family.name!r}"
                + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
            )
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelError(f"config.json: unsupported hidden_act {raw['hidden_act']!r}")
        if raw.get("mlp_bias"):
            raise ModelError("config.json: mlp_bias=true is not supported")
        if raw.get("use_mrope"):
            raise ModelError("config.json: use_mrope=true (multimodal rotary) is not supported")
        attention_bias = _bool(raw, "attention_bias", False)
        heads = _int(raw, "num_attention_heads")
        layers = _int(raw, "num_hidden_layers")
        max_positions = _int(raw, "max_position_embeddings", 2048)
        theta, scaling = _rope_scaling(raw, max_positions)
        head_dim = raw.get("head_dim")
        window, layer_types = _window(raw, family, layers)
        moe = parse_moe(raw, family.name) if family.mlp == "moe" else None
        return cls(
            vocab_size=_int(raw, "vocab_size"),
            hidden_size=_int(raw, "hidden_size"),
            intermediate_size=_int(raw, "intermediate_size"),
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=_int(raw, "num_key_value_heads", heads),
            rms_norm_eps=_float(raw, "rms_norm_eps", 1e-6),
            rope_theta=theta,
            max_position_embeddings=max_positions,
            tie_word_embeddings=_bool(raw, "tie_word_embeddings", False),
            rope_scaling=scaling,
            head_dim=(
                (family.default_head_dim or 0) if head_dim is None else _int(raw, "head_dim")
            ),
            family=family.name,
            qkv_bias=_switch(family.qkv_bias, attention_bias),
            o_bias=_switch(family.o_bias, attention_bias),
            qk_norm=family.qk_norm,
            sliding_window=window,
            layer_types=layer_types,
            moe=moe,
        )

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str]) -> ModelConfig:
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
        """A JSON-ready dict in the Hugging Face `config.json` layout of this family (what
        `from_dict` and transformers read back to the same model)."""
        spec = self.spec
        out: dict[str, Any] = {
            "architectures": [spec.architecture],
            "model_type": spec.model_types[0],
            "hidden_act": "silu",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling else None,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        if "attention_bias" in spec.fields:
            out["attention_bias"] = self.qkv_bias
        if "mlp_bias" in spec.fields:
            out["mlp_bias"] = False
        if self.moe is not None:
            out.update(_moe_json(self.moe, spec.name))
        if spec.window == "every_layer":
            out["sliding_window"] = self.sliding_window
            if spec.window_flag:
                out[spec.window_flag] = self.sliding_window is not None
        elif spec.window == "layer_types":
            out["sliding_window"] = self.sliding_window
            if set(self.layer_types) != {SLIDING if self.sliding_window else FULL}:
                out["layer_types"] = list(self.layer_types)
        elif spec.window == "per_layer":
            out["use_sliding_window"] = self.sliding_window is not None
            out["sliding_window"] = self.sliding_window
            out["layer_types"] = list(self.layer_types)
            out["max_window_layers"] = next(
                (i for i, kind in enumerate(self.layer_types) if kind == SLIDING),
                self.num_hidden_layers,
            )
        return out

    # Sizes, for the shard planner -------------------------------------------------------

    def layer_shapes(
        self, layer: int = 0, has: Callable[[str], bool] | None = None
    ) -> dict[str, tuple[int, ...]]:
        """Shapes of decoder layer `layer`'s tensors, by name relative to `model.layers.{i}.`.

        A sparse (mixture-of-experts) layer's block is named as on the Hub (one tensor per
        expert), or, given `has` (whether a checkpoint holds a name relative to the layer),
        in the layout that checkpoint holds (`moe.MoESpec.checkpoint_layer_shapes`)."""
        h, d = self.hidden_size, self.head_dim
        q, kv, inter = (
            self.num_attention_heads * d,
            self.num_key_value_heads * d,
            self.intermediate_size,
        )
        shapes: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (q, h),
            "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h),
            "self_attn.o_proj.weight": (h, q),
        }
        if self.qkv_bias:
            shapes.update(
                {
                    "self_attn.q_proj.bias": (q,),
                    "self_attn.k_proj.bias": (kv,),
                    "self_attn.v_proj.bias": (kv,),
                }
            )
        if self.o_bias:
            shapes["self_attn.o_proj.bias"] = (h,)
        if self.qk_norm:
            shapes["self_attn.q_norm.weight"] = (d,)
            shapes["self_attn.k_norm.weight"] = (d,)
        shapes["post_attention_layernorm.weight"] = (h,)
        if self.moe is not None:
            if has is None:
                shapes.update(self.moe.layer_shapes(h, layer))
            else:
                shapes.update(self.moe.checkpoint_layer_shapes(h, layer, has))
            return shapes
        shapes.update(
            {
                "mlp.gate_proj.weight": (inter, h),
                "mlp.up_proj.weight": (inter, h),
                "mlp.down_proj.weight": (h, inter),
            }
        )
        return shapes

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the whole checkpoint, by its Hugging Face name, in file order."""
        shapes: dict[str, tuple[int, ...]] = {
            "model.embed_tokens.weight": (self.vocab_size, self.hidden_size)
        }
        for i in range(self.num_hidden_layers):
            for name, shape in self.layer_shapes(i).items():
                shapes[f"model.layers.{i}.{name}"] = shape
        shapes["model.norm.weight"] = (self.hidden_size,)
        if not self.tie_word_embeddings:
            shapes["lm_head.weight"] = (self.vocab_size, self.hidden_size)
        return shapes

    def layer_params(self, layer: int | None = None) -> int:
        """Parameters of decoder layer `layer` (None: the largest layer)."""
        if layer is None:
            return max(self.layer_params(i) for i in range(self.num_hidden_layers))
        return sum(math.prod(shape) for shape in self.layer_shapes(layer).values())

    def num_parameters(self) -> int:
        """Parameters of the whole model (a tied head counted once)."""
        return sum(math.prod(shape) for shape in self.tensor_shapes().values())

    def layer_bytes(self, dtype: str | torch.dtype = "float32") -> int:
        """Parameter bytes of one decoder layer (the largest, where they differ)."""
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
        element = DTYPE_BYTES[dtype_name(dtype)]
        total = sum(self.layer_params(i) for i in range(start, end)) * element
        if start == 0:
            total += self.embed_bytes(dtype)
        if end == self.num_hidden_layers:
            total += self.head_bytes(dtype)
            if start == 0 and self.tie_word_embeddings:
                total -= self.embed_bytes(dtype)
        return total

    def kv_bytes_per_token(
        self, start: int = 0, end: int | None = None, dtype: str | torch.dtype = "float32"
    ) -> int:
        """Bytes of one position's keys and values in layers `[start, end)` (all by default),
        while a cache is shorter than every sliding window."""
        end = self.num_hidden_layers if end is None else end
        self.check_range(start, end)
        return (
            (end - start)
            * 2
            * self.num_key_value_heads
            * self.head_dim
            * DTYPE_BYTES[dtype_name(dtype)]
        )

    def kv_cache_bytes(
        self,
        tokens: int,
        start: int = 0,
        end: int | None = None,
        dtype: str | torch.dtype = "float32",
    ) -> int:
        """Bytes of a KV cache of `tokens` positions for layers `[start, end)`: a sliding
        layer holds at most its window (`kvcache.KVCache`), a full layer every position."""
        end = self.num_hidden_layers if end is None else end
        per_layer = self.kv_bytes_per_token(start, end, dtype) // max(1, end - start)
        return sum(
            per_layer * min(tokens, self.layer_window(i) or tokens) for i in range(start, end)
        )

    def check_range(self, start: int, end: int) -> None:
        if not (0 <= start < end <= self.num_hidden_layers):
            raise ModelError(
                f"layer range [{start}, {end}) is not inside [0, {self.num_hidden_layers})"
            )


def shard_tensor_shapes(
    config: ModelConfig, start: int, end: int, has: Callable[[str], bool] | None = None
) -> dict[str, tuple[int, ...]]:
    """The checkpoint tensors that the shard `[start, end)` reads, in file order, with their
    shapes; `has(name)`: whether the checkpoint holds a tensor, to name a sparse block in the
    layout it is stored in (`ModelConfig.layer_shapes`)."""
    config.check_range(start, end)
    h = config.hidden_size
    shapes: dict[str, tuple[int, ...]] = {}
    if start == 0:
        shapes["model.embed_tokens.weight"] = (config.vocab_size, h)
    for i in range(start, end):
        prefix = f"model.layers.{i}."
        inner = None if has is None else (lambda name, p=prefix: has(p + name))
        for name, shape in config.layer_shapes(i, inner).items():
            shapes[prefix + name] = shape
    if end == config.num_hidden_layers:
        shapes["model.norm.weight"] = (h,)
        head = "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
        shapes.setdefault(head, (config.vocab_size, h))
    return shapes


def shard_tensor_names(config: ModelConfig, start: int, end: int) -> list[str]:
    """The checkpoint tensors that the shard `[start, end)` reads, in file order."""
    return list(shard_tensor_shapes(config, start, end))


# The parser of mixture-of-experts blocks, `moe.MoESpec.from_config`: moe.py imports this
# module (ModelError, check_shape), so this one cannot import it; the package's __init__
# registers it (`set_moe_parser`) before anything can read a config.
_moe_parser: list[Callable[[Mapping[str, Any], str], Any]] = []


def set_moe_parser(parser: Callable[[Mapping[str, Any], str], Any]) -> None:
    _moe_parser[:] = [parser]


def parse_moe(raw: Mapping[str, Any], model_type: str) -> Any:
    """The `moe.MoESpec` of a config.json of a mixture-of-experts family."""
    if not _moe_parser:
        raise ModelError("mixture-of-experts models need daemon.shards.model imported whole")
    return _moe_parser[0](raw, model_type)


def check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ModelError(f"tensor {name!r} has shape {list(got)}, config says {list(want)}")


LlamaConfig = ModelConfig  # the name callers have used since the Llama-only days
