"""A shard: decoder layers `[start, end)` of a model of any family, and its eager forward pass."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from daemon.shards.model.config import (
    ModelConfig,
    ModelError,
    check_shape,
    shard_tensor_names,
    shard_tensor_shapes,
)
from daemon.shards.model.kvcache import KVCache
from daemon.shards.model.layers import DecoderLayer, Embedding, RMSNorm, rope_inv_freq
from daemon.shards.model.linear import Linear


class LlamaShard(nn.Module):
    """Decoder layers `[start, end)` of a model of any family (the name is from when there
    was only Llama), plus the embedding if `start == 0` and the final norm and LM head if
    `end == num_hidden_layers`.

    Parameter names follow the checkpoint without its `model.` prefix, with global layer
    indices (`layers.5.mlp.up_proj.weight`), so `checkpoint_names()` maps back exactly;
    except in a sparse block (`moe.SparseMoE`: `mlp.gate`, `mlp.experts.{e}.*`).
    """

    def __init__(
        self, config: ModelConfig, start: int, end: int, tensors: Mapping[str, Tensor]
    ) -> None:
        super().__init__()
        config.check_range(start, end)
        self.config = config
        self.start = start
        self.end = end
        needed = shard_tensor_shapes(config, start, end, has=lambda name: name in tensors)
        for name, shape in needed.items():
            if name not in tensors:
                raise ModelError(f"missing tensor {name!r}")
            check_shape(name, tuple(tensors[name].shape), shape)
        self.embed_tokens: Embedding | None = None
        self.norm: RMSNorm | None = None
        self.lm_head: Linear | None = None
        if self.has_embedding:
            self.embed_tokens = Embedding(tensors["model.embed_tokens.weight"])
        self.layers = nn.ModuleDict(
            {
                str(i): DecoderLayer(
                    config,
                    {
                        name.removeprefix(f"model.layers.{i}."): tensors[name]
                        for name in needed
                        if name.startswith(f"model.layers.{i}.")
                    },
                    i,
                )
                for i in range(start, end)
            }
        )
        if self.has_head:
            self.norm = RMSNorm(tensors["model.norm.weight"], config.rms_norm_eps)
            if config.tie_word_embeddings and self.embed_tokens is not None:
                self.lm_head = Linear(tensors["model.embed_tokens.weight"])
                self.lm_head.weight = self.embed_tokens.weight  # one tensor, not two
            else:
                head = (
                    "model.embed_tokens.weight" if config.tie_word_embeddings else "lm_head.weight"
                )
                self.lm_head = Linear(tensors[head])
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
            windows=self.windows,
        )

    @property
    def windows(self) -> list[int | None]:
        """The sliding window of each of this shard's layers (None: full attention)."""
        return [self.config.layer_window(i) for i in range(self.start, self.end)]

    def check_cache(self, cache: KVCache, batch: int) -> None:
        """Refuse a cache not made for this shard's layers (`new_cache`) and batch."""
        if cache.num_layers != self.num_layers or cache.batch != batch:
            raise ModelError(
                f"cache has {cache.num_layers} layers and batch {cache.batch}; this shard "
                f"has {self.num_layers} layers and the input batch {batch}"
            )
        if cache.windows != self.windows:
            raise ModelError(
                f"cache has the sliding windows {cache.windows}, this shard's layers "
                f"{self.windows}: make it with new_cache"
            )

    def rotary(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Rotary (cos, sin) for absolute `positions` `[batch or 1, seq]`, in `dtype`."""
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

    def forward_packed(self, xs: Sequence[Tensor], caches: Sequence[KVCache]) -> list[Tensor]:
        """Steps of several sessions in one forward pass: `xs[i]` (token ids `[1, s_i]`, or
        hidden states `[1, s_i, hidden]`; a prefill, a replay or one decode position)
        continues `caches[i]`, a batch-1 cache of this shard, at that cache's own `length`.
        Returns each session's output `[1, s_i, ...]`, as `forward` would.

        The steps share every matrix product (what makes a batch cheaper than its steps one
        by one: the weights are read once) and nothing else: they are packed along the
        sequence, rotary embeddings at each position's own place in its session, keys and
        values written into each session's own cache, and each session's attention over its
        own cache alone (`Attention.forward_packed`). Every cache is checked for room before
        anything is written; each grows by its step."""
        with torch.no_grad():
            if not xs or len(xs) != len(caches):
                raise ModelError(f"{len(xs)} steps for {len(caches)} caches")
            if len({id(cache) for cache in caches}) != len(caches):
                raise ModelError("a batched step cannot write one cache twice")
            parts = [self._input(x) for x in xs]
            for part in parts:
                if part.shape[0] != 1 or part.shape[1] < 1:
                    raise ModelError(f"a batched step takes batch 1, got {tuple(part.shape)}")
            sizes = [part.shape[1] for part in parts]
            for cache, size in zip(caches, sizes, strict=True):
                if cache.num_layers != self.num_layers or cache.batch != 1:
                    raise ModelError(
                        f"a batched step takes batch-1 caches of {self.num_layers} layers"
                    )
                self.check_cache(cache, 1)
                cache.reserve(size)
            hidden = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
            pos = torch.cat(
                [torch.arange(c.length, c.length + n) for c, n in zip(caches, sizes, strict=True)]
            )
            cos, sin = self.rotary(pos[None].to(self.device), self.dtype)
            try:
                for index, layer in enumerate(self.layers.values()):
                    hidden = layer.forward_packed(hidden, cos, sin, caches, sizes, index)
            except BaseException:
                for cache in caches:
                    cache.discard()
                raise
            for cache, size in zip(caches, sizes, strict=True):
                cache.commit(cache.length)
                cache.length += size
            if self.norm is not None and self.lm_head is not None:
                hidden = self.lm_head(self.norm(hidden)).float()
            return list(hidden.split(sizes, dim=1))

    def decode_rows(self, x: Tensor, caches: Sequence[KVCache]) -> Tensor:
        """One new position for each of several sessions: row i of `x` (ids `[rows, 1]` or
        hidden states `[rows, 1, hidden]`) continues `caches[i]` (`forward_packed`); output
        `[rows, 1, ...]`."""
        if x.dim() < 2 or x.shape[1] != 1 or x.shape[0] != len(caches) or not len(caches):
            raise ModelError(
                f"a batched step takes one position for each of {len(caches)} caches, "
                f"got {tuple(x.shape)}"
            )
        return torch.cat(self.forward_packed(list(x.split(1)), caches))

    def _input(self, x: Tensor) -> Tensor:
        """The first layer's input: token ids embedded, or hidden states checked."""
        device, dtype = self.device, self.dtype
        if self.embed_tokens is not None:
            if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
                raise ModelError(
                    "first shard takes token ids [batch, seq] int64, "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            return self.embed_tokens(x.to(device))
        if x.dim() != 3 or x.shape[-1] != self.config.hidden_size or not x.is_floating_point():
            raise ModelError(
                f"shard [{self.start}, {self.end}) takes hidden states [batch, seq, "
                f"{self.config.hidden_size}], got {x.dtype} {tuple(x.shape)}"
            )
        return x.to(device=device, dtype=dtype)

    def _forward(
        self, x: Tensor, cache: KVCache | None, positions: Tensor | Sequence[int] | None
    ) -> Tensor:
        device, dtype = self.device, self.dtype
        hidden = self._input(x)
        batch, seq = hidden.shape[:2]
        if seq < 1:
            raise ModelError("empty input: seq must be >= 1")
        past = 0
        if cache is not None:
            self.check_cache(cache, batch)
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
        cos, sin = self.rotary(pos, dtype)
        try:
            for index, layer in enumerate(self.layers.values()):
                hidden = layer(hidden, cos, sin, cache, index)
        except BaseException:
            if cache is not None:
                cache.discard()
            raise
        if cache is not None:
            cache.commit(past)
            cache.length = past + seq
        if self.norm is None or self.lm_head is None:
            return hidden
        return self.lm_head(self.norm(hidden)).float()
