"""The linear layer of every block: `x @ weight.T (+ bias)`, with the fastest exact CPU kernel.

On a CPU, float32, torch's `F.linear` goes through MKL's GEMM/GEMV, which on the shapes of
a decode step (a few rows against a large weight) reads the weight at a third of the memory
bandwidth that oneDNN's matmul reaches (`python bench/batching.py --linear --hidden 2048`,
a 5632x2048 weight on 2 cores: 1 row 2.4 ms vs 0.7 ms, 8 rows 6.2 ms vs 2.2 ms). oneDNN is
torch's own (`torch.ops.mkldnn._linear_pointwise`, what torch.compile emits for CPU linears);
it takes the weight as it is, so nothing is copied or repacked. Both compute the same float32
dot products in a different summation order (differences ~1e-6, as between MKL's own batch
sizes); GPUs and other dtypes keep `F.linear`.

A server that usually batches (continuous batching: several sessions' rows per product)
may also reorder each weight once, at load, into oneDNN's blocked layout for products of
about `PACKED_ROWS` rows (`pack_linears`, `[shards] batched_layout = true`; the plain copy is
dropped, so memory stays the same). On 2 cores, one thread, a 5632x2048 weight, quiet
machine: 8 rows 6.0 -> 2.7 ms and 16 rows 10.0 -> 4.1 ms, but a lone row 1.5 -> 2.0 ms; at
load 3: 8 rows 4.5 -> 3.3, 16 rows 6.1 -> 4.4, 2 rows 3.3 -> 4.0, a lone row 2.2 -> 3.3 ms.
So it is off by default: a lone user's steps would be slower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_pointwise = torch.ops.mkldnn._linear_pointwise if _ONEDNN else None
PACKED_ROWS = 8  # the product size oneDNN's blocked layout is chosen for (8 and 16 do alike)


def _onednn_ok(tensor: Tensor) -> bool:
    return _ONEDNN and tensor.device.type == "cpu" and tensor.dtype == torch.float32


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, through oneDNN for float32 on a CPU."""
    if _onednn_ok(x) and _onednn_ok(weight):
        return _pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """A frozen linear layer (weights taken as given, optional bias)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._packed: Tensor | None = None

    @property
    def packed(self) -> bool:
        return self._packed is not None

    def pack(self, rows: int = PACKED_ROWS) -> bool:
        """Reorder the weight into oneDNN's blocked layout for products of about `rows` rows,
        dropping the plain copy (`weight` becomes a meta tensor of the same shape and dtype,
        so byte counts over the parameters still hold). CPU float32 only; False if not packed."""
        if self.packed or not _onednn_ok(self.weight):
            return False
        self._packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), rows)
        shape_only = torch.empty_like(self.weight, device="meta")
        self.weight = nn.Parameter(shape_only, requires_grad=False)
        return True

    def forward(self, x: Tensor) -> Tensor:
        if self._packed is not None:
            if not _onednn_ok(x):
                raise ValueError(f"a packed CPU float32 layer got {x.dtype} on {x.device}")
            return _pointwise(x, self._packed, self.bias, "none", [], "")
        return linear(x, self.weight, self.bias)


def pack_linears(module: nn.Module, rows: int = PACKED_ROWS) -> int:
    """`Linear.pack` every linear layer of `module` whose weight no other layer shares (a
    head tied to the embedding keeps its plain weight: the embedding needs it) and that is
    not inside a module whose class sets `PACK_LINEARS = False` (a mixture of experts: each
    expert sees a few rows of a batch, where the plain layout is faster). Returns how many
    were packed."""
    counts: dict[int, int] = {}
    for _, param in module.named_parameters(remove_duplicate=False):
        counts[id(param)] = counts.get(id(param), 0) + 1
    kept = [m for m in module.modules() if not getattr(m, "PACK_LINEARS", True)]
    plain = {id(layer) for m in kept for layer in m.modules()}
    layers = [
        m for m in module.modules() if isinstance(m, Linear) and not m.packed and id(m) not in plain
    ]
    return sum(layer.pack(rows) for layer in layers if counts.get(id(layer.weight)) == 1)
