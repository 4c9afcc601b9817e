"""A range of layers a shard server holds, and the memory its sessions' caches may use."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from daemon.shards import wire
from daemon.shards.model import LlamaConfig, LlamaShard


@dataclass
class ServedBlock:
    model_id: str
    model_dir: Path
    start: int
    end: int
    config: LlamaConfig
    shard: LlamaShard
    dtype: torch.dtype
    device: str
    loaded_at: float = field(default_factory=time.time)
    steps: int = 0
    compute_s: float = 0.0

    @property
    def cache_bytes_per_token(self) -> int:
        """Keys and values of one position in every layer of this range (while a cache is
        shorter than every sliding window)."""
        cfg = self.config
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim
        element = torch.empty((), dtype=self.dtype).element_size()
        return per_layer * (self.end - self.start) * element

    def cache_bytes(self, tokens: int) -> int:
        """Bytes of one session's KV cache of `tokens` positions here: a layer with a
        sliding window holds at most its window (`KVCache`'s ring), a full layer all."""
        return self.config.kv_cache_bytes(tokens, self.start, self.end, self.dtype)

    def tokens_for(self, free_bytes: int) -> int:
        """Positions that fit in `free_bytes`: `free_bytes // cache_bytes_per_token` (what
        the servers announce as free), or where sliding windows make a session cheaper, the
        longest session whose cache fits (the model's longest if that does)."""
        most = self.config.max_position_embeddings
        if free_bytes <= 0:
            return 0
        if self.cache_bytes(most) <= free_bytes:
            return max(most, free_bytes // self.cache_bytes_per_token)
        low, high = 0, most  # cache_bytes(low) fits, cache_bytes(high) does not
        while high - low > 1:
            middle = (low + high) // 2
            low, high = (middle, high) if self.cache_bytes(middle) <= free_bytes else (low, middle)
        return low

    @property
    def ms_per_layer(self) -> float:
        """Measured compute time per layer per step (a prior of 1 ms until measured)."""
        if not self.steps:
            return 1.0
        return 1000 * self.compute_s / self.steps / (self.end - self.start)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "model_dir": str(self.model_dir),
            "start": self.start,
            "end": self.end,
            "dtype": wire.NAMES[self.dtype],
            "device": self.device,
            "parameters_bytes": sum(p.numel() * p.element_size() for p in self.shard.parameters()),
            "ms_per_layer": round(self.ms_per_layer, 3),
            "steps": self.steps,
        }


def available_memory(device: str) -> int:
    """Bytes free on `device` now: CUDA's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc (macOS): assume 4 GiB
