import os

import pytest

from p2p import codec

torch = pytest.importorskip("torch")
wire = pytest.importorskip("daemon.shards.wire")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64"])
def test_roundtrip(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(getattr(torch, dtype))
    header, out = wire.decode(wire.encode({"op": "forward", "session": "s"}, t))
    assert header["op"] == "forward" and header["shape"] == [2, 3, 5]
    assert out.dtype == t.dtype and torch.equal(out, t)


def test_header_only():
    header, out = wire.decode(wire.encode({"op": "close"}))
    assert header == {"op": "close"} and out is None


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: {**h, "dtype": "complex64"}, "bad_dtype"),
        (lambda h: {**h, "shape": [2, 3]}, "bad_shape"),
        (lambda h: {**h, "shape": [1, 1, 1, 1, 1]}, "bad_shape"),
        (lambda h: {**h, "shape": [-1, 6]}, "bad_shape"),
        (lambda h: {**h, "shape": [1 << 20, 1 << 20]}, "too_large"),
    ],
)
def test_rejections(mutate, reason):
    frame = wire.encode({"op": "forward"}, torch.zeros(2, 3, 5))
    (n,) = wire._LEN.unpack_from(frame)
    header = codec.decode(frame[4 : 4 + n])
    packed = codec.encode(mutate(header))
    bad = wire._LEN.pack(len(packed)) + packed + frame[4 + n :]
    with pytest.raises(wire.WireError) as err:
        wire.decode(bad)
    assert err.value.reason == reason


def test_garbage_frames():
    for _ in range(50):
        with pytest.raises(wire.WireError):
            wire.decode(os.urandom(64))
    with pytest.raises(wire.WireError):
        wire.decode(b"\x00\x00")
