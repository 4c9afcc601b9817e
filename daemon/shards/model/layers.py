"""The layers of a Llama-family decoder, as transformers computes them for each family.

RMSNorm in float32, rotary embeddings computed in float32 and cast, grouped-query attention
through `scaled_dot_product_attention`, SwiGLU. Weights are frozen parameters taken as given.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from daemon.shards.model.config import ModelConfig
from daemon.shards.model.kvcache import KVCache
from daemon.shards.model.linear import Linear
from daemon.shards.model.moe import SparseMoE


def _param(tensor: Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


class RMSNorm(nn.Module):
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


class Embedding(nn.Module):
    def __init__(self, weight: Tensor) -> None:
        super().__init__()
        self.weight = _param(weight)

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(ids, self.weight)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _repeat_kv(x: Tensor, groups: int) -> Tensor:
    b, kv, n, d = x.shape
    return x[:, :, None].expand(b, kv, groups, n, d).reshape(b, kv * groups, n, d)


class Attention(nn.Module):
    """Grouped-query attention of one layer, with the family's switches: biases on the
    projections (Qwen2: q/k/v; Qwen3 / Llama `attention_bias`: all four), an RMSNorm per
    head on queries and keys before rotary (Qwen3), and a sliding window (a query at `p`
    sees positions `(p - window, p]`, as transformers' sliding-window mask)."""

    def __init__(self, config: ModelConfig, weights: Mapping[str, Tensor], layer: int = 0) -> None:
        super().__init__()
        self.q_proj = Linear(weights["q_proj.weight"], weights.get("q_proj.bias"))
        self.k_proj = Linear(weights["k_proj.weight"], weights.get("k_proj.bias"))
        self.v_proj = Linear(weights["v_proj.weight"], weights.get("v_proj.bias"))
        self.o_proj = Linear(weights["o_proj.weight"], weights.get("o_proj.bias"))
        self.q_norm: RMSNorm | None = None
        self.k_norm: RMSNorm | None = None
        if config.qk_norm:
            self.q_norm = RMSNorm(weights["q_norm.weight"], config.rms_norm_eps)
            self.k_norm = RMSNorm(weights["k_norm.weight"], config.rms_norm_eps)
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.layer_window(layer)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys and values `[batch, heads, seq, head_dim]`, rotated."""
        b, s, _ = x.shape
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def _sdpa(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, causal: bool) -> Tensor:
        groups = self.heads // self.kv_heads
        extra: dict[str, Any] = {}
        if groups > 1:
            if mask is None:
                extra["enable_gqa"] = True
            else:  # masked GQA is not supported by every SDPA backend
                k, v = _repeat_kv(k, groups), _repeat_kv(v, groups)
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale, **extra
        )

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, past: int) -> Tensor:
        """Causal attention of `q` (the `s` new positions) over `k`, `v` (`past + s`)."""
        s = q.shape[2]
        # Causal over cache + new tokens: query i (slot past+i) sees slots <= past+i.
        # SDPA's is_causal aligns top-left, right only when there is no past.
        mask = None
        if s > 1 and past > 0:
            mask = torch.ones(s, past + s, dtype=torch.bool, device=q.device).tril(past)
        return self._sdpa(q, k, v, mask, s > 1 and past == 0)

    def _attend_window(
        self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        """Sliding-window attention of the new positions (after the cache's `length`): over
        the window before them, read from the cache's ring, and their own keys, which are
        staged for the ring (`KVCache.commit` writes them once the step is through)."""
        window = self.window
        assert window is not None
        past = 0 if cache is None else cache.length
        first = max(0, past - window + 1)
        if cache is not None and q.shape[2] == 1:
            return self._decode_window(q, k, v, cache, layer)
        if cache is not None:
            if past > first:
                old_k, old_v = cache.window_before(layer, past)
                k_all, v_all = torch.cat((old_k, k), dim=2), torch.cat((old_v, v), dim=2)
            else:
                k_all, v_all = k, v
            cache.stage(layer, k, v)
        else:
            k_all, v_all = k, v
        s = q.shape[2]
        if past + s <= window:  # the window does not cut anything yet: plain causal
            return self._attend(q, k_all, v_all, past - first)
        query = torch.arange(past, past + s, device=q.device)[:, None]
        key = torch.arange(first, past + s, device=q.device)[None]
        mask = (key <= query) & (key > query - window)
        return self._sdpa(q, k_all, v_all, mask, False)

    def _decode_window(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int) -> Tensor:
        """One new position `p` of a sliding layer, attending in place over the ring: its key
        goes straight into slot `p % slots`, over `p - window`, the one position its window
        has just left (a step that fails and runs again needs only the window before `p`);
        the ring's slots then hold exactly the window, in ring order (attention over a set of
        keys does not depend on their order)."""
        past = cache.length
        keys, values = cache.keys[layer], cache.values[layer]
        slots = keys.shape[2]
        slot = past % slots
        keys[:, :, slot : slot + 1] = k
        values[:, :, slot : slot + 1] = v
        cache.written(layer, past + 1)
        seen = min(past + 1, slots)
        return self._sdpa(q, keys[:, :, :seen], values[:, :, :seen], None, False)

    def _cached(self, q: Tensor, k: Tensor, v: Tensor, cache: KVCache, layer: int) -> Tensor:
        """Attention of new positions continuing `cache` (written into it)."""
        if self.window is not None:
            return self._attend_window(q, k, v, cache, layer)
        past, s = cache.length, q.shape[2]
        keys, values = cache.keys[layer], cache.values[layer]
        keys[:, :, past : past + s] = k
        values[:, :, past : past + s] = v
        return self._attend(q, keys[:, :, : past + s], values[:, :, : past + s], past)

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        b, s, _ = x.shape
        q, k, v = self.project(x, cos, sin)
        if cache is not None:
            out = self._cached(q, k, v, cache, layer)
        elif self.window is not None:
            out = self._attend_window(q, k, v, None, layer)
        else:
            out = self._attend(q, k, v, 0)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))

    def forward_packed(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        caches: Sequence[KVCache],
        sizes: Sequence[int],
        layer: int,
    ) -> Tensor:
        """Steps of several sessions packed along the sequence of `x` `[1, sum(sizes),
        hidden]`: the first `sizes[0]` positions continue `caches[0]`, the next `sizes[1]`
        `caches[1]`, and so on (batch-1 caches, one per session).

        The projections run once for all positions; each session then writes its keys and
        values into its own cache and attends over that cache alone, with exactly the call
        a lone step of its positions makes (`forward`): no copy of any cache, no padding."""
        q, k, v = self.project(x, cos, sin)
        out = []
        start = 0
        for cache, size in zip(caches, sizes, strict=True):
            end = start + size
            part = (q[:, :, start:end], k[:, :, start:end], v[:, :, start:end])
            out.append(self._cached(*part, cache, layer))
            start = end
        attended = torch.cat(out, dim=2) if len(out) > 1 else out[0]
        total = x.shape[1]
        return self.o_proj(attended.transpose(1, 2).reshape(1, total, self.heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, weights: Mapping[str, Tensor]) -> None:
        super().__init__()
        self.gate_proj = Linear(weights["gate_proj.weight"])
        self.up_proj = Linear(weights["up_proj.weight"])
        self.down_proj = Linear(weights["down_proj.weight"])

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, weights: Mapping[str, Tensor], layer: int = 0) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(weights["input_layernorm.weight"], eps)
        self.self_attn = Attention(
            config,
            {k[len("self_attn.") :]: v for k, v in weights.items() if "self_attn." in k},
            layer,
        )
        self.post_attention_layernorm = RMSNorm(weights["post_attention_layernorm.weight"], eps)
        moe = config.moe
        self.mlp: MLP | SparseMoE
        if moe is not None and moe.is_moe_layer(layer):
            self.mlp = SparseMoE(moe, config.hidden_size, moe.block_weights(weights))
        else:
            self.mlp = MLP(
                {k[len("mlp.") :]: v for k, v in weights.items() if k.startswith("mlp.")}
            )

    def forward(
        self, x: Tensor, cos: Tensor, sin: Tensor, cache: KVCache | None, layer: int
    ) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_packed(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        caches: Sequence[KVCache],
        sizes: Sequence[int],
        layer: int,
    ) -> Tensor:
        """Steps of several sessions packed along the sequence (`Attention.forward_packed`)."""
        attended = self.self_attn.forward_packed(
            self.input_layernorm(x), cos, sin, caches, sizes, layer
        )
        x = x + attended
        return x + self.mlp(self.post_attention_layernorm(x))


def rope_inv_freq(config: ModelConfig) -> Tensor:
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
