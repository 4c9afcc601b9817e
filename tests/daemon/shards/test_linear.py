"""The linear kernel of every block: oneDNN on CPU float32, `F.linear` elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from daemon.shards.model import linear as linear_module
from daemon.shards.model.linear import Linear, linear


@pytest.mark.parametrize("shape", [(7,), (1, 7), (5, 7), (1, 3, 7), (2, 3, 7)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_cpu_float32_equals_f_linear(shape: tuple[int, ...], with_bias: bool) -> None:
    gen = torch.Generator().manual_seed(len(shape) * 10 + with_bias)
    weight = torch.randn(11, 7, generator=gen)
    bias = torch.randn(11, generator=gen) if with_bias else None
    x = torch.randn(*shape, generator=gen)
    got = linear(x, weight, bias)
    assert got.shape == (*shape[:-1], 11) and got.dtype == torch.float32
    torch.testing.assert_close(got, F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


def test_a_transposed_input_is_read_by_its_strides() -> None:
    weight = torch.randn(6, 4)
    x = torch.randn(4, 1, 3).transpose(0, 2)  # [3, 1, 4], not contiguous
    torch.testing.assert_close(linear(x, weight), F.linear(x, weight), rtol=1e-5, atol=1e-5)


def test_other_dtypes_take_f_linear_bit_for_bit() -> None:
    weight = torch.randn(6, 4).bfloat16()
    x = torch.randn(3, 4).bfloat16()
    assert torch.equal(linear(x, weight), F.linear(x, weight))


@pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch has no oneDNN")
def test_cpu_float32_goes_through_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    class Spy:
        def __call__(self, *args):  # type: ignore[no-untyped-def]
            calls.append(args[0].shape)
            return real(*args)

    monkeypatch.setattr(linear_module, "_pointwise", Spy())
    layer = Linear(torch.randn(6, 4), torch.zeros(6))
    layer(torch.randn(2, 4))
    assert calls == [torch.Size([2, 4])]
