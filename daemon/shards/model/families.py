"""The model families gridmesh serves, each a description of what differs from Llama.

Every family here is a Llama decoder (RMSNorm, rotary, grouped-query attention, SwiGLU) with
a few switches, read from `config.json` as transformers reads them for that `model_type`:
biases on the projections, an RMSNorm per attention head on queries and keys (Qwen3), a
sliding attention window (Mistral; Qwen2/Qwen3 with `use_sliding_window`), a mixture of
experts in place of the MLP (Qwen3-MoE, Mixtral: `moe.MoESpec`, `moe.SparseMoE`).
`config.ModelConfig.from_dict` applies them.
"""

from __future__ import annotations

from dataclasses import dataclass

# The switches a family's projections may have.
NEVER, ALWAYS, FROM_CONFIG = "never", "always", "attention_bias"

# Fields of every config.json that say nothing about the computation (metadata, training
# settings, generation defaults): read by no family, accepted by all.
METADATA_FIELDS = frozenset(
    {
        "_name_or_path",
        "architectures",
        "attention_dropout",
        "bos_token_id",
        "dtype",
        "eos_token_id",
        "initializer_range",
        "model_type",
        "pad_token_id",
        "pretraining_tp",  # a training detail: transformers 5 ignores it
        "torch_dtype",
        "transformers_version",
        "use_cache",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "tie_word_embeddings",
    }
)

# Fields every family reads (config.ModelConfig.from_dict).
COMMON_FIELDS = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "max_position_embeddings",
    }
)

_QWEN_WINDOW = frozenset(
    {"use_sliding_window", "sliding_window", "max_window_layers", "layer_types"}
)
_MOE_FIELDS = frozenset(
    {
        "decoder_sparse_step",
        "mlp_only_layers",
        "moe_intermediate_size",
        "num_experts",
        "num_local_experts",
        "num_experts_per_tok",
        "norm_topk_prob",
        "output_router_logits",
        "router_aux_loss_coef",
    }
)


@dataclass(frozen=True)
class Family:
    """What a family changes in the Llama decoder, and the config fields it reads.

    `qkv_bias` / `o_bias`: NEVER, ALWAYS, or FROM_CONFIG (the `attention_bias` field).
    `window`: how the sliding window is read: "none" (no window), "every_layer" (the
    `sliding_window` field for all layers, gated by `window_flag` if set), "layer_types"
    (the layers `layer_types` names sliding, else every layer: transformers reads a Mistral
    config with `layer_types` as Ministral, whose layers alternate) or "per_layer" (gated by
    `window_flag`; the layers from `layer_types`, else those from `max_window_layers` on, as
    transformers' Qwen2/Qwen3 configs compute them).
    `default_head_dim`: the head size when config.json has no `head_dim` (None: hidden /
    heads). `default_window`: `sliding_window` when the field is absent.
    """

    name: str
    model_types: tuple[str, ...]
    architecture: str
    qkv_bias: str = NEVER
    o_bias: str = NEVER
    qk_norm: bool = False
    window: str = "none"
    window_flag: str | None = None
    default_window: int | None = None
    default_head_dim: int | None = None
    default_max_window_layers: int = 28
    mlp: str = "dense"  # "dense" | "moe"
    fields: frozenset[str] = frozenset()

    @property
    def known_fields(self) -> frozenset[str]:
        """Every config.json field this family accepts (others are refused)."""
        return METADATA_FIELDS | COMMON_FIELDS | self.fields


FAMILIES: dict[str, Family] = {
    family.name: family
    for family in (
        Family(
            "llama",
            ("llama",),
            "LlamaForCausalLM",
            qkv_bias=FROM_CONFIG,
            o_bias=FROM_CONFIG,
            fields=frozenset({"attention_bias", "mlp_bias"}),
        ),
        Family(
            "qwen2",
            ("qwen2",),
            "Qwen2ForCausalLM",
            qkv_bias=ALWAYS,
            window="per_layer",
            window_flag="use_sliding_window",
            default_window=4096,
            fields=_QWEN_WINDOW | {"use_mrope"},
        ),
        Family(
            "qwen3",
            ("qwen3",),
            "Qwen3ForCausalLM",
            qkv_bias=FROM_CONFIG,
            o_bias=FROM_CONFIG,
            qk_norm=True,
            window="per_layer",
            window_flag="use_sliding_window",
            default_window=4096,
            default_head_dim=128,
            fields=_QWEN_WINDOW | {"attention_bias"},
        ),
        # the window on the layers `layer_types` names (every layer without it); "ministral"
        # is what transformers makes of a "mistral" config with `layer_types`
        Family(
            "mistral",
            ("mistral", "ministral"),
            "MistralForCausalLM",
            window="layer_types",
            default_window=4096,
            fields=frozenset({"sliding_window", "layer_types"}),
        ),
        # Qwen3's attention (head_dim defaults to hidden / heads here), a sparse block in
        # each layer but `mlp_only_layers` and those off `decoder_sparse_step`; the window,
        # when `use_sliding_window`, on every layer (`max_window_layers` is read by nothing)
        Family(
            "qwen3_moe",
            ("qwen3_moe",),
            "Qwen3MoeForCausalLM",
            qkv_bias=FROM_CONFIG,
            o_bias=FROM_CONFIG,
            qk_norm=True,
            window="every_layer",
            window_flag="use_sliding_window",
            default_window=4096,
            mlp="moe",
            fields=_MOE_FIELDS
            | {"attention_bias", "use_sliding_window", "sliding_window", "max_window_layers"},
        ),
        # Mistral's attention (no window unless `sliding_window` is set), a sparse block of
        # `num_local_experts` experts of `intermediate_size` in every layer
        Family(
            "mixtral",
            ("mixtral",),
            "MixtralForCausalLM",
            window="every_layer",
            mlp="moe",
            fields=_MOE_FIELDS | {"sliding_window", "router_jitter_noise"},
        ),
    )
}

ARCHITECTURES = {family.architecture: family for family in FAMILIES.values()}
MODEL_TYPES = {t: family for family in FAMILIES.values() for t in family.model_types}


def family_names() -> list[str]:
    return list(FAMILIES)
