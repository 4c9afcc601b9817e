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
    CONFIG_FILE,
    DTYPE_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    LlamaConfig,
    ModelConfig,
    ModelError,
    check_shape,
    shard_tensor_shapes,
    to_dtype,
)
from daemon.shards.model.planning import model_spec
from daemon.shards.model.shard import LlamaShard
from scheduler.model_memory import DEFAULT_KV_RESERVE_TOKENS, LayerCosts, PlanError


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

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        """A tensor's shape and stored dtype ("F32", "BF16", ...), from the file's header."""
        if name not in self.files:
            raise ModelError(f"missing tensor {name!r} in the checkpoint")
        try:
            piece = self._open(self.files[name]).get_slice(name)
            return tuple(piece.get_shape()), str(piece.get_dtype())
        except ModelError:
            raise
        except Exception:
            raise ModelError(f"missing tensor {name!r} in {self.files[name].name}") from None


# safetensors' names of the dtypes a checkpoint's weights may be stored in (converted to the
# serving dtype when loaded)
STORED_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def inspect_checkpoint(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What `gridmesh model inspect` reports, read from config.json and the safetensors
    headers only (no weight is loaded): the family and sizes, and `problems`, every
    reason gridmesh cannot serve the checkpoint (empty: it can)."""
    model_dir = Path(model_dir)
    report: dict[str, Any] = {"path": str(model_dir), "problems": []}
    problems: list[str] = report["problems"]
    try:
        raw = json.loads((model_dir / CONFIG_FILE).read_text())
        if isinstance(raw, dict):
            report["model_type"] = raw.get("model_type")
    except (OSError, UnicodeDecodeError, ValueError):
        pass
    try:
        config = ModelConfig.from_dir(model_dir)
    except ModelError as exc:
        problems.append(str(exc))
        return report
    stored: set[str] = set()
    try:
        with ExitStack() as stack:
            checkpoint = Checkpoint(model_dir, stack)
            last = config.num_hidden_layers
            shapes = shard_tensor_shapes(config, 0, last, has=checkpoint.files.__contains__)
            for name, shape in shapes.items():
                try:
                    got, dtype = checkpoint.header(name)
                    check_shape(name, got, shape)
                except ModelError as exc:
                    problems.append(str(exc))
                    continue
                stored.add(dtype)
                if dtype not in STORED_DTYPES:
                    problems.append(f"tensor {name!r} is stored as {dtype}, not as float weights")
            try:
                check_no_extra(config, 0, last, checkpoint.files, shapes)
            except ModelError as exc:
                problems.append(str(exc))
    except ModelError as exc:
        problems.append(str(exc))
    names = sorted(STORED_DTYPES.get(d, d) for d in stored)
    dtype = names[0] if len(names) == 1 and names[0] in DTYPE_BYTES else "float32"
    windows = [i for i in range(config.num_hidden_layers) if config.layer_window(i)]
    report.update(
        {
            "family": config.family,
            "dtype": ", ".join(names) or None,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "heads": config.num_attention_heads,
            "kv_heads": config.num_key_value_heads,
            "head_dim": config.head_dim,
            "vocab_size": config.vocab_size,
            "qkv_bias": config.qkv_bias,
            "o_bias": config.o_bias,
            "qk_norm": config.qk_norm,
            "tied_embeddings": config.tie_word_embeddings,
            "experts": None
            if config.moe is None
            else {
                "experts": config.moe.num_experts,
                "per_token": config.moe.top_k,
                "expert_intermediate_size": config.moe.expert_intermediate_size,
                "sparse_layers": [
                    i for i in range(config.num_hidden_layers) if config.moe.is_moe_layer(i)
                ],
            },
            "sliding_window": config.sliding_window,
            "sliding_layers": windows,
            "layer_types": list(config.layer_types),
            "parameters": config.num_parameters(),
            "bytes_dtype": dtype,
            "bytes_per_layer": config.layer_bytes(dtype),
            "embedding_bytes": config.embed_bytes(dtype),
            "head_bytes": config.head_bytes(dtype),
            "total_bytes": config.shard_bytes(0, config.num_hidden_layers, dtype),
            "kv_cache_bytes_per_token": config.kv_bytes_per_token(dtype=dtype),
            "kv_cache_bytes_per_token_per_layer": config.kv_bytes_per_token(0, 1, dtype),
            "max_positions": config.max_position_embeddings,
            "kv_cache_bytes_at_max_positions": config.kv_cache_bytes(
                config.max_position_embeddings, dtype=dtype
            ),
            # what the shard planner counts for the whole model on one node, by default
            "kv_reserve_tokens": DEFAULT_KV_RESERVE_TOKENS,
            "planned_bytes": _planned_bytes(config, dtype, problems),
        }
    )
    return report


def _planned_bytes(config: ModelConfig, dtype: str, problems: list[str]) -> int | None:
    """The bytes the shard planner counts for the whole model on one node (None, and a
    problem, where its sizes are beyond what the planner takes)."""
    try:
        return LayerCosts.of(model_spec(config, "model", dtype)).total
    except PlanError as exc:
        problems.append(f"the shard planner cannot place it: {exc}")
        return None


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
    tensors: dict[str, Tensor] = {}
    with ExitStack() as stack:
        checkpoint = Checkpoint(model_dir, stack)
        # a sparse block named as this checkpoint stores it (per expert, or fused)
        shapes = shard_tensor_shapes(config, start, end, has=checkpoint.files.__contains__)
        check_no_extra(config, start, end, checkpoint.files, shapes)
        for name, shape in shapes.items():
            tensor = checkpoint.get(name, shape)
            if not tensor.is_floating_point():
                raise ModelError(f"tensor {name!r} has dtype {tensor.dtype}, expected floats")
            tensors[name] = tensor.to(device=device, dtype=torch_dtype)
    shard = LlamaShard(config, start, end, tensors)
    return shard.eval()


def load_model(model_dir: str | os.PathLike[str], **kw: Any) -> LlamaShard:
    """The whole model as one shard."""
    config = LlamaConfig.from_dir(model_dir)
    return load_shard(model_dir, 0, config.num_hidden_layers, **kw)
