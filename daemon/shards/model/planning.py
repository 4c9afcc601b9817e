"""A checkpoint's sizes as the shard planner counts them (`scheduler.model_memory.ModelSpec`):
each layer's weights (a mixture of experts: every expert, since all of them are loaded), the
embedding and the head, and what each layer's KV cache takes per position, with the window
that bounds it on a sliding layer (`kvcache.KVCache` keeps it as a ring)."""

from __future__ import annotations

from typing import Any

import torch

from daemon.shards.model.config import ModelConfig
from scheduler.model_memory import ModelSpec


def plan_sizes(config: ModelConfig, dtype: str | torch.dtype = "float32") -> dict[str, Any]:
    """The fields of a `ModelSpec` (all but its name) for `config` served in `dtype`; also
    those of the coordinator's wire shape, which carries the same sizes."""
    layers = config.num_hidden_layers
    return {
        "num_layers": layers,
        "layer_bytes": config.layer_bytes(dtype),
        "embed_bytes": config.embed_bytes(dtype),
        "head_bytes": config.head_bytes(dtype),
        "kv_bytes_per_token": config.kv_bytes_per_token(0, 1, dtype),
        "layer_windows": tuple(config.layer_window(i) for i in range(layers)),
    }


def model_spec(config: ModelConfig, name: str, dtype: str | torch.dtype = "float32") -> ModelSpec:
    """`config` as the planner sees it, under `name`."""
    return ModelSpec(name, **plan_sizes(config, dtype))
