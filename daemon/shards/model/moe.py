"""Mixture-of-experts blocks (Qwen3-MoE, Mixtral): the config, the weight names, the routing.

A sparse block replaces a decoder layer's MLP: a router (`gate`, `[experts, hidden]`) scores
every token, the `top_k` best experts (each a SwiGLU MLP of `expert_intermediate_size`) run on
the tokens routed to them only, and their outputs are summed with the routing weights. As
transformers 5 computes it:

- router logits `x @ gate.T` in the input dtype; softmax in float32; top-k of the
  probabilities (ties: torch.topk); with `renormalize` (Qwen3-MoE `norm_topk_prob`, always for
  Mixtral) the k weights are divided by their sum, in float32;
- Qwen3-MoE casts the weights back to the input dtype before they scale the experts' outputs;
  Mixtral keeps them in float32 (so the weighted outputs and their sum are float32, cast once);
- each token's k weighted outputs are summed over its k slots (transformers' default
  "grouped_mm" experts path; its "eager" path adds them in expert order instead: the same sum
  in another order, equal within float rounding).

Weight layouts. The Hub checkpoints, and what transformers 5.23 `save_pretrained` writes by
default (it converts back to the "original format"), hold one tensor per expert and matrix:
  qwen3_moe: `mlp.gate.weight [E, h]`, `mlp.experts.{e}.{gate,up}_proj.weight [I, h]`,
             `mlp.experts.{e}.down_proj.weight [h, I]`
  mixtral:   `block_sparse_moe.gate.weight [E, h]`, `block_sparse_moe.experts.{e}.w1.weight`
             (gate) and `w3` (up) `[I, h]`, `w2` (down) `[h, I]`
In memory transformers 5 fuses them (`mlp.experts.gate_up_proj [E, 2I, h]`, gate rows first,
then up; `mlp.experts.down_proj [E, h, I]`; Mixtral's block renamed to `mlp.`), and
`save_pretrained(save_original_format=False)` writes that fused layout. Both are read here:
`MoESpec.layer_shapes(..., fused=...)` names either, `MoESpec.checkpoint_layer_shapes` picks
the one a checkpoint holds, and `SparseMoE` takes either (fused tensors are split into
per-expert views, nothing is copied). The experts stay separate weights either way.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from daemon.shards.model.config import ModelError, check_shape
from daemon.shards.model.linear import Linear

# model_type -> the names of one expert's (gate, up, down) matrices in the per-expert layout,
# and the prefix of the block in a layer.
_EXPERT_NAMES = {
    "qwen3_moe": ("gate_proj", "up_proj", "down_proj"),
    "mixtral": ("w1", "w3", "w2"),
}
_PREFIX = {"qwen3_moe": "mlp.", "mixtral": "block_sparse_moe."}
FUSED_PREFIX = "mlp."  # transformers 5's in-memory (and save_original_format=False) names
LAYOUTS = tuple(_EXPERT_NAMES)


def _field(raw: Mapping[str, Any], key: str, default: Any = None) -> Any:
    value = raw.get(key, default)
    return default if value is None else value


def _int(raw: Mapping[str, Any], key: str, default: int | None = None, minimum: int = 1) -> int:
    value = _field(raw, key, default)
    if value is None:
        raise ModelError(f"config.json: missing field {key!r}")
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelError(f"config.json: {key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(raw: Mapping[str, Any], key: str, default: bool) -> bool:
    value = _field(raw, key, default)
    if not isinstance(value, bool):
        raise ModelError(f"config.json: {key} must be a boolean, got {value!r}")
    return value


def _num_experts(raw: Mapping[str, Any]) -> int:
    """`num_experts` (the Hub's Qwen3-MoE name) or `num_local_experts` (Mixtral's, and what
    transformers 5 writes for both: it maps one onto the other)."""
    names = [key for key in ("num_experts", "num_local_experts") if raw.get(key) is not None]
    if not names:
        raise ModelError("config.json: missing field 'num_experts' (or 'num_local_experts')")
    values = {key: _int(raw, key) for key in names}
    if len(set(values.values())) > 1:
        raise ModelError(
            f"config.json: num_experts {values['num_experts']} and num_local_experts "
            f"{values['num_local_experts']} disagree"
        )
    return values[names[0]]


@dataclass(frozen=True)
class MoESpec:
    """What a mixture-of-experts family's config says about its sparse blocks.

    `layout` is the family (`model_type`) whose names and cast order are used. Layer `i` is
    sparse unless it is in `mlp_only_layers` or `(i + 1) % decoder_sparse_step != 0`
    (Qwen3-MoE); a dense layer has a plain MLP of `dense_intermediate_size`.
    """

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    renormalize: bool
    layout: str
    num_layers: int
    dense_intermediate_size: int = 0  # 0: every layer is sparse
    decoder_sparse_step: int = 1
    mlp_only_layers: frozenset[int] = frozenset()
    # Routing weights kept in float32 when scaling the experts' outputs (Mixtral), or cast to
    # the input dtype first (Qwen3-MoE).
    float32_weights: bool = False

    def __post_init__(self) -> None:
        if self.layout not in _EXPERT_NAMES:
            raise ModelError(f"unsupported mixture-of-experts layout {self.layout!r}")
        for key in ("num_experts", "top_k", "expert_intermediate_size", "num_layers"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ModelError(f"config.json: {key} must be an integer >= 1, got {value!r}")
        if self.top_k > self.num_experts:
            raise ModelError(
                f"config.json: num_experts_per_tok {self.top_k} is more than num_experts "
                f"{self.num_experts}"
            )
        for layer in self.mlp_only_layers:
            if not 0 <= layer < self.num_layers:
                raise ModelError(
                    f"config.json: mlp_only_layers has {layer}, not a layer of "
                    f"[0, {self.num_layers})"
                )
        if self.dense_intermediate_size < 1 and any(
            not self.is_moe_layer(i) for i in range(self.num_layers)
        ):
            raise ModelError("config.json: intermediate_size is needed by the dense layers")

    @classmethod
    def from_config(cls, raw: Mapping[str, Any], model_type: str) -> MoESpec:
        """The sparse blocks of a parsed `config.json`; a `ModelError` names a bad field."""
        if not isinstance(raw, Mapping):
            raise ModelError("config.json: expected a JSON object")
        if model_type not in _EXPERT_NAMES:
            raise ModelError(
                f"config.json: model_type {model_type!r} has no mixture-of-experts layout "
                f"here; supported: {', '.join(LAYOUTS)}"
            )
        act = _field(raw, "hidden_act", "silu")
        if act != "silu":
            raise ModelError(f"config.json: unsupported hidden_act {act!r}")
        num_experts = _num_experts(raw)
        top_k = _int(raw, "num_experts_per_tok")
        layers = _int(raw, "num_hidden_layers")
        if model_type == "mixtral":
            return cls(
                num_experts=num_experts,
                top_k=top_k,
                expert_intermediate_size=_int(raw, "intermediate_size"),
                renormalize=True,
                layout=model_type,
                num_layers=layers,
                float32_weights=True,
            )
        only = _field(raw, "mlp_only_layers", [])
        if not isinstance(only, list) or any(
            isinstance(i, bool) or not isinstance(i, int) for i in only
        ):
            raise ModelError(
                f"config.json: mlp_only_layers must be a list of integers, got {only!r}"
            )
        dense = raw.get("intermediate_size")
        return cls(
            num_experts=num_experts,
            top_k=top_k,
            expert_intermediate_size=_int(raw, "moe_intermediate_size"),
            renormalize=_bool(raw, "norm_topk_prob", False),
            layout=model_type,
            num_layers=layers,
            dense_intermediate_size=0 if dense is None else _int(raw, "intermediate_size"),
            decoder_sparse_step=_int(raw, "decoder_sparse_step", 1),
            mlp_only_layers=frozenset(only),
        )

    # Layers and names ------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        """The block's prefix in a layer, per-expert layout (`mlp.` or `block_sparse_moe.`)."""
        return _PREFIX[self.layout]

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` has a sparse block (else a dense MLP)."""
        if not 0 <= layer < self.num_layers:
            raise ModelError(f"layer {layer} is not inside [0, {self.num_layers})")
        if layer in self.mlp_only_layers:
            return False
        return (layer + 1) % self.decoder_sparse_step == 0

    def layer_shapes(
        self, hidden: int, layer: int, *, fused: bool = False
    ) -> dict[str, tuple[int, ...]]:
        """The block's tensors of layer `layer`, by name relative to the layer: the router and
        every expert (all count for memory, whichever a token uses), per expert as on the Hub
        or `fused` as transformers holds them; a dense layer's MLP (`mlp.gate_proj.weight`,
        ...) when the layer is not sparse."""
        if not self.is_moe_layer(layer):
            inter = self.dense_intermediate_size
            return {
                "mlp.gate_proj.weight": (inter, hidden),
                "mlp.up_proj.weight": (inter, hidden),
                "mlp.down_proj.weight": (hidden, inter),
            }
        return self.block_shapes(hidden, fused=fused)

    def block_shapes(self, hidden: int, *, fused: bool = False) -> dict[str, tuple[int, ...]]:
        """A sparse block's tensors (alike in every sparse layer), by name relative to the
        layer: the router and every expert, per expert as on the Hub or `fused` as
        transformers 5 holds them."""
        e, inter = self.num_experts, self.expert_intermediate_size
        if fused:
            return {
                f"{FUSED_PREFIX}gate.weight": (e, hidden),
                f"{FUSED_PREFIX}experts.gate_up_proj": (e, 2 * inter, hidden),
                f"{FUSED_PREFIX}experts.down_proj": (e, hidden, inter),
            }
        gate, up, down = _EXPERT_NAMES[self.layout]
        shapes: dict[str, tuple[int, ...]] = {f"{self.prefix}gate.weight": (e, hidden)}
        for i in range(e):
            base = f"{self.prefix}experts.{i}."
            shapes[f"{base}{gate}.weight"] = (inter, hidden)
            shapes[f"{base}{up}.weight"] = (inter, hidden)
            shapes[f"{base}{down}.weight"] = (hidden, inter)
        return shapes

    def checkpoint_layer_shapes(
        self, hidden: int, layer: int, has: Callable[[str], bool]
    ) -> dict[str, tuple[int, ...]]:
        """`layer_shapes` in the layout a checkpoint holds: `has(name)` tells whether the
        checkpoint has a tensor (name relative to the layer). Per expert unless the fused
        `mlp.experts.gate_up_proj` is there; a checkpoint with neither gets the per-expert
        names, so that the missing tensor reported is the Hub's name."""
        fused = self.is_moe_layer(layer) and has(f"{FUSED_PREFIX}experts.gate_up_proj")
        return self.layer_shapes(hidden, layer, fused=fused)

    def block_weights(self, layer_weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The tensors of a layer's sparse block, relative to the block (what `SparseMoE`
        takes), from the layer's tensors (names relative to the layer, either layout)."""
        prefixes = {self.prefix, FUSED_PREFIX}
        out = {}
        for name, tensor in layer_weights.items():
            for prefix in prefixes:
                if name.startswith(prefix):
                    out[name[len(prefix) :]] = tensor
        return out

    def layer_params(self, hidden: int, layer: int) -> int:
        """Parameters of the block (or dense MLP) of `layer`: every expert counts."""
        total = 0
        for shape in self.layer_shapes(hidden, layer).values():
            count = 1
            for size in shape:
                count *= size
            total += count
        return total


class Expert(nn.Module):
    """One expert: a SwiGLU MLP, `down(silu(gate(x)) * up(x))`."""

    def __init__(self, gate: Tensor, up: Tensor, down: Tensor) -> None:
        super().__init__()
        self.gate_proj = Linear(gate)
        self.up_proj = Linear(up)
        self.down_proj = Linear(down)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class SparseMoE(nn.Module):
    """A sparse mixture-of-experts block, computing each expert on its tokens only."""

    # A batching server leaves the experts' weights in the plain layout (linear.pack_linears):
    # each expert gets a few rows of a batch, and the blocked layout is slower there (one
    # thread, 16 experts of 768, hidden 2048: 1 token 25 -> 48 ms packed, 8 tokens 119 -> 112).
    PACK_LINEARS = False

    def __init__(self, spec: MoESpec, hidden: int, weights: Mapping[str, Tensor]) -> None:
        """`weights` relative to the block (`gate.weight`, `experts.{e}.gate_proj.weight`, ...
        or the fused `experts.gate_up_proj` and `experts.down_proj`; `MoESpec.block_weights`
        gives them from a layer's tensors). Missing, extra or misshapen tensors are refused."""
        super().__init__()
        self.spec = spec
        self.hidden = hidden
        e, inter = spec.num_experts, spec.expert_intermediate_size
        fused = "experts.gate_up_proj" in weights
        if fused and any(name.startswith("experts.0.") for name in weights):
            raise ModelError(
                "the expert block mixes the fused (experts.gate_up_proj) and per-expert "
                "(experts.{e}....weight) layouts"
            )
        prefix = FUSED_PREFIX if fused else spec.prefix
        want = {
            name[len(prefix) :]: shape
            for name, shape in spec.block_shapes(hidden, fused=fused).items()
        }
        missing = [name for name in want if name not in weights]
        if missing:
            raise ModelError(f"missing tensor {missing[0]!r} of the expert block")
        extra = sorted(name for name in weights if name not in want)
        if extra:
            raise ModelError(f"unexpected tensors in the expert block: {', '.join(extra[:4])}")
        for name, shape in want.items():
            check_shape(name, tuple(weights[name].shape), shape)
        self.gate = nn.Parameter(weights["gate.weight"], requires_grad=False)
        if fused:
            gate_up, down = weights["experts.gate_up_proj"], weights["experts.down_proj"]
            parts = [(gate_up[i, :inter], gate_up[i, inter:], down[i]) for i in range(e)]
        else:
            g, u, d = _EXPERT_NAMES[spec.layout]
            parts = [
                tuple(weights[f"experts.{i}.{name}.weight"] for name in (g, u, d)) for i in range(e)
            ]
        self.experts = nn.ModuleList(Expert(*part) for part in parts)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The experts of each token and their weights, `[tokens, top_k]` each (tokens of
        `x` `[..., hidden]` flattened), best first. The router's product is `F.linear` as in
        transformers (the same logits, bit for bit, on the same input)."""
        flat = x.reshape(-1, self.hidden)
        logits = F.linear(flat, self.gate)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, ids = torch.topk(probs, self.spec.top_k, dim=-1)
        if self.spec.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.spec.float32_weights:
            weights = weights.to(logits.dtype)
        return ids, weights

    def forward(self, x: Tensor) -> Tensor:
        """`[..., hidden]` -> `[..., hidden]`: each token through its `top_k` experts."""
        shape = x.shape
        flat = x.reshape(-1, self.hidden)
        ids, weights = self.route(flat)
        tokens, k = ids.shape
        # Token-slot pairs grouped by expert: each expert computes its rows in one product.
        slots = ids.reshape(-1)
        order = torch.argsort(slots, stable=True)
        experts, counts = torch.unique_consecutive(slots[order], return_counts=True)
        out = torch.empty(tokens * k, self.hidden, dtype=x.dtype, device=x.device)
        start = 0
        for expert, count in zip(experts.tolist(), counts.tolist(), strict=True):
            pairs = order[start : start + count]
            start += count
            out[pairs] = self.experts[expert](flat[pairs // k])
        weighted = out.view(tokens, k, self.hidden) * weights[..., None]
        return weighted.sum(dim=1).to(x.dtype).view(shape)
