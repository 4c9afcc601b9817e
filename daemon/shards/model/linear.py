"""The linear layer of every block: `x @ weight.T (+ bias)`, with the fastest exact CPU kernel.

On a CPU, float32, torch's `F.linear` goes through MKL's GEMM/GEMV, which on the shapes of
a decode step (a few rows against a large weight) reads the weight at a third of the memory
bandwidth that oneDNN's matmul reaches (`python bench/batching.py --linear --hidden 2048`,
a 5632x2048 weight on 2 cores: 1 row 2.4 ms vs 0.7 ms, 8 rows 6.2 ms vs 2.2 ms). oneDNN is
torch's own (`torch.ops.mkldnn._linear_pointwise`, what torch.compile emits for CPU linears);
it takes the weight as it is, so nothing is copied or repacked. Both compute the same float32
dot products in a different summation order (differences ~1e-6, as between MKL's own batch
sizes); GPUs and other dtypes keep `F.linear`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
_pointwise = torch.ops.mkldnn._linear_pointwise if _ONEDNN else None


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """`F.linear`, through oneDNN for float32 on a CPU."""
    if _ONEDNN and x.device.type == "cpu" and x.dtype == torch.float32 == weight.dtype:
        return _pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Module):
    """A frozen linear layer (weights taken as given, optional bias)."""

    def __init__(self, weight: Tensor, bias: Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
