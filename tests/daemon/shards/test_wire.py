"""The shard wire format: typed headers with bounds, tensors bounded before they are read,
and only `WireError` for anything malformed (fuzzed)."""

import contextlib
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from p2p import codec
from p2p.testing.strategies import msgpack_scalars, msgpack_values

torch = pytest.importorskip("torch")
wire = pytest.importorskip("daemon.shards.wire")


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "int64"])
def test_roundtrip(dtype):
    t = (torch.randn(2, 3, 5) * 10).to(getattr(torch, dtype))
    header, out = wire.decode(wire.encode(wire.Forward(session="s", position=0), t))
    assert isinstance(header, wire.Forward) and header.shape == [2, 3, 5]
    assert header.dtype == dtype and header.session == "s"
    assert out.dtype == t.dtype and torch.equal(out, t)


def test_header_only():
    header, out = wire.decode(wire.encode(wire.Close(session="s")))
    assert header == wire.Close(session="s") and out is None
    assert wire.op(header) == "close"
    nxt = wire.NextHop(peer="p", session="s", link="l")
    opened = wire.Open(model="m", start=0, end=2, max_length=8, prev="q", next=nxt)
    assert wire.decode(wire.encode(opened))[0] == opened


def _frame(header: dict, payload: bytes = b"") -> bytes:
    packed = codec.encode(header)
    return wire._LEN.pack(len(packed)) + packed + payload


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: {**h, "dtype": "complex64"}, "bad_header"),
        (lambda h: {**h, "shape": [2, 3]}, "bad_shape"),
        (lambda h: {**h, "shape": [1, 1, 1, 1, 1]}, "bad_header"),
        (lambda h: {**h, "shape": [-1, 6]}, "bad_header"),
        (lambda h: {**h, "shape": [1 << 20, 1 << 20]}, "too_large"),
        (lambda h: {k: v for k, v in h.items() if k != "shape"}, "bad_shape"),
        (lambda h: {**h, "op": "nope"}, "bad_header"),
        (lambda h: {k: v for k, v in h.items() if k != "op"}, "bad_header"),
        (lambda h: {**h, "session": ""}, "bad_header"),
        (lambda h: {**h, "session": "s" * 65}, "bad_header"),
        (lambda h: {**h, "position": True}, "bad_header"),
        (lambda h: {**h, "position": 1 << 40}, "bad_header"),
        (lambda h: {**h, "step": "1"}, "bad_header"),
    ],
)
def test_rejections(mutate, reason):
    frame = wire.encode(wire.Forward(session="s", position=0), torch.zeros(2, 3, 5))
    (n,) = wire._LEN.unpack_from(frame)
    header = codec.decode(frame[4 : 4 + n])
    with pytest.raises(wire.WireError) as err:
        wire.decode(_frame(mutate(header), frame[4 + n :]))
    assert err.value.reason == reason


@pytest.mark.parametrize(
    "header",
    [
        {"op": "open", "model": "m", "start": 0, "end": 1, "max_length": 0},
        {"op": "open", "model": "m", "start": 0, "end": 1, "max_length": 8, "prev": 7},
        {"op": "open", "model": "m", "start": 0, "end": 1, "max_length": 8, "next": []},
        {"op": "open", "model": "m", "start": 0, "end": 1, "max_length": 8, "next": {"peer": "p"}},
        {"op": "link", "session": "s", "next": {"peer": "p", "session": "s", "link": "l", "x": 1}},
        {"op": "error", "code": "c" * 65},
        {"op": "partial", "step": 1},
    ],
)
def test_structures_out_of_bounds_are_refused(header):
    with pytest.raises(wire.WireError) as err:
        wire.decode(_frame(header))
    assert err.value.reason == "bad_header"


def test_the_tensor_limit_may_follow_from_the_header():
    frame = wire.encode(wire.Forward(session="small", position=0), torch.zeros(1, 4, 8))
    limits = {"small": 64, "big": 1 << 20}
    with pytest.raises(wire.WireError, match="too_large"):
        wire.decode(frame, max_bytes=lambda header: limits[header.session])
    header, _ = wire.decode_header(frame)
    assert wire.decode_tensor(header, _, 128).shape == (1, 4, 8)


def test_garbage_frames():
    for _ in range(50):
        with pytest.raises(wire.WireError):
            wire.decode(os.urandom(64))
    with pytest.raises(wire.WireError):
        wire.decode(b"\x00\x00")


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_raise_only_wire_errors(data):
    for frame in (data, wire._LEN.pack(len(data)) + data):
        with contextlib.suppress(wire.WireError):
            wire.decode(frame, max_bytes=1 << 16)


_ops = ["open", "forward", "link", "close", "opened", "result", "error", "float32"]
_values = msgpack_values(
    msgpack_scalars(text_size=80, binary_size=40) | st.sampled_from(_ops),
    max_size=5,
    key_size=12,
    max_leaves=20,
)
_keys = st.sampled_from(
    [
        "op",
        "session",
        "position",
        "step",
        "dtype",
        "shape",
        "model",
        "start",
        "end",
        "max_length",
        "prev",
        "next",
        "link",
        "pushed",
        "last_only",
        "code",
        "message",
        "peer",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(_keys, _values, max_size=8), st.binary(max_size=256))
def test_random_structures_raise_only_wire_errors(header, payload):
    try:
        packed = codec.encode(header)
    except (ValueError, TypeError, OverflowError):
        return  # not encodable as msgpack at all
    with contextlib.suppress(wire.WireError):
        wire.decode(wire._LEN.pack(len(packed)) + packed + payload, max_bytes=1 << 16)
