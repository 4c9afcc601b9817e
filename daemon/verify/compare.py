"""Whether two computations of one step agree.

On CPU in float32 a replica that ran the same chunks with the same kernels returns the same
bits. A check cannot always repeat the provider's chunks (the replica catches up on earlier
positions in one pass, the provider may have batched the step with other sessions), and the
order of float sums then differs: measured on the tiny test model (float32, CPU), a position
computed after a one-pass catch-up differs from the same position computed step by step by at
most 6e-7 of the row's largest magnitude (`bench/verify.py` prints the measured spread).
A replica's step runs through its batcher too, so its rows may come from a pass shared with
other sessions' steps: a decode step packed with others is not the same bits as alone (a
pass of several rows takes other matrix kernels), a catch-up packed with decode steps was
(tests/daemon/verify/test_batched_rows.py holds both within the bound).
So outputs agree when, for every position, the largest difference is within `rtol` of the
largest magnitude of the reference's row; float32's bound, 1e-5, is about 20x the measured
spread. The half-precision bounds were not measured here (no GPU in this run): they are set
from the formats' rounding (bf16 keeps 8 bits: 2^-8 = 4e-3 per rounding, accumulated over a
range's layers) and should be re-measured where such providers run.
"""

from __future__ import annotations

import math
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
    return judge(got, want, rtol)[0]


def judge(got: torch.Tensor, want: torch.Tensor, rtol: float) -> tuple[Agreement, float]:
    """`compare`'s verdict and the difference it held against `rtol` (`spread`; 0 for the
    same bits), from one pass over the tensors: a check's comparison runs on the
    requester's event loop, once per checked hop."""
    if got.shape != want.shape:
        return Agreement.DIFFER, math.inf
    if torch.equal(got, want):
        return Agreement.EXACT, 0.0
    worst = spread(got, want)
    return (Agreement.CLOSE if worst <= rtol else Agreement.DIFFER), worst


def spread(got: torch.Tensor, want: torch.Tensor) -> float:
    """The largest row-relative difference (what `compare` holds against `rtol`); inf where
    a value is not finite (a NaN or an infinity never agrees, not even with itself). In
    float32 (float64 where either is): the difference of two close float32 values is exact,
    and 1e-5 is far above float32's rounding of the ratio."""
    dtype = torch.float64 if torch.float64 in (got.dtype, want.dtype) else torch.float32
    a, b = got.to(dtype), want.to(dtype)
    scale = b.abs().amax(dim=-1).clamp_min(1e-30)
    worst = ((a - b).abs().amax(dim=-1) / scale).max().item()  # (NaN for any non-finite)
    return worst if math.isfinite(worst) else math.inf
