"""Loading shards from a Hugging Face safetensors checkpoint, reading only their tensors."""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from daemon.shards.model.config import (
    INDEX_FILE,
    SINGLE_FILE,
    LlamaConfig,
    ModelError,
    check_shape,
    shard_tensor_names,
    to_dtype,
)
from daemon.shards.model.shard import LlamaShard


class Checkpoint:
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
        check_shape(name, got, shape)
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
        checkpoint = Checkpoint(model_dir, stack)
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
