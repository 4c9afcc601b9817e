"""The election and command wire forms: round trips, bounds, unknown versions, and fuzzing
(random bytes and random structures only ever raise ElectionWireError)."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p import codec
from p2p.testing.strategies import msgpack_scalars, msgpack_values
from scheduler import election_wire as wire
from scheduler.election_wire import (
    Command,
    ElectionWireError,
    Heartbeat,
    HeartbeatReply,
    VoteReply,
    VoteRequest,
    decode_command,
    decode_election,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

scalars = msgpack_scalars(text_size=40, binary_size=40, allow_infinity=True)
structures = msgpack_values(scalars, max_size=5, key_size=10, max_leaves=30)
near_messages = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 0, 2, True, 1.0, "1"])},
    optional={
        "t": st.sampled_from(["vote", "vote_reply", "hb", "hb_reply", "cmd", "x"]) | structures,
        "cluster": st.text(max_size=70) | structures,
        "term": st.integers(-2, 2**64 - 1) | structures,
        "round": st.integers(-2, 2**64 - 1) | structures,
        "seq": st.integers(-2, 2**64 - 1) | structures,
        "pre": st.booleans() | structures,
        "granted": st.booleans() | structures,
        "ok": st.booleans() | structures,
        "action": st.text(max_size=40) | structures,
        "body": st.binary(max_size=64) | structures,
        "signer": st.text(max_size=130) | structures,
        "sig": st.binary(max_size=130) | structures,
        "extra": structures,
    },
)


@pytest.mark.parametrize(
    "message",
    [
        VoteRequest("c1", 3, pre=True),
        VoteReply("c1", 3, True, pre=False),
        Heartbeat("c1", 2**63 - 1, 0),
        HeartbeatReply("c1", 0, 9, False),
    ],
)
def test_election_messages_round_trip(message):
    assert decode_election(wire.encode(message)) == message


def test_commands_round_trip():
    command = Command("c1", 4, 1, "assign", b"\x00" * 100, "peer", b"s" * 64)
    assert decode_command(wire.encode(command)) == command


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"v": 2, "t": "hb", "cluster": "c", "term": 1, "round": 1}, "bad_version"),
        ({"t": "hb", "cluster": "c", "term": 1, "round": 1}, "bad_version"),
        ({"v": True, "t": "hb", "cluster": "c", "term": 1, "round": 1}, "bad_version"),
        ({"v": 1, "t": "nope", "cluster": "c", "term": 1}, "unknown_type"),
        ({"v": 1, "t": "hb", "cluster": "c", "term": -1, "round": 1}, "malformed"),
        ({"v": 1, "t": "hb", "cluster": "", "term": 1, "round": 1}, "malformed"),
        ({"v": 1, "t": "hb", "cluster": "c" * 65, "term": 1, "round": 1}, "malformed"),
        ({"v": 1, "t": "hb", "cluster": "c", "term": 1, "round": 1, "x": 0}, "malformed"),
        ({"v": 1, "t": "vote", "cluster": "c", "term": 1, "pre": 1}, "malformed"),
        ([1, 2, 3], "malformed"),
    ],
)
def test_bad_election_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(ElectionWireError) as info:
        decode_election(codec.encode(raw))
    assert info.value.reason == reason


def test_size_bounds():
    with pytest.raises(ElectionWireError) as info:
        decode_election(codec.encode({"v": 1, "t": "hb", "cluster": "c", "pad": b"x" * 2000}))
    assert info.value.reason == "too_large"
    body = b"x" * (wire.MAX_COMMAND_BODY + 1)
    too_big = msgspec.msgpack.encode(
        {
            "v": 1,
            "cluster": "c",
            "term": 1,
            "seq": 1,
            "action": "a",
            "body": body,
            "signer": "p",
            "sig": b"",
        }
    )
    with pytest.raises(ElectionWireError):
        decode_command(too_big)
    raw = {
        "v": 1,
        "cluster": "c",
        "term": 1,
        "seq": 0,
        "action": "a",
        "body": b"",
        "signer": "p",
        "sig": b"",
    }
    with pytest.raises(ElectionWireError, match="malformed"):
        decode_command(codec.encode(raw))  # sequences start at 1


@FUZZ
@given(st.binary(max_size=300))
def test_random_bytes_only_raise_wire_errors(data):
    for decode in (decode_election, decode_command):
        with contextlib.suppress(ElectionWireError):
            decode(data)


@FUZZ
@given(structures | near_messages)
def test_random_structures_only_raise_wire_errors(value):
    data = codec.encode(value)
    for decode in (decode_election, decode_command):
        try:
            message = decode(data)
        except ElectionWireError:
            continue
        assert message.v == wire.WIRE_VERSION
        assert decode(wire.encode(message)) == message  # what passes is well-formed
