"""The linear kernel of every block: oneDNN on CPU float32, `F.linear` elsewhere."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from daemon.shards.model import linear as linear_module
from daemon.shards.model.linear import Linear, linear, pack_linears


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


def _tiny_pair(tmp_path, **kw):  # type: ignore[no-untyped-def]
    from daemon.shards.model import load_model, make_tiny

    model_dir = make_tiny(tmp_path / "m", layers=2, hidden=64, heads=4, kv_heads=2, **kw)
    return load_model(model_dir), load_model(model_dir)


@pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch has no oneDNN")
def test_a_packed_shard_computes_what_the_plain_one_does_in_the_same_bytes(tmp_path) -> None:
    plain, packed = _tiny_pair(tmp_path, intermediate=160, seed=2)
    size = packed.nbytes()
    assert pack_linears(packed) == 2 * 7 + 1  # every layer's 7 products and the head
    assert packed.nbytes() == size and packed.device.type == "cpu"
    assert all(m.weight.is_meta for m in packed.modules() if isinstance(m, Linear))
    ids = torch.tensor([[5, 9, 11, 3]])
    torch.testing.assert_close(packed(ids), plain(ids), rtol=1e-5, atol=1e-5)
    steps = [torch.tensor([[1, 2, 3]]), torch.tensor([[4]]), torch.tensor([[7, 8]])]
    outs = [
        shard.forward_packed(steps, [shard.new_cache(max_len=8) for _ in steps])
        for shard in (plain, packed)
    ]
    for got, want in zip(outs[1], outs[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert pack_linears(packed) == 0  # once


def test_a_head_tied_to_the_embedding_keeps_its_plain_weight(tmp_path) -> None:
    _, shard = _tiny_pair(tmp_path, intermediate=160, seed=2, tie=True)
    packed = pack_linears(shard)
    assert shard.lm_head is not None and not shard.lm_head.packed
    assert packed == (2 * 7 if linear_module._ONEDNN else 0)
    assert shard.lm_head.weight is shard.embed_tokens.weight and not shard.lm_head.weight.is_meta


def test_only_cpu_float32_weights_are_packed() -> None:
    layer = Linear(torch.randn(6, 4).bfloat16())
    assert not layer.pack() and not layer.packed and not layer.weight.is_meta


@pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch has no oneDNN")
def test_a_packed_layer_refuses_other_inputs_clearly() -> None:
    layer = Linear(torch.randn(6, 4))
    assert layer.pack()
    with pytest.raises(ValueError, match="packed CPU float32 layer got torch.bfloat16"):
        layer(torch.randn(2, 4).bfloat16())


@pytest.mark.parametrize(
    ("max_batch", "layout", "packed"),
    [(8, False, False), (1, True, False), (8, True, linear_module._ONEDNN)],
)
async def test_a_batching_server_asked_for_it_loads_its_weights_packed(
    tmp_path, max_batch, layout, packed
) -> None:
    from daemon.shards.model import make_tiny
    from daemon.shards.server import ShardServer

    server = ShardServer(max_batch=max_batch, batched_layout=layout)
    block = await server.load("m", make_tiny(tmp_path / "m", layers=2, seed=4), 0, 2)
    layers = [m for m in block.shard.modules() if isinstance(m, Linear)]
    assert layers and all(m.packed == packed for m in layers)
