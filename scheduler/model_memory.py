"""What a model's layers take on a server: weights, and a reserve for the KV cache of the
sessions that will run on them.

A server that holds only a range's weights has no room left for the keys and values its
sessions write, one position at a time, into every layer; so the planner counts, per layer,
`kv_reserve_tokens` positions of keys and values (`ModelSpec.kv_bytes_per_token` each) on
top of the weights. A sliding-window layer never keeps more positions than its window
(`daemon.shards.model.kvcache.KVCache` holds it as a ring), so its reserve is bounded by the
window; where layers differ (a model that mixes full and sliding layers), a range's bytes
depend on which layers it holds, and `LayerCosts` answers for each position in a chain.

Pure: no I/O, no torch. Every value of a `ModelSpec` may come from a peer, so `validate`
bounds it.
"""

from __future__ import annotations

import bisect
import functools
import itertools
import operator
from dataclasses import dataclass, field
from typing import Any

MAX_LAYERS = 100_000
MAX_BYTES = 2**62
MAX_NAME_LEN = 256
MAX_WINDOW = 2**31
MAX_KV_RESERVE_TOKENS = 2**24
# Positions of KV cache reserved per layer unless configured (`[cluster]
# placement_kv_reserve_tokens`): one session of a 4k context, or 8 of 512, on every range.
# For Llama-3-8B in float16 (8 kv heads of 128) that is 16 MiB per layer beside 436 MiB of
# weights; for Llama-2-7B (32 kv heads) 64 MiB beside 386 MiB.
DEFAULT_KV_RESERVE_TOKENS = 4096
# Beyond this many layers that differ, a middle range is counted as if every layer were the
# largest (safe, never exact): the exact worst run of k layers costs O(layers) for each k.
MAX_EXACT_LAYERS = 1024
FIRST, MIDDLE, LAST = "first", "middle", "last"


class PlanError(ValueError):
    """The model can't be placed as asked; the message says what was needed and available."""


@dataclass(frozen=True)
class ModelSpec:
    """A model's sizes as the planner needs them (`daemon.shards.model` computes them from a
    checkpoint's config)."""

    name: str
    num_layers: int
    layer_bytes: int
    """Weights of one decoder layer (the largest; a mixture of experts counts every expert)."""
    embed_bytes: int
    head_bytes: int
    cache_bytes_per_layer: int = 0
    """A fixed reserve per layer, beside the KV-cache reserve below."""
    kv_bytes_per_token: int = 0
    """Keys and values of one position in one layer; 0: no KV-cache reserve is counted."""
    layer_windows: tuple[int | None, ...] = ()
    """Each layer's sliding window (None: full attention); (): every layer full."""

    @property
    def per_layer_bytes(self) -> int:
        """Bytes one layer takes on a server, weights plus the fixed reserve (the KV-cache
        reserve, which depends on the planner's `kv_reserve_tokens`: `LayerCosts`)."""
        return self.layer_bytes + self.cache_bytes_per_layer

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.per_layer_bytes + self.embed_bytes + self.head_bytes

    def kv_reserve_bytes(self, layer: int, tokens: int) -> int:
        """The KV-cache reserve of layer `layer` for `tokens` positions (at most its window)."""
        window = self.layer_windows[layer] if self.layer_windows else None
        return self.kv_bytes_per_token * (tokens if window is None else min(tokens, window))

    def window_range(self, start: int, end: int) -> tuple[int | None, ...]:
        """The windows of layers [start, end) (for a range planned as a model of its own)."""
        return self.layer_windows[start:end] if self.layer_windows else ()

    def validate(self) -> None:
        if not isinstance(self.name, str) or not 0 < len(self.name) <= MAX_NAME_LEN:
            raise PlanError(f"model name must be a string of 1 to {MAX_NAME_LEN} characters")
        if not _is_int(self.num_layers) or not 1 <= self.num_layers <= MAX_LAYERS:
            raise PlanError(f"num_layers must be an integer in [1, {MAX_LAYERS}]")
        for name in (
            "layer_bytes",
            "embed_bytes",
            "head_bytes",
            "cache_bytes_per_layer",
            "kv_bytes_per_token",
        ):
            value = getattr(self, name)
            if not _is_int(value) or not 0 <= value <= MAX_BYTES:
                raise PlanError(f"{name} must be an integer in [0, 2**62]")
        windows = self.layer_windows
        if not isinstance(windows, tuple) or len(windows) not in (0, self.num_layers):
            raise PlanError("layer_windows must be a tuple with one entry per layer, or empty")
        if not all(w is None or (_is_int(w) and 1 <= w <= MAX_WINDOW) for w in windows):
            raise PlanError(f"layer_windows entries must be None or integers in [1, {MAX_WINDOW}]")


