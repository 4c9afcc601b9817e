"""The SWIM wire: typed, bounded, versioned; anything else is a WireError, never a crash."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler import swim_wire as wire

PEER = "12D3KooWDpJ7As7BWAwRMfu1VU2WCqNjvq387JEYKDBj4kx6nXTN"
SIG = bytes(range(64))

peer_ids = st.text(min_size=1, max_size=128)
u63 = st.integers(min_value=0, max_value=2**63 - 1)
sigs = st.one_of(st.just(b""), st.binary(min_size=64, max_size=64))
updates = st.builds(
    wire.Update,
    kind=st.sampled_from([wire.ALIVE, wire.SUSPECT, wire.DEAD]),
    member=peer_ids,
    incarnation=u63,
    proof=sigs,
    origin=peer_ids,
    sig=sigs,
)
common = {
    "v": st.just(wire.WIRE_VERSION),
    "cluster": st.text(min_size=1, max_size=200),
    "seq": u63,
    "me": st.builds(wire.Me, incarnation=u63, proof=sigs),
    "updates": st.lists(updates, max_size=wire.MAX_UPDATES),
}
messages = st.one_of(
    st.builds(wire.Ping, target=peer_ids, **common),
    st.builds(wire.PingReq, target=peer_ids, **common),
    st.builds(wire.Ack, **common),
    st.builds(wire.Nack, **common),
    st.builds(wire.Gossip, **common),
)


def _ping(**changes):
    raw = {
        "t": "ping",
        "v": 1,
        "cluster": "c",
        "seq": 1,
        "me": [1, SIG],
        "updates": [],
        "target": PEER,
    }
    raw.update(changes)
    return msgpack.packb(raw, use_bin_type=True)


@settings(max_examples=100, deadline=None)
@given(messages)
def test_every_message_survives_a_round_trip_within_the_size_bound(message):
    data = wire.encode(message)
    assert wire.decode(data) == message


def test_the_largest_message_fits_the_bound():
    long_id = "x" * 128
    update = wire.Update(wire.DEAD, long_id, 2**63 - 1, SIG, long_id, SIG)
    message = wire.Ping(
        1, "c" * 200, 2**63 - 1, wire.Me(2**63 - 1, SIG), [update] * wire.MAX_UPDATES, long_id
    )
    assert len(wire.encode(message)) < wire.MAX_MESSAGE_BYTES
    assert wire.decode(wire.encode(message)) == message


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=2048))
def test_random_bytes_are_refused_with_a_wire_error(data):
    try:
        wire.decode(data)
    except wire.WireError as exc:
        assert exc.reason in {"malformed", "bad_version"}


json_like = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.text(max_size=20)
    | st.binary(max_size=70),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=30,
)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["t", "v", "cluster", "seq", "me", "updates", "target"]), json_like
    )
)
def test_maps_with_the_right_keys_and_wrong_values_are_refused(raw):
    raw.setdefault("v", 1)
    try:
        wire.decode(msgpack.packb(raw, use_bin_type=True))
    except wire.WireError as exc:
        assert exc.reason in {"malformed", "bad_version"}


def test_a_valid_ping_decodes():
    message = wire.decode(_ping())
    assert isinstance(message, wire.Ping) and message.target == PEER


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (_ping(v=2), "bad_version"),
        (_ping(v="1"), "bad_version"),
        (_ping(t="join"), "malformed"),
        (_ping(extra=1), "malformed"),
        (_ping(seq=-1), "malformed"),
        (_ping(seq=2**63), "malformed"),
        (_ping(cluster=""), "malformed"),
        (_ping(target="p" * 129), "malformed"),
        (_ping(me=[1, b"s" * 65]), "malformed"),
        (_ping(updates=[[1, PEER, 1, SIG, PEER, SIG]] * (wire.MAX_UPDATES + 1)), "malformed"),
        (_ping(updates=[[3, PEER, 1, SIG, PEER, SIG]]), "malformed"),
        (_ping(updates=[[1, PEER, 1, SIG, PEER]]), "malformed"),
        (msgpack.packb([1, 2, 3]), "malformed"),
        (b"\xc1", "malformed"),
        (b"\x91" * 100_000, "too_large"),
        (b"\x91" * 60_000 + b"\x01", "malformed"),  # deep nesting
    ],
)
def test_bad_messages_are_refused_with_a_reason(data, reason):
    with pytest.raises(wire.WireError) as err:
        wire.decode(data)
    assert err.value.reason == reason


def test_claims_are_bound_to_their_cluster_kind_member_and_incarnation():
    base = wire.claim_bytes("c1", wire.SUSPECT, PEER, 7)
    assert base != wire.claim_bytes("c2", wire.SUSPECT, PEER, 7)
    assert base != wire.claim_bytes("c1", wire.DEAD, PEER, 7)
    assert base != wire.claim_bytes("c1", wire.SUSPECT, PEER + "x", 7)
    assert base != wire.claim_bytes("c1", wire.SUSPECT, PEER, 8)
