"""The KV cache of one shard: preallocated keys and values, appended to, never grown.

A layer with a sliding attention window (Mistral, Qwen2 with `use_sliding_window`) never
reads a key older than its window, so its cache holds the last `window` positions only: a
ring, position `p` in slot `p % window`. A step of several positions reads the window
before it from the ring and writes its own keys there only once the whole step is through
(`stage` / `commit`), so a step that fails leaves the ring as it was and can run again. A
one-position step writes its key at once, over the one position its window has just left
(`layers.Attention`), and attends over the ring in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from daemon.shards.model.config import ModelError


class KVCacheFull(ModelError):
    """A forward pass would write past the cache's preallocated `max_len` positions."""


class KVCache:
    """Preallocated keys and values of a shard's own layers, `[batch, kv_heads, slots,
    head_dim]`: `max_len` slots for a full-attention layer, `min(max_len, window)` for a
    layer of `windows` (one entry per layer, None: full attention) with a sliding window.

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
        windows: Sequence[int | None] | None = None,
    ) -> None:
        if min(num_layers, batch, kv_heads, max_len, head_dim) < 1:
            raise ModelError("KVCache dimensions must all be >= 1")
        windows = [None] * num_layers if windows is None else list(windows)
        if len(windows) != num_layers or any(w is not None and w < 1 for w in windows):
            raise ModelError(f"KVCache needs one window (None or >= 1) for each of {num_layers}")
        self.windows: list[int | None] = windows
        self.slots = [min(max_len, w) if w is not None else max_len for w in windows]
        self.keys = [
            torch.zeros((batch, kv_heads, n, head_dim), dtype=dtype, device=device)
            for n in self.slots
        ]
        self.values = [torch.zeros_like(k) for k in self.keys]
        self.batch = batch
        self.max_len = max_len
        self.length = 0
        # per layer, the lowest position whose keys are still in its slots (a ring's oldest)
        self._kept_from = [0] * num_layers
        self._staged: list[tuple[int, Tensor, Tensor]] = []

    @property
    def num_layers(self) -> int:
        return len(self.keys)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))

    def is_ring(self, layer: int) -> bool:
        """Whether layer `layer` (of this cache) keeps fewer slots than `max_len`."""
        return self.slots[layer] < self.max_len

    def reserve(self, count: int) -> None:
        """Refuse, before anything is written, a step that would pass `max_len`."""
        if self.length + count > self.max_len:
            raise KVCacheFull(
                f"KV cache full: {self.length} + {count} positions > max_len {self.max_len}"
            )

    def window_before(self, layer: int, position: int) -> tuple[Tensor, Tensor]:
        """Keys and values of the positions a query at `position` sees before itself, in
        order: `[max(0, position - window + 1), position)` of a sliding layer."""
        window = self.windows[layer]
        assert window is not None
        first = max(0, position - window + 1)
        keys, values = self.keys[layer], self.values[layer]
        slots = self.slots[layer]
        if position <= slots:  # never wrapped: slot = position
            return keys[:, :, first:position], values[:, :, first:position]
        index = torch.arange(first, position, device=keys.device) % slots
        return keys.index_select(2, index), values.index_select(2, index)

    def stage(self, layer: int, keys: Tensor, values: Tensor) -> None:
        """New keys and values of a ring layer, written by `commit` once the step is through."""
        self._staged.append((layer, keys, values))

    def discard(self) -> None:
        """Forget the staged keys of a step that failed."""
        self._staged.clear()

    def commit(self, start: int) -> None:
        """Write the staged keys (positions `start`, `start + 1`, ...) into their rings."""
        staged, self._staged = self._staged, []
        for layer, keys, values in staged:
            count, slots = keys.shape[2], self.slots[layer]
            first = start + max(0, count - slots)  # older ones would be overwritten anyway
            index = torch.arange(first, start + count, device=keys.device) % slots
            self.keys[layer].index_copy_(2, index, keys[:, :, first - start :])
            self.values[layer].index_copy_(2, index, values[:, :, first - start :])
            self.written(layer, start + count)

    def written(self, layer: int, end: int) -> None:
        """Positions up to `end` were written into layer `layer`'s slots."""
        self._kept_from[layer] = max(self._kept_from[layer], end - self.slots[layer])

    def truncate(self, n: int) -> None:
        """Forget positions >= n (before replaying them, e.g. after a failover). A sliding
        layer's ring must still hold the window before `n`, else this raises."""
        if not 0 <= n <= self.length:
            raise ModelError(f"cannot truncate a cache of length {self.length} to {n}")
        for layer, window in enumerate(self.windows):
            if window is not None and max(0, n - window + 1) < self._kept_from[layer]:
                raise ModelError(
                    f"cannot truncate to {n}: the sliding window before it is overwritten "
                    f"(layer {layer} keeps positions >= {self._kept_from[layer]}); replay "
                    "from the start"
                )
        self.length = n

    def reset(self) -> None:
        self.length = 0
        self._kept_from = [0] * self.num_layers
        self._staged.clear()