def check_reserve_tokens(tokens: Any) -> int:
    if not _is_int(tokens) or not 0 <= tokens <= MAX_KV_RESERVE_TOKENS:
        raise PlanError(f"kv_reserve_tokens must be an integer in [0, {MAX_KV_RESERVE_TOKENS}]")
    return tokens


@dataclass(frozen=True)
class LayerCosts:
    """The bytes each layer of a model takes on a server (weights, fixed reserve, KV-cache
    reserve of `tokens` positions), and how many layers fit in a node's room at each place
    of a chain: the first range starts at layer 0, the last ends at the last layer, a range
    in the middle may be anywhere (it is counted at its worst place, so that reordering the
    middle of a chain never overfills a node)."""

    layers: tuple[int, ...]
    embed: int
    head: int
    _prefix: list[int] = field(init=False, repr=False, compare=False)
    _uniform: bool = field(init=False, repr=False, compare=False)
    _worst: dict[int, int] = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not self.layers or min(self.layers) < 0:
            raise PlanError("a model needs at least one layer, of no negative size")
        object.__setattr__(self, "_prefix", [0, *itertools.accumulate(self.layers)])
        object.__setattr__(self, "_uniform", self.layers.count(self.layers[0]) == self.count)

    @classmethod
    def of(cls, model: ModelSpec, tokens: int = DEFAULT_KV_RESERVE_TOKENS) -> LayerCosts:
        """`model`'s costs with `tokens` positions of KV cache reserved per layer (the same
        object again for the same model and tokens: placement plans one model many times)."""
        model.validate()
        return _costs(model, check_reserve_tokens(tokens))

    @classmethod
    def _build(cls, model: ModelSpec, tokens: int) -> LayerCosts:
        fixed = model.layer_bytes + model.cache_bytes_per_layer
        if not model.layer_windows:  # every layer alike
            per = fixed + model.kv_bytes_per_token * tokens
            return cls((per,) * model.num_layers, model.embed_bytes, model.head_bytes)
        layers = tuple(fixed + model.kv_reserve_bytes(i, tokens) for i in range(model.num_layers))
        return cls(layers, model.embed_bytes, model.head_bytes)

    @property
    def count(self) -> int:
        return len(self.layers)

    @property
    def largest(self) -> int:
        """The most one layer takes (what a node must hold to take any layer)."""
        return max(self.layers)

    @property
    def layer_total(self) -> int:
        return self._prefix[-1]

    @property
    def total(self) -> int:
        """The whole model on one node."""
        return self.layer_total + self.embed + self.head

    def range_bytes(self, start: int, end: int) -> int:
        """What the range [start, end) takes, the embedding and the head where it holds them."""
        extra = (self.embed if start == 0 else 0) + (self.head if end == self.count else 0)
        return self._prefix[end] - self._prefix[start] + extra

    def fit(self, room: int, where: str = MIDDLE) -> int:
        """How many layers (at most all) fit in `room` bytes at `where` (FIRST: from layer 0,
        LAST: up to the last layer, MIDDLE: anywhere); -1 when `room` is negative. The
        embedding or head is the caller's to take off `room` first."""
        if room < 0:
            return -1
        n, prefix = self.count, self._prefix
        if where == FIRST:
            return bisect.bisect_right(prefix, room) - 1
        if where == LAST:
            total = prefix[-1]
            # the last k layers take total - prefix[n - k]; the most k with that <= room
            return n - bisect.bisect_left(prefix, total - room)
        low, high = 0, n  # worst(low) fits; find the largest k with worst(k) <= room
        while low < high:
            k = (low + high + 1) // 2
            if self._worst_run(k) <= room:
                low = k
            else:
                high = k - 1
        return low

    def _worst_run(self, k: int) -> int:
        """The most any k consecutive layers take."""
        if k == 0:
            return 0
        if k not in self._worst:
            if self._uniform:
                worst = k * self.layers[0]
            elif self.count > MAX_EXACT_LAYERS:
                worst = k * self.largest
            else:
                worst = max(map(operator.sub, self._prefix[k:], self._prefix))
            self._worst[k] = worst
        return self._worst[k]


@functools.lru_cache(maxsize=16)
def _costs(model: ModelSpec, tokens: int) -> LayerCosts:
    return LayerCosts._build(model, tokens)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
