"""A Llama-family decoder in plain torch that can be cut into contiguous ranges of layers.

Each daemon loads one shard, layers `[start, end)`, straight from a Hugging Face style
safetensors checkpoint, reading only that shard's tensors. The maths follows transformers'
`LlamaForCausalLM` step by step (RMSNorm in float32, rotary embeddings computed in float32
and cast, grouped-query attention through `scaled_dot_product_attention`), so a chain of
shards gives the same logits as the whole model in transformers.

Tensor names in a checkpoint (and the `checkpoint_names()` of a shard) are the Hugging Face
ones: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...,
`model.norm.weight`, `lm_head.weight`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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

# Byte-level vocabulary of the tiny checkpoints: ids 0..255 are bytes, then two specials.
BYTE_BOS_ID = 256
BYTE_EOS_ID = 257
BYTE_BOS = "<|begin_of_text|>"
BYTE_EOS = "<|end_of_text|>"


class ModelError(ValueError):
    """A checkpoint, config or request that this module cannot serve, with the reason."""


class KVCacheFull(ModelError):
    """A forward pass would write past the cache's preallocated `max_len` positions."""


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


# --------------------------------------------------------------------------------------
# Config


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


# --------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys and values of a shard's own layers, `[batch, kv_heads, max_len, head_dim]`.

    `length` positions are filled; a forward pass appends after them. It never grows:
    writing past `max_len` raises `KVCacheFull`.
    """

    def __init__(
        self,
        num_layers: int,
        batch: int,
        kv_heads: int,
        max_len: int,
        head_dim: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if min(num_layers, batch, kv_heads, max_len, head_dim) < 1:
            raise ModelError("KVCache dimensions must all be >= 1")
        shape = (batch, kv_heads, max_len, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.batch = batch
        self.max_len = max_len
        self.length = 0

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def reserve(self, count: int) -> None:
        """Refuse, before anything is written, a step that would pass `max_len`."""
        if self.length + count > self.max_len:
            raise KVCacheFull(
                f"KV cache full: {self.length} + {count} positions > max_len {self.max_len}"
            )

    def truncate(self, n: int) -> None:
        """Forget positions >= n (before replaying them, e.g. after a failover)."""
        if not 0 <= n <= self.length:
            raise ModelError(f"cannot truncate a cache of length {self.length} to {n}")
        self.length = n

    def reset(self) -> None:
        self.length = 0


# --------------------------------------------------------------------------------------
# Modules


def _param(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class _Linear(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = _param(weight)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class _RMSNorm(nn.Module):
    def __init__(self, weight: Tensor, eps: float) -> None:
        super().__init__()
        self.weight = _param(weight)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # As transformers: normalise in float32, cast back, then scale.
        dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class _Embedding(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = _param(weight)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    b, kv, n, d = x.shape
    return x[:, :, None].expand(b, kv, groups, n, d).reshape(b, kv * groups, n, d)


class _Attention(nn.Module):
    def __init__(self, config: LlamaConfig, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.q_proj = _Linear(weights["q_proj.weight"])
        self.k_proj = _Linear(weights["k_proj.weight"])
        self.v_proj = _Linear(weights["v_proj.weight"])
        self.o_proj = _Linear(weights["o_proj.weight"])
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        past = 0
        if cache is not None:
            past = cache.length
            cache.keys[layer][:, :, past : past + s] = k
            cache.values[layer][:, :, past : past + s] = v
            k = cache.keys[layer][:, :, : past + s]
            v = cache.values[layer][:, :, : past + s]
        # Causal over cache + new tokens: query i (slot past+i) sees slots <= past+i.
        # SDPA's is_causal aligns top-left, right only when there is no past.
        mask = None
        if s > 1 and past > 0:
            mask = torch.ones(s, past + s, dtype=torch.bool, device=x.device).tril(past)
        groups = self.heads // self.kv_heads
        extra: dict[str, Any] = {}
        if groups > 1:
            if mask is None:
                extra["enable_gqa"] = True
            else:  # masked GQA is not supported by every SDPA backend
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=s > 1 and past == 0, scale=self.scale, **extra
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class _MLP(nn.Module):
    def __init__(self, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.gate_proj = _Linear(weights["gate_proj.weight"])
        self.up_proj = _Linear(weights["up_proj.weight"])
        self.down_proj = _Linear(weights["down_proj.weight"])

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _DecoderLayer(nn.Module):
    def __init__(self, config: LlamaConfig, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = _RMSNorm(weights["input_layernorm.weight"], eps)
        self.self_attn = _Attention(
            config, {k[len("self_attn.") :]: v for k, v in weights.items() if "self_attn." in k}
        )
        self.post_attention_layernorm = _RMSNorm(weights["post_attention_layernorm.weight"], eps)
        self.mlp = _MLP({k[len("mlp.") :]: v for k, v in weights.items() if k.startswith("mlp.")})

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_inv_freq(config: LlamaConfig) -> Tensor:
    """Inverse rotary frequencies (float32, CPU), as transformers computes them."""
    dim = config.head_dim
    base = config.rope_theta
    inv_freq = 1.0 / (
        base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(dtype=torch.float) / dim)
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class LlamaShard(nn.Module):
    """Decoder layers `[start, end)` of a Llama model, plus the embedding if `start == 0` and
    the final norm and LM head if `end == num_hidden_layers`.

    Parameter names follow the checkpoint without its `model.` prefix, with global layer
    indices (`layers.5.mlp.up_proj.weight`), so `checkpoint_names()` maps back exactly.
    """

    def __init__(
        self, config: LlamaConfig, start: int, end: int, tensors: Mapping[str, Tensor]
    ) -> None:
        super().__init__()
        config.check_range(start, end)
        self.config = config
        self.start = start
        self.end = end
        shapes = config.tensor_shapes()
        shapes.setdefault("lm_head.weight", shapes["model.embed_tokens.weight"])
        needed = shard_tensor_names(config, start, end)
        for name in needed:
            if name not in tensors:
                raise ModelError(f"missing tensor {name!r}")
            _check_shape(name, tuple(tensors[name].shape), shapes[name])
        self.embed_tokens: _Embedding | None = None
        self.norm: _RMSNorm | None = None
        self.lm_head: _Linear | None = None
        if self.has_embedding:
            self.embed_tokens = _Embedding(tensors["model.embed_tokens.weight"])
        self.layers = nn.ModuleDict(
            {
                str(i): _DecoderLayer(
                    config,
                    {name: tensors[f"model.layers.{i}.{name}"] for name in config.layer_shapes()},
                )
                for i in range(start, end)
            }
        )
        if self.has_head:
            self.norm = _RMSNorm(tensors["model.norm.weight"], config.rms_norm_eps)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head = _Linear(tensors["model.embed_tokens.weight"])
                self.lm_head.weight = self.embed_tokens.weight  # one tensor, not two
            else:
                head = (
                    "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
                )
                self.lm_head = _Linear(tensors[head])
        # Plain attribute, not a buffer: `.to(dtype)` must not round the frequencies.
        self._inv_freq = rope_inv_freq(config)

    @property
    def has_embedding(self) -> bool:
        return self.start == 0

    @property
    def has_head(self) -> bool:
        return self.end == self.config.num_hidden_layers

    @property
    def num_layers(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def checkpoint_names(self) -> list[str]:
        """The checkpoint tensors this shard holds (a tied head is the embedding)."""
        return shard_tensor_names(self.config, self.start, self.end)

    def nbytes(self) -> int:
        """Bytes of the parameters held (shared tensors once)."""
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """An empty cache for this shard's layers on its device and dtype."""
        cfg = self.config
        return KVCache(
            self.num_layers,
            batch,
            cfg.num_key_value_heads,
            max_len or cfg.max_position_embeddings,
            cfg.head_dim,
            dtype=self.dtype,
            device=self.device,
        )

    def _rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        if self._inv_freq.device != positions.device:
            self._inv_freq = self._inv_freq.to(positions.device)
        freqs = positions[..., None].float() * self._inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)
        # [batch or 1, 1 (heads), seq, head_dim]
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]

    def forward(
        self,
        x: Tensor,
        cache: KVCache | None = None,
        positions: Tensor | Sequence[int] | None = None,
    ) -> Tensor:
        """Token ids `[batch, seq]` (first shard) or hidden states `[batch, seq, hidden]` in;
        hidden states out, or float32 logits `[batch, seq, vocab]` from the last shard.

        `positions` are the absolute positions of the new tokens, `[seq]` or `[batch, seq]`;
        by default they follow the cache. The cache (if any) must belong to this shard; the
        new keys and values are appended after its `length` positions.
        """
        with torch.no_grad():
            return self._forward(x, cache, positions)

    def _forward(
        self, x: Tensor, cache: KVCache | None, positions: Tensor | Sequence[int] | None
    ) -> Tensor:
        device, dtype = self.device, self.dtype
        if self.embed_tokens is not None:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ModelError(
                    "first shard takes token ids [batch, seq] int64, "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            hidden = self.embed_tokens(x.to(device))
        else:
            if x.dim() != 3 or x.shape[-1] != self.config.hidden_size or not x.is_floating_point():
                raise ModelError(
                    f"shard [{self.start}, {self.end}) takes hidden states [batch, seq, "
                    f"{self.config.hidden_size}], got {x.dtype} {tuple(x.shape)}"
                )
            hidden = x.to(device=device, dtype=dtype)
        batch, seq = hidden.shape[:2]
        if seq < 1:
            raise ModelError("empty input: seq must be >= 1")
        past = 0
        if cache is not None:
            if cache.num_layers != self.num_layers or cache.batch != batch:
                raise ModelError(
                    f"cache has {cache.num_layers} layers and batch {cache.batch}; this shard "
                    f"has {self.num_layers} layers and the input batch {batch}"
                )
            cache.reserve(seq)
            past = cache.length
        if positions is None:
            pos = torch.arange(past, past + seq, device=device)
        else:
            pos = torch.as_tensor(positions, dtype=torch.int64).to(device)
        if pos.dim() == 1:
            pos = pos[None]
        if pos.dim() != 2 or pos.shape[-1] != seq or pos.shape[0] not in (1, batch):
            raise ModelError(f"positions {tuple(pos.shape)} do not match input [{batch}, {seq}]")
        cos, sin = self._rotary(pos, dtype)
        for index, layer in enumerate(self.layers.values()):
            hidden = layer(hidden, cos, sin, cache, index)
        if cache is not None:
            cache.length = past + seq
        if self.norm is None or self.lm_head is None:
            return hidden
        return self.lm_head(self.norm(hidden)).float()


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
    if got != want:
        raise ModelError(f"tensor {name!r} has shape {list(got)}, config says {list(want)}")


# --------------------------------------------------------------------------------------
# Loading


class _Checkpoint:
    """Reads single tensors from `model.safetensors` or a sharded index, lazily."""

    def __init__(self, model_dir: Path, stack: ExitStack) -> None:
        from safetensors import safe_open

        self._safe_open = safe_open
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        single = model_dir / SINGLE_FILE
        index = model_dir / INDEX_FILE
        self.files: dict[str, Path] = {}
        if single.is_file():
            for name in self._open(single).keys():  # noqa: SIM118 (not a dict)
                self.files[name] = single
        elif index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                if not isinstance(weight_map, dict):
                    raise TypeError("weight_map is not an object")
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise ModelError(f"{index}: invalid index: {exc}") from None
            for name, file in weight_map.items():
                path = model_dir / str(file)
                if path.parent != model_dir:
                    raise ModelError(f"{index}: file {file!r} is outside the model directory")
                self.files[name] = path
        else:
            raise ModelError(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")

    def _open(self, path: Path) -> Any:
        if path not in self._handles:
            if not path.is_file():
                raise ModelError(f"checkpoint file {path.name} is missing")
            try:
                self._handles[path] = self._stack.enter_context(
                    self._safe_open(str(path), framework="pt", device="cpu")
                )
            except Exception as exc:  # safetensors raises its own error types
                raise ModelError(f"{path.name}: cannot open: {exc}") from None
        return self._handles[path]

    def get(self, name: str, shape: tuple[int, ...]) -> Tensor:
        if name not in self.files:
            raise ModelError(f"missing tensor {name!r} in the checkpoint")
        handle = self._open(self.files[name])
        try:
            got = tuple(handle.get_slice(name).get_shape())
        except Exception:
            raise ModelError(f"missing tensor {name!r} in {self.files[name].name}") from None
        _check_shape(name, got, shape)
        return handle.get_tensor(name)


def load_shard(
    model_dir: str | os.PathLike[str],
    start: int,
    end: int,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LlamaShard:
    """Load layers `[start, end)` reading only their tensors (plus embedding/norm/head when
    owned), so memory is in proportion to the share."""
    model_dir = Path(model_dir)
    config = LlamaConfig.from_dir(model_dir)
    config.check_range(start, end)
    torch_dtype = to_dtype(dtype)
    shapes = config.tensor_shapes()
    tensors: dict[str, Tensor] = {}
    with ExitStack() as stack:
        checkpoint = _Checkpoint(model_dir, stack)
        for name in shard_tensor_names(config, start, end):
            tensor = checkpoint.get(name, shapes[name])
            if not tensor.is_floating_point():
                raise ModelError(f"tensor {name!r} has dtype {tensor.dtype}, expected floats")
            tensors[name] = tensor.to(device=device, dtype=torch_dtype)
    shard = LlamaShard(config, start, end, tensors)
    return shard.eval()


def load_model(model_dir: str | os.PathLike[str], **kw: Any) -> LlamaShard:
    """The whole model as one shard."""
    config = LlamaConfig.from_dir(model_dir)
    return load_shard(model_dir, 0, config.num_hidden_layers, **kw)


# --------------------------------------------------------------------------------------
# Generation


def _check_chain(shards: Sequence[LlamaShard]) -> None:
    if not shards:
        raise ModelError("no shards")
    if not shards[0].has_embedding or not shards[-1].has_head:
        raise ModelError("the chain must start at layer 0 and end at the last layer")
    for left, right in zip(shards, shards[1:], strict=False):
        if left.end != right.start:
            raise ModelError(
                f"shards [{left.start}, {left.end}) and [{right.start}, {right.end}) "
                "are not contiguous"
            )


def greedy_generate(
    shards: Sequence[LlamaShard],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_id: int | Sequence[int] | None = None,
    static: bool = False,
) -> list[int]:
    """The single-process reference loop over a chain of shards: prefill, then decode one
    token at a time with KV caches. Greedy at temperature 0, else sampled from a CPU
    `torch.Generator` seeded by `seed`. Returns the new tokens (stopping after an eos id:
    `eos_id` is one id or several, as `eos_token_id` in a generation_config.json).
    `static`: decode with fixed-shape steps (`daemon.shards.decode`), CUDA graphs on a GPU."""
    _check_chain(shards)
    stop = stop_ids(eos_id)
    if not prompt_ids:
        raise ModelError("empty prompt")
    if max_new_tokens < 0 or temperature < 0:
        raise ModelError("max_new_tokens and temperature must be >= 0")
    max_len = len(prompt_ids) + max(max_new_tokens, 1)
    caches = [shard.new_cache(batch=1, max_len=max_len) for shard in shards]
    generator = None
    if temperature > 0:
        generator = torch.Generator()
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
    device = shards[0].device
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    out: list[int] = []
    decoders = None
    if static:
        from daemon.shards.decode import StaticDecoder

        decoders = [StaticDecoder(s, c) for s, c in zip(shards, caches, strict=True)]
    for step in range(max_new_tokens):
        hidden = tokens
        if decoders is not None and step > 0:
            for decoder in decoders:
                hidden = decoder.step(hidden)
        else:
            for shard, cache in zip(shards, caches, strict=True):
                hidden = shard(hidden, cache)
        logits = hidden[0, -1].float().cpu()
        if generator is None:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        out.append(token)
        if token in stop:
            break
        tokens = torch.tensor([[token]], dtype=torch.int64, device=device)
    return out


def stop_ids(eos_id: int | Sequence[int] | None) -> frozenset[int]:
    """The token ids that end a generation: none, one, or all of a list (Llama 3 has two)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(i) for i in eos_id)


# --------------------------------------------------------------------------------------
# Tokenizer


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
    tokenizers do by default; `add_special_tokens=False` leaves them out.
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

    @property
    def is_byte_level(self) -> bool:
        return self._backend is None

    def encode(
        self, text: str, *, add_special_tokens: bool = True, add_bos: bool = False
    ) -> list[int]:
        """Token ids of `text`, with the checkpoint's special tokens around it (BOS for Llama)
        unless `add_special_tokens` is False; `add_bos` adds BOS when the template has none."""
        if self._backend is None:
            ids = list(text.encode("utf-8"))
            if add_special_tokens:
                ids = [*self._prefix, *ids, *self._suffix]
        else:
            ids = list(self._backend.encode(text, add_special_tokens=add_special_tokens).ids)
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Special and out-of-vocabulary ids are skipped; broken UTF-8 becomes U+FFFD."""
        if self._backend is None:
            return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")
        return self._backend.decode(list(ids), skip_special_tokens=True)


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
    """The tokenizer of a checkpoint directory, from its `tokenizer.json`."""
    model_dir = Path(model_dir)
    file = model_dir / TOKENIZER_FILE
    try:
        text = file.read_text()
        spec = json.loads(text)
    except FileNotFoundError:
        raise ModelError(f"{file}: not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelError(f"{file}: cannot read: {exc}") from None
    ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None}
    eos_ids: list[int] = []
    for name in (CONFIG_FILE, GENERATION_FILE):  # generation_config.json wins
        try:
            extra = json.loads((model_dir / name).read_text())
        except (OSError, ValueError):
            continue
        for key in ids:
            if isinstance(extra, dict) and _token_id(extra.get(key)) is not None:
                ids[key] = _token_id(extra.get(key))
                if key == "eos_token_id":
                    eos_ids = _token_ids(extra.get(key))
    if isinstance(spec, dict) and _is_byte_tokenizer(spec):
        by_content = {
            t["content"]: t.get("id")
            for t in spec.get("added_tokens") or []
            if isinstance(t, dict) and isinstance(t.get("content"), str)
        }
        bos = ids["bos_token_id"] if ids["bos_token_id"] is not None else by_content.get(BYTE_BOS)
        eos = ids["eos_token_id"] if ids["eos_token_id"] is not None else by_content.get(BYTE_EOS)
        prefix, suffix = _template(spec)
        return Tokenizer(bos_id=bos, eos_id=eos, eos_ids=eos_ids, prefix=prefix, suffix=suffix)
    try:
        import tokenizers
    except ImportError:
        raise ModelError(f"{file}: needs the 'tokenizers' package") from None
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as exc:
        raise ModelError(f"{file}: invalid tokenizer: {exc}") from None
    return Tokenizer(
        bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"], eos_ids=eos_ids, backend=backend
    )


# --------------------------------------------------------------------------------------
# Tiny checkpoints for tests and demos


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def make_tiny(
    out_dir: str | os.PathLike[str],
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 258,
    max_positions: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    tie: bool = False,
    shards: int = 1,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
) -> Path:
    """Write a small deterministic random Llama checkpoint in the Hugging Face layout.

    Same arguments, same bytes. Weights are drawn at a trained model's scale (std 0.02,
    norm weights near 1) so logits and attention are not degenerate. `shards > 1` writes
    `model-0000k-of-0000N.safetensors` files and `model.safetensors.index.json`.
    """
    from safetensors.torch import save_file

    if vocab < 258:
        raise ModelError("vocab must be >= 258 (256 bytes + BOS + EOS)")
    raw = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "rms_norm_eps": 1e-5,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "max_position_embeddings": max_positions,
        "tie_word_embeddings": tie,
        "model_type": "llama",
    }
    config = LlamaConfig.from_dict(raw)
    torch_dtype = to_dtype(dtype)
    shapes = config.tensor_shapes()
    if not 1 <= shards <= len(shapes):
        raise ModelError(f"shards must be in [1, {len(shapes)}]")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if len(shape) == 1:  # norm weights around 1
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        tensors[name] = value.to(torch_dtype).contiguous()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata=metadata)
    else:
        names = list(tensors)
        weight_map = {}
        for k in range(shards):
            part = names[k * len(names) // shards : (k + 1) * len(names) // shards]
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(out / file), metadata=metadata)
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})

    hf_config = config.to_json()
    hf_config.update(
        {
            "bos_token_id": BYTE_BOS_ID,
            "eos_token_id": BYTE_EOS_ID,
            "torch_dtype": dtype,
            "initializer_range": 0.02,
            "use_cache": True,
        }
    )
    _write_json(out / CONFIG_FILE, hf_config)
    _write_json(
        out / GENERATION_FILE,
        {"bos_token_id": BYTE_BOS_ID, "eos_token_id": BYTE_EOS_ID, "do_sample": False},
    )
    _write_json(out / TOKENIZER_FILE, byte_tokenizer_json())
    return out
