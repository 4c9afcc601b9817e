"""Decode steps with fixed shapes, replayed as a CUDA graph on a GPU.

A one-token decode step of an 8B model launches hundreds of small kernels; launched one by
one from Python they cost more than the step's memory traffic (transformers' plain decode
loop runs at about a fifth of the memory-bandwidth floor on an H100). Captured once in a
CUDA graph and replayed, the step costs about its traffic.

A graph replays the same kernels on the same buffers, so nothing in the step may depend on a
Python value that changes between steps: the position lives in a device tensor, the new key
and value are written at that position with `index_copy_`, and attention covers the whole
preallocated cache (`max_len` slots) with a mask of the slots up to the position (slots past
it hold zeros or stale values; the mask gives them exactly zero weight). A sliding-window
layer's cache is a ring of `window` slots (`KVCache`): the key goes to slot `position %
window`, and the mask is the same test over the ring's slots. Prefill and other
multi-token steps stay on the eager path (`LlamaShard.forward`); both share one `KVCache`.

On the CPU the same fixed-shape step runs eagerly (no graph); tests check it against the
eager path there, and on CUDA the graph against the fixed-shape step.
"""

from __future__ import annotations

import contextlib
import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from daemon.shards.model.config import ModelError
from daemon.shards.model.kvcache import KVCache
from daemon.shards.model.layers import Attention
from daemon.shards.model.moe import SparseMoE
from daemon.shards.model.shard import LlamaShard

log = logging.getLogger(__name__)
_nothing = contextlib.nullcontext


def _attention(
    attn: Attention,
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    keys: Tensor,
    values: Tensor,
    position: Tensor,
    visible: Tensor,
) -> Tensor:
    """One token's attention over the whole cache: the new key goes into slot `position`
    (of the layer's ring, for a sliding-window layer), `visible` masks the slots in use."""
    heads, kv_heads, dim = attn.heads, attn.kv_heads, attn.head_dim
    q, k, v = attn.project(x, cos, sin)  # the same projection as the eager path
    keys.index_copy_(2, position, k)
    values.index_copy_(2, position, v)
    # grouped-query attention without repeating the cache: query heads grouped per kv head
    grouped = q.reshape(1, kv_heads, heads // kv_heads, dim)
    scores = torch.matmul(grouped, keys[0].transpose(-1, -2)) * attn.scale
    scores = scores.float().masked_fill(~visible, float("-inf"))
    probs = F.softmax(scores, dim=-1).to(values.dtype)
    out = torch.matmul(probs, values[0])  # [kv_heads, groups, dim]
    return attn.o_proj(out.reshape(1, 1, heads * dim))


class StaticDecoder:
    """One-token steps of one shard into one cache, as a CUDA graph where possible.

    `graph`: None captures on CUDA devices only. A capture that fails (an op torch cannot
    capture, out of memory) is logged and the steps run eagerly with the same shapes.
    The tensor a step returns is a buffer the next step overwrites: copy what you keep.
    """

    def __init__(self, shard: LlamaShard, cache: KVCache, *, graph: bool | None = None) -> None:
        if cache.batch != 1 or cache.num_layers != shard.num_layers:
            raise ModelError("a static decoder needs a batch-1 cache of this shard's layers")
        shard.check_cache(cache, 1)
        self.shard = shard
        self.cache = cache
        device = shard.device
        self.use_graph = device.type == "cuda" if graph is None else graph
        if self.use_graph and any(
            isinstance(layer.mlp, SparseMoE) for layer in shard.layers.values()
        ):
            # a sparse block runs only the experts its tokens are routed to: a step's kernels
            # depend on the data, which a graph cannot replay; the fixed-shape step stays
            log.info("a mixture-of-experts shard decodes without CUDA graphs")
            self.use_graph = False
        self._graph: torch.cuda.CUDAGraph | None = None
        with torch.inference_mode():
            self._position = torch.zeros(1, dtype=torch.int64, device=device)
            self._slots = torch.arange(cache.max_len, device=device)
            if shard.has_embedding:
                self._input = torch.zeros(1, 1, dtype=torch.int64, device=device)
            else:
                hidden = shard.config.hidden_size
                self._input = torch.zeros(1, 1, hidden, dtype=shard.dtype, device=device)
        self._output: Tensor | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def _compute(self) -> Tensor:
        shard = self.shard
        visible = self._slots <= self._position
        cos, sin = shard.rotary(self._position[None], shard.dtype)
        embed = shard.embed_tokens
        hidden = embed(self._input) if embed is not None else self._input
        for index, layer in enumerate(shard.layers.values()):
            keys, values = self.cache.keys[index], self.cache.values[index]
            slot, seen = self._position, visible
            if self.cache.is_ring(index):
                # a ring of the last `n` positions: position p in slot p % n; once p >= n
                # every slot holds one of the window's positions (p - n, p]
                n = self.cache.slots[index]
                slot, seen = self._position % n, self._slots[:n] <= self._position
            normed = layer.input_layernorm(hidden)
            attn = layer.self_attn
            hidden = hidden + _attention(attn, normed, cos, sin, keys, values, slot, seen)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        if shard.norm is None or shard.lm_head is None:
            return hidden
        return shard.lm_head(shard.norm(hidden)).float()

    def _capture(self) -> None:
        """Capture the step on this shard's device (the caller's thread may have another
        current device). `thread_local`: allocations by other threads, such as a new
        session's cache, do not break the capture."""
        self.use_graph = False  # until the capture succeeds
        side = torch.cuda.Stream(device=self.shard.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._compute()  # warm-up: the replay rewrites the slot this writes
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, stream=side, capture_error_mode="thread_local"):
                self._output = self._compute()
        except RuntimeError as exc:
            log.warning("CUDA graph capture failed, decoding eagerly: %s", exc)
            return
        self._graph, self.use_graph = graph, True

    def step(self, x: Tensor) -> Tensor:
        """The output for one new token (`[1, 1]` ids or `[1, 1, hidden]` states) at the
        cache's next position; the cache grows by one."""
        if tuple(x.shape[:2]) != (1, 1) or x.dim() != self._input.dim():
            raise ModelError(f"a static step takes one position of batch 1, got {tuple(x.shape)}")
        cache = self.cache
        cache.reserve(1)
        on_gpu = self.shard.device.type == "cuda"
        with torch.inference_mode(), torch.cuda.device(self.shard.device) if on_gpu else _nothing():
            self._input.copy_(x)
            self._position.fill_(cache.length)
            for index in range(cache.num_layers):
                if cache.is_ring(index):  # the step overwrites the ring's oldest position
                    cache.written(index, cache.length + 1)
            if self.use_graph and self._graph is None:
                self._capture()
            if self._graph is not None:
                self._graph.replay()
                out = self._output
                assert out is not None
            else:
                out = self._compute()
        cache.length += 1
        return out
