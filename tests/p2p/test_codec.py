import os

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from p2p import codec, identity
from p2p.testing.strategies import msgpack_scalars, msgpack_values

IDENT = identity.NodeIdentity.generate()


def test_roundtrip_envelope():
    env = codec.seal(IDENT, "hello", {"x": [1, 2, b"\x00"]}, timestamp=12.5)
    opened = codec.open_envelope(env.to_wire(), expect_type="hello")
    assert opened == env


def test_integer_timestamp_survives_roundtrip():
    env = codec.seal(IDENT, "hello", None, timestamp=12)
    assert codec.open_envelope(env.to_wire()).timestamp == 12


def test_size_limit():
    with pytest.raises(codec.CodecError) as err:
        codec.decode(b"\x00" * 101, max_bytes=100)
    assert err.value.reason == "too_large"


def test_depth_limit():
    deep: object = 1
    for _ in range(codec.MAX_DEPTH + 1):
        deep = [deep]
    with pytest.raises(codec.CodecError) as err:
        codec.decode(codec.encode(deep))
    assert err.value.reason == "too_deep"
    ok: object = 1
    for _ in range(codec.MAX_DEPTH):
        ok = {"k": ok}
    assert codec.decode(codec.encode(ok)) == ok


def test_pathological_nesting_is_rejected_not_crashing():
    # 100k nested arrays: must be a CodecError, never a RecursionError or a crash
    with pytest.raises(codec.CodecError):
        codec.decode(b"\x91" * 100_000 + b"\x00")


def test_non_string_keys_and_ext_types_rejected():
    with pytest.raises(codec.CodecError) as err:
        codec.decode(msgpack.packb({1: 2}))
    assert err.value.reason == "bad_key"
    with pytest.raises(codec.CodecError):
        codec.decode(msgpack.packb(msgpack.ExtType(5, b"xx")))


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda d: {**d, "v": 2}, "bad_version"),
        (lambda d: {**d, "t": "other"}, "wrong_type"),
        (lambda d: {**d, "body": "changed"}, "bad_signature"),
        (lambda d: {**d, "sig": "text"}, "malformed"),
        (lambda d: {**d, "ts": "now"}, "malformed"),
        (lambda d: {**d, "from": identity.NodeIdentity.generate().peer_id}, "bad_signature"),
    ],
)
def test_envelope_rejections(mutate, reason):
    env = codec.seal(IDENT, "hello", {"a": 1}, timestamp=1.0)
    raw = codec.decode(env.to_wire())
    with pytest.raises(codec.CodecError) as err:
        codec.open_envelope(codec.encode(mutate(raw)), expect_type="hello")
    assert err.value.reason == reason


@given(st.binary(max_size=512))
def test_random_bytes_only_raise_codec_error(data):
    # anything but a CodecError (or a verified envelope) would crash a stream handler
    try:
        env = codec.open_envelope(data)
    except codec.CodecError as exc:
        assert exc.reason
    else:
        assert isinstance(env, codec.Envelope)


def test_random_large_garbage():
    for _ in range(20):
        with pytest.raises(codec.CodecError):
            codec.open_envelope(os.urandom(4096))


# random structures, not only random bytes: every msgpack value a peer could send
_leaf = msgpack_scalars(text_size=40, binary_size=80)
_values = msgpack_values(_leaf, max_size=5, key_size=8, max_leaves=30)
_envelope_like = st.fixed_dictionaries(
    {},
    optional={
        "v": st.sampled_from([1, 2, "1", None]) | _leaf,
        "t": st.sampled_from(["hello", "resources"]) | _leaf,
        "from": st.just(IDENT.peer_id) | _leaf,
        "ts": st.floats(allow_nan=True) | _leaf,
        "body": _values,
        "sig": st.binary(min_size=64, max_size=64) | _leaf,
    },
)


@given(_values | _envelope_like)
def test_random_structures_only_raise_codec_error(value):
    data = codec.encode(value)
    for opener in (codec.open_envelope, codec.parse_envelope):
        try:
            env = opener(data)
        except codec.CodecError as exc:
            assert exc.reason
        else:
            assert isinstance(env, codec.Envelope)
    try:
        codec.decode(data)
    except codec.CodecError as exc:
        assert exc.reason


@given(_values)
def test_signed_envelopes_with_random_bodies_roundtrip(body):
    # what a real peer signs, whatever its body, opens to the same body
    env = codec.seal(IDENT, "x", body, timestamp=1.0)
    try:
        opened = codec.open_envelope(env.to_wire())
    except codec.CodecError as exc:  # only nesting can be refused here
        assert exc.reason == "too_deep"
    else:
        assert opened.sender == IDENT.peer_id


def test_parse_checks_shape_before_signature():
    env = codec.seal(IDENT, "hello", {"a": 1}, timestamp=1.0)
    raw = codec.decode(env.to_wire())
    raw["sig"] = bytes(64)
    parsed = codec.parse_envelope(codec.encode(raw), expect_type="hello")  # shape is fine
    with pytest.raises(codec.CodecError) as err:
        codec.verify_envelope(parsed)
    assert err.value.reason == "bad_signature"
    raw["sig"] = bytes(100_000)  # an oversized signature is refused without verifying
    with pytest.raises(codec.CodecError) as err:
        codec.parse_envelope(codec.encode(raw))
    assert err.value.reason == "malformed"
