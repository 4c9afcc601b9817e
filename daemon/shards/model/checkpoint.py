"""Loading shards from a Hugging Face safetensors checkpoint, reading only their tensors."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from daemon.shards.model.config import (
    INDEX_FILE,
    SINGLE_FILE,
    LlamaConfig,
    ModelConfig,
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


# Buffers some checkpoints carry that are not weights (transformers < 4.31 saved these).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def _owner(config: ModelConfig, name: str) -> int | str | None:
    """The layer index a tensor name belongs to, "embed" / "head", or None (elsewhere)."""
    if name.startswith("model.layers."):
        index = name[len("model.layers.") :].split(".", 1)[0]
        return int(index) if index.isdigit() else None
    if name.startswith("model.embed_tokens."):
        return "embed"
    if name.startswith(("model.norm.", "lm_head.")):
        return "head"
    return None


def check_no_extra(
    config: ModelConfig,
    start: int,
    end: int,
    present: Iterable[str],
    needed: Iterable[str],
) -> None:
    """Refuse a checkpoint holding tensors in the layers `[start, end)` (or the embedding
    and head, where this shard has them) that the config does not describe: a bias, a norm
    or an expert this family does not compute would otherwise be dropped without a word."""
    wanted = set(needed)
    if config.tie_word_embeddings:
        wanted.add("lm_head.weight")  # tied: transformers ignores a stored copy too
    for name in present:
        if name in wanted or name.endswith(_IGNORED_SUFFIXES):
            continue
        owner = _owner(config, name)
        mine = (
            (isinstance(owner, int) and start <= owner < end)
            or (owner == "embed" and start == 0)
            or (owner == "head" and end == config.num_hidden_layers)
        )
        if mine:
            raise ModelError(
                f"unexpected tensor {name!r} in the checkpoint: a {config.family} model with "
                "this config.json has no such weight"
            )


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
    names = shard_tensor_names(config, start, end)
    with ExitStack() as stack:
        checkpoint = Checkpoint(model_dir, stack)
        check_no_extra(config, start, end, checkpoint.files, names)
        for name in names:
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
