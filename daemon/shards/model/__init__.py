"""Llama-family decoders (Llama, Qwen2/2.5, Qwen3, Mistral, Qwen3-MoE, Mixtral) in plain torch
that can be cut into contiguous ranges of layers.

Each daemon loads one shard, layers `[start, end)`, straight from a Hugging Face style
safetensors checkpoint, reading only that shard's tensors. The maths follows transformers'
`LlamaForCausalLM` step by step (RMSNorm in float32, rotary embeddings computed in float32
and cast, grouped-query attention through `scaled_dot_product_attention`), with what each
family changes (`families`: biases, q/k norms, a sliding window, experts) as transformers
computes it for that family, so a chain of shards gives the same logits as the whole model
in transformers.

Tensor names in a checkpoint (and the `checkpoint_names()` of a shard) are the Hugging Face
ones: `model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ...,
`model.norm.weight`, `lm_head.weight`.

Modules, each importing only those above it:
- `families`: what each family (llama, qwen2, qwen3, mistral, qwen3_moe, mixtral) changes in
  the Llama decoder
- `config`: `config.json` parsing (`ModelConfig`, alias `LlamaConfig`), dtypes, tensor names
  and sizes, `ModelError`
- `kvcache`: the preallocated KV cache of one shard (a ring for sliding-window layers)
- `moe`: mixture-of-experts blocks (`MoESpec` from config.json, `SparseMoE`)
- `layers`: RMSNorm, rotary frequencies, attention, MLP, decoder layer
- `shard`: `LlamaShard`, layers `[start, end)` and the eager forward pass
- `checkpoint`: loading shards from safetensors files
- `decode`: fixed-shape one-token steps, replayed as CUDA graphs on a GPU
- `generate`: the single-process reference generation loop
- `tokenizer`: `tokenizer.json` reading, byte-level or through `tokenizers`
- `tiny`: small deterministic random checkpoints for tests and demos
- `planning`: a checkpoint's sizes as the shard planner counts them (weights, KV per token,
  windows)

This package re-exports the public names callers use: `from daemon.shards.model import ...`.
"""

from daemon.shards.model import config
from daemon.shards.model.checkpoint import Checkpoint, inspect_checkpoint, load_model, load_shard
from daemon.shards.model.config import (
    CONFIG_FILE,
    DTYPE_BYTES,
    DTYPES,
    FULL,
    GENERATION_FILE,
    INDEX_FILE,
    ROPE_TYPES,
    SINGLE_FILE,
    SLIDING,
    TOKENIZER_FILE,
    LlamaConfig,
    ModelConfig,
    ModelError,
    dtype_name,
    shard_tensor_names,
    to_dtype,
)
from daemon.shards.model.decode import StaticDecoder
from daemon.shards.model.families import FAMILIES, Family
from daemon.shards.model.generate import greedy_generate, stop_ids
from daemon.shards.model.kvcache import KVCache, KVCacheFull
from daemon.shards.model.layers import rope_inv_freq
from daemon.shards.model.moe import MoESpec, SparseMoE
from daemon.shards.model.planning import model_spec, plan_sizes
from daemon.shards.model.shard import LlamaShard
from daemon.shards.model.tiny import make_tiny, tiny_config
from daemon.shards.model.tokenizer import (
    BYTE_BOS,
    BYTE_BOS_ID,
    BYTE_EOS,
    BYTE_EOS_ID,
    Tokenizer,
    byte_tokenizer_json,
    load_tokenizer,
)

__all__ = [
    "BYTE_BOS",
    "BYTE_BOS_ID",
    "BYTE_EOS",
    "BYTE_EOS_ID",
    "CONFIG_FILE",
    "DTYPES",
    "FAMILIES",
    "FULL",
    "SLIDING",
    "Family",
    "ModelConfig",
    "DTYPE_BYTES",
    "GENERATION_FILE",
    "INDEX_FILE",
    "ROPE_TYPES",
    "SINGLE_FILE",
    "TOKENIZER_FILE",
    "Checkpoint",
    "KVCache",
    "KVCacheFull",
    "LlamaConfig",
    "LlamaShard",
    "ModelError",
    "MoESpec",
    "SparseMoE",
    "StaticDecoder",
    "Tokenizer",
    "byte_tokenizer_json",
    "dtype_name",
    "greedy_generate",
    "inspect_checkpoint",
    "load_model",
    "load_shard",
    "load_tokenizer",
    "make_tiny",
    "model_spec",
    "plan_sizes",
    "rope_inv_freq",
    "shard_tensor_names",
    "stop_ids",
    "tiny_config",
    "to_dtype",
]

# config.py cannot import moe.py (which imports it): the parser of sparse blocks is given here
config.set_moe_parser(MoESpec.from_config)
