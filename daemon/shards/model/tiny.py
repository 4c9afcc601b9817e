"""Tiny deterministic random checkpoints of every family, for tests and demos."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from daemon.shards.model.config import (
    CONFIG_FILE,
    FULL,
    GENERATION_FILE,
    INDEX_FILE,
    SINGLE_FILE,
    SLIDING,
    TOKENIZER_FILE,
    ModelConfig,
    ModelError,
    parse_moe,
    to_dtype,
)
from daemon.shards.model.families import ALWAYS, FAMILIES, FROM_CONFIG
from daemon.shards.model.tokenizer import (
    BYTE_BOS,
    BYTE_BOS_ID,
    BYTE_EOS,
    BYTE_EOS_ID,
    byte_tokenizer_json,
)

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# ChatML's layout over the byte vocabulary: BOS once, each turn "<|im_start|>role\n...", ended
# by EOS (the token the model ends its own turn with, an eos id of generation_config.json).
# transformers' apply_chat_template renders it to the same text and ids as daemon.serving.
TINY_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + eos_token + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def tiny_config(
    family: str = "llama",
    *,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 258,
    max_positions: int = 512,
    tie: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    head_dim: int | None = None,
    attention_bias: bool = False,
    sliding_window: int | None = None,
    max_window_layers: int = 0,
    layer_types: tuple[str, ...] = (),
    experts: int | None = None,
    experts_per_token: int | None = None,
    expert_intermediate: int | None = None,
    norm_topk_prob: bool = False,
    decoder_sparse_step: int = 1,
    mlp_only_layers: tuple[int, ...] = (),
) -> ModelConfig:
    """The config of a tiny checkpoint of `family` (`families.FAMILIES`).

    `sliding_window`: the attention window (Mistral: every layer; Qwen2/Qwen3: the layers
    from `max_window_layers` on, as `use_sliding_window` does); `layer_types` (Mistral,
    Qwen2, Qwen3): which layers slide, "full_attention" or "sliding_attention" for each
    layer, written to config.json as such. `attention_bias`: biases
    on all four projections, for the families whose config reads it (Llama, Qwen3).
    Mixture-of-experts families (qwen3_moe, mixtral): `experts` (4 by default) of
    `expert_intermediate` (64; Mixtral's `intermediate_size`), `experts_per_token` (2) routed
    per token; Qwen3-MoE's `norm_topk_prob`, `decoder_sparse_step` and `mlp_only_layers`
    (dense layers, of `intermediate`).
    """
    spec = FAMILIES.get(family)
    if spec is None:
        raise ModelError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
    if sliding_window is not None and spec.window == "none":
        raise ModelError(f"family {family!r} has no sliding window")
    if attention_bias and FROM_CONFIG not in (spec.qkv_bias, spec.o_bias):
        raise ModelError(f"family {family!r} does not read attention_bias")
    moe = None
    if spec.mlp == "moe":
        raw: dict[str, Any] = {
            "num_hidden_layers": layers,
            "num_experts_per_tok": experts_per_token or 2,
        }
        if family == "mixtral":
            intermediate = expert_intermediate or 64
            raw.update(num_local_experts=experts or 4, intermediate_size=intermediate)
        else:
            raw.update(
                num_experts=experts or 4,
                moe_intermediate_size=expert_intermediate or 64,
                norm_topk_prob=norm_topk_prob,
                decoder_sparse_step=decoder_sparse_step,
                mlp_only_layers=list(mlp_only_layers),
                intermediate_size=intermediate,
            )
        moe = parse_moe(raw, family)
    elif (experts, experts_per_token, expert_intermediate) != (None, None, None) or (
        mlp_only_layers
    ):
        raise ModelError(f"family {family!r} has no experts")
    types: tuple[str, ...] = ()
    if layer_types:
        if spec.window not in ("per_layer", "layer_types"):
            raise ModelError(f"family {family!r} reads no layer_types")
        types = tuple(layer_types)
    elif spec.window == "per_layer":
        if not 0 <= max_window_layers <= layers:
            raise ModelError(f"max_window_layers must be in [0, {layers}]")
        sliding = sliding_window is not None
        types = tuple(
            SLIDING if sliding and i >= max_window_layers else FULL for i in range(layers)
        )
    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        rms_norm_eps=1e-5,
        rope_theta=rope_theta,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie,
        rope_scaling=rope_scaling,
        head_dim=head_dim or 0,
        family=family,
        qkv_bias=spec.qkv_bias == ALWAYS or (spec.qkv_bias == FROM_CONFIG and attention_bias),
        o_bias=spec.o_bias == ALWAYS or (spec.o_bias == FROM_CONFIG and attention_bias),
        qk_norm=spec.qk_norm,
        sliding_window=sliding_window,
        layer_types=types,
        moe=moe,
    )


def make_tiny(
    out_dir: str | os.PathLike[str],
    *,
    family: str = "llama",
    head_dim: int | None = None,
    attention_bias: bool = False,
    sliding_window: int | None = None,
    max_window_layers: int = 0,
    layer_types: tuple[str, ...] = (),
    experts: int | None = None,
    experts_per_token: int | None = None,
    expert_intermediate: int | None = None,
    norm_topk_prob: bool = False,
    decoder_sparse_step: int = 1,
    mlp_only_layers: tuple[int, ...] = (),
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 258,
    max_positions: int = 512,
    seed: int = 0,
    dtype: str = "float32",
    tie: bool = False,
    shards: int = 1,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
) -> Path:
    """Write a small deterministic random checkpoint of `family` in the Hugging Face layout
    (`tiny_config` says what the family arguments do).

    Same arguments, same bytes. Weights are drawn at a trained model's scale (std 0.02,
    norm weights near 1) so logits and attention are not degenerate. `shards > 1` writes
    `model-0000k-of-0000N.safetensors` files and `model.safetensors.index.json`.
    `chat_template` (TINY_CHAT_TEMPLATE by default) goes into `tokenizer_config.json`, with
    the byte vocabulary's BOS and EOS as bos_token/eos_token, so that chat requests work on
    the checkpoint as it is; None writes no `tokenizer_config.json`.
    """
    from safetensors.torch import save_file

    if vocab < 258:
        raise ModelError("vocab must be >= 258 (256 bytes + BOS + EOS)")
    config = tiny_config(
        family,
        layers=layers,
        hidden=hidden,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        max_positions=max_positions,
        tie=tie,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        head_dim=head_dim,
        attention_bias=attention_bias,
        sliding_window=sliding_window,
        max_window_layers=max_window_layers,
        layer_types=layer_types,
        experts=experts,
        experts_per_token=experts_per_token,
        expert_intermediate=expert_intermediate,
        norm_topk_prob=norm_topk_prob,
        decoder_sparse_step=decoder_sparse_step,
        mlp_only_layers=mlp_only_layers,
    )
    if ModelConfig.from_dict(config.to_json()) != config:  # what is written reads back
        raise ModelError(f"internal: the {family} config does not read back as written")
    torch_dtype = to_dtype(dtype)
    shapes = config.tensor_shapes()
    if not 1 <= shards <= len(shapes):
        raise ModelError(f"shards must be in [1, {len(shapes)}]")
    generator = torch.Generator().manual_seed(seed)
    tensors: dict[str, Tensor] = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight"):  # norm weights around 1
            value = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        elif name.endswith(".gate.weight"):
            # a router at a trained model's contrast: at 0.02 every expert would score about
            # 1/E and the top-k would turn on differences of float rounding
            value = 0.5 * torch.randn(shape, generator=generator)
        else:
            value = 0.02 * torch.randn(shape, generator=generator)
        tensors[name] = value.to(torch_dtype).contiguous()

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("model*.safetensors"), out / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    metadata = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata=metadata)
    else:
        names = list(tensors)
        weight_map = {}
        for k in range(shards):
            part = names[k * len(names) // shards : (k + 1) * len(names) // shards]
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, str(out / file), metadata=metadata)
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        _write_json(out / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map})

    hf_config = config.to_json()
    hf_config.update(
        {
            "bos_token_id": BYTE_BOS_ID,
            "eos_token_id": BYTE_EOS_ID,
            "torch_dtype": dtype,
            "initializer_range": 0.02,
            "use_cache": True,
        }
    )
    _write_json(out / CONFIG_FILE, hf_config)
    _write_json(
        out / GENERATION_FILE,
        {"bos_token_id": BYTE_BOS_ID, "eos_token_id": BYTE_EOS_ID, "do_sample": False},
    )
    _write_json(out / TOKENIZER_FILE, byte_tokenizer_json())
    if chat_template is not None:
        _write_json(
            out / TOKENIZER_CONFIG_FILE,
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": BYTE_BOS,
                "eos_token": BYTE_EOS,
                "clean_up_tokenization_spaces": False,
                "model_max_length": max_positions,
                "chat_template": chat_template,
            },
        )
    return out
