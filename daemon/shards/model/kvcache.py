"""The KV cache of one shard: preallocated keys and values, appended to, never grown."""

from __future__ import annotations

import torch

from daemon.shards.model.config import ModelError


class KVCacheFull(ModelError):
    """A forward pass would write past the cache's preallocated `max_len` positions."""


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
