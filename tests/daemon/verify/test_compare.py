"""When two outputs of one step agree: the same bits, within the row-relative tolerance, or
not (shape, non-finite values, a difference over the bound)."""

from __future__ import annotations

import math

import pytest

torch = pytest.importorskip("torch")

from daemon.verify.compare import Agreement, compare, judge, spread, tolerance  # noqa: E402


def test_exact_close_and_different():
    want = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0))
    rtol = tolerance(torch.float32)
    assert compare(want.clone(), want, rtol) is Agreement.EXACT
    row_max = want.abs().amax(-1, keepdim=True)
    assert compare(want + row_max * rtol / 2, want, rtol) is Agreement.CLOSE
    assert compare(want + row_max * rtol * 2, want, rtol) is Agreement.DIFFER
    # one row off is enough; the bound is relative to that row's own magnitude
    off = want.clone()
    off[0, 1, 3] += float(row_max[0, 1, 0]) * 1e-3
    assert compare(off, want, rtol) is Agreement.DIFFER
    assert spread(off, want) == pytest.approx(1e-3, rel=1e-3)


def test_shapes_and_non_finite_values_never_agree():
    want = torch.ones(1, 2, 4)
    assert compare(torch.ones(1, 1, 4), want, 1.0) is Agreement.DIFFER
    nan = want.clone()
    nan[0, 0, 0] = float("nan")
    assert compare(nan, want, 1.0) is Agreement.DIFFER
    assert compare(nan, nan.clone(), 1.0) is Agreement.DIFFER  # NaN != NaN, bits or not


def test_half_precision_bounds_are_looser():
    assert tolerance(torch.float32) < tolerance(torch.float16) < tolerance(torch.bfloat16)
    assert tolerance(torch.int64) == tolerance(torch.bfloat16)  # unknown: the loosest


def test_judge_gives_the_verdict_and_the_difference_it_weighed():
    want = torch.randn(1, 3, 8, generator=torch.Generator().manual_seed(0))
    assert judge(want.clone(), want, 1e-5) == (Agreement.EXACT, 0.0)
    off = want.clone()
    off[0, 1] += want[0, 1].abs().amax() * 3e-6
    how, worst = judge(off, want, 1e-5)
    assert how is Agreement.CLOSE and worst == pytest.approx(3e-6, rel=1e-2)
    assert worst == spread(off, want)
    assert judge(off, want, 1e-6)[0] is Agreement.DIFFER


def test_an_infinity_on_one_side_never_agrees():
    want = torch.ones(1, 2, 4)
    inf = want.clone()
    inf[0, 1, 2] = float("inf")
    for got, ref in ((inf, want), (want, inf), (-inf, inf)):
        assert judge(got, ref, 1.0) == (Agreement.DIFFER, math.inf)
