"""Whether two computations of one step agree.

On CPU in float32 a replica that ran the same chunks with the same kernels returns the same
bits. A check cannot always repeat the provider's chunks (the replica catches up on earlier
positions in one pass, the provider may have batched the step with other sessions), and the
order of float sums then differs: measured on the tiny test model (float32, CPU), a position
computed after a one-pass catch-up differs from the same position computed step by step by at
most 6e-7 of the row's largest magnitude (`bench/verify.py` prints the measured spread).
So outputs agree when, for every position, the largest difference is within `rtol` of the
largest magnitude of the reference's row; float32's bound, 1e-5, is about 20x the measured
spread. The half-precision bounds were not measured here (no GPU in this run): they are set
from the formats' rounding (bf16 keeps 8 bits: 2^-8 = 4e-3 per rounding, accumulated over a
range's layers) and should be re-measured where such providers run.
"""

from __future__ import annotations

from enum import Enum

import torch

TOLERANCE = {
    torch.float32: 1e-5,
    torch.float64: 1e-12,
    torch.float16: 2e-2,
    torch.bfloat16: 5e-2,
}


class Agreement(Enum):
    EXACT = "exact"  # the same bits
    CLOSE = "close"  # within the tolerance
    DIFFER = "differ"


def tolerance(dtype: torch.dtype) -> float:
    return TOLERANCE.get(dtype, TOLERANCE[torch.bfloat16])


def compare(got: torch.Tensor, want: torch.Tensor, rtol: float) -> Agreement:
    """`got` against `want` (both [1, seq, width]), row by row (see the module doc)."""
    if got.shape != want.shape:
        return Agreement.DIFFER
    if torch.equal(got, want):
        return Agreement.EXACT
    a, b = got.double(), want.double()
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
        return Agreement.DIFFER
    scale = b.abs().amax(dim=-1).clamp_min(1e-30)
    worst = ((a - b).abs().amax(dim=-1) / scale).max().item()
    return Agreement.CLOSE if worst <= rtol else Agreement.DIFFER


def spread(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest row-relative difference (what `compare` holds against `rtol`)."""
    a, b = got.double(), want.double()
    scale = b.abs().amax(dim=-1).clamp_min(1e-30)
    return ((a - b).abs().amax(dim=-1) / scale).max().item()
