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
    TermProof,
    Vote,
    VoteReply,
    VoteRequest,
    decode_command,
    decode_election,
)

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))

scalars = msgpack_scalars(text_size=40, binary_size=40, allow_infinity=True)
structures = msgpack_values(scalars, max_size=5, key_size=10, max_leaves=30)
near_messages = st.fixed_dictionaries(
    {"v": st.sampled_from([2, 2, 2, 0, 1, 3, True, 2.0, "2"])},
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
        "proof": st.none() | st.binary(max_size=130) | structures,
        "extra": structures,
    },
)
# term proofs: near-valid ones (fields of the right and wrong types and sizes, votes as
# pairs, triples, maps...) inside commands that are otherwise well formed
votes = st.lists(
    st.tuples(st.text(min_size=0, max_size=130), st.binary(max_size=130)).map(list)
    | st.lists(st.text(max_size=5) | st.binary(max_size=5) | st.integers(), max_size=3)
    | structures,
    max_size=wire.MAX_PROOF_VOTES + 2,
)
near_proofs = st.fixed_dictionaries(
    {},
    optional={
        "cluster": st.text(max_size=70) | structures,
        "term": st.integers(-2, 2**64 - 1) | structures,
        "candidate": st.text(max_size=130) | structures,
        "votes": votes,
        "extra": structures,
    },
)
near_commands = st.fixed_dictionaries(
    {
        "v": st.just(wire.WIRE_VERSION),
        "cluster": st.just("c"),
        "term": st.integers(0, 3),
        "seq": st.integers(1, 3),
        "action": st.just("assign"),
        "body": st.binary(max_size=8),
        "signer": st.just("p"),
        "sig": st.binary(max_size=70),
    },
    optional={"proof": st.none() | near_proofs | structures},
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
    proof = TermProof("c1", 4, "peer", tuple(Vote(f"v{i}", b"s" * 64) for i in range(7)))
    proven = Command("c1", 4, 1, "assign", b"", "peer", b"s" * 64, proof)
    assert decode_command(wire.encode(proven)) == proven
    signed_vote = VoteReply("c1", 3, True, pre=False, proof=b"s" * 64)
    assert decode_election(wire.encode(signed_vote)) == signed_vote


def test_the_largest_proof_fits_a_command_and_a_larger_one_is_refused():
    peer = "p" * 128
    votes = tuple(Vote(f"{i:03d}" + "v" * 125, b"s" * 128) for i in range(wire.MAX_PROOF_VOTES))
    body = b"x" * wire.MAX_COMMAND_BODY
    largest = Command("c" * 64, 2**63 - 1, 2**63 - 1, "a" * 32, body, peer, b"s" * 128)
    largest = msgspec.structs.replace(largest, proof=TermProof("c" * 64, 2**63 - 1, peer, votes))
    assert len(wire.encode(largest)) <= wire.MAX_COMMAND_BYTES
    assert decode_command(wire.encode(largest)) == largest
    for proof in (
        {"cluster": "c", "term": 1, "candidate": "p", "votes": [["v", b"s"]] * 129},
        {"cluster": "c", "term": 1, "candidate": "p", "votes": []},
        {"cluster": "c", "term": 1, "candidate": "p", "votes": [["v", b"s" * 129]]},
        {"cluster": "c", "term": 1, "candidate": "p", "votes": [["v" * 129, b"s"]]},
        {"cluster": "c", "term": 1, "candidate": "p", "votes": [["v", b"s", 1]]},
        {"cluster": "c", "term": 1, "candidate": "p", "votes": [["v", b"s"]], "x": 1},
        {"cluster": "c", "term": -1, "candidate": "p", "votes": [["v", b"s"]]},
        {"cluster": "c", "term": 1, "candidate": "", "votes": [["v", b"s"]]},
    ):
        raw = {**msgspec.to_builtins(largest, enc_hook=None), "proof": proof, "body": b""}
        raw["sig"] = b"s"
        with pytest.raises(ElectionWireError, match="malformed"):
            decode_command(codec.encode(raw))
    with pytest.raises(ElectionWireError):  # a vote's signature past its bound
        decode_election(
            codec.encode(
                {
                    "v": 2,
                    "t": "vote_reply",
                    "cluster": "c",
                    "term": 1,
                    "granted": True,
                    "pre": False,
                    "proof": b"s" * 129,
                }
            )
        )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({"v": 1, "t": "hb", "cluster": "c", "term": 1, "round": 1}, "bad_version"),  # no proofs
        ({"t": "hb", "cluster": "c", "term": 1, "round": 1}, "bad_version"),
        ({"v": True, "t": "hb", "cluster": "c", "term": 1, "round": 1}, "bad_version"),
        ({"v": 2, "t": "nope", "cluster": "c", "term": 1}, "unknown_type"),
        ({"v": 2, "t": "hb", "cluster": "c", "term": -1, "round": 1}, "malformed"),
        ({"v": 2, "t": "hb", "cluster": "", "term": 1, "round": 1}, "malformed"),
        ({"v": 2, "t": "hb", "cluster": "c" * 65, "term": 1, "round": 1}, "malformed"),
        ({"v": 2, "t": "hb", "cluster": "c", "term": 1, "round": 1, "x": 0}, "malformed"),
        ({"v": 2, "t": "vote", "cluster": "c", "term": 1, "pre": 1}, "malformed"),
        ([1, 2, 3], "malformed"),
    ],
)
def test_bad_election_messages_are_refused_with_a_reason(raw, reason):
    with pytest.raises(ElectionWireError) as info:
        decode_election(codec.encode(raw))
    assert info.value.reason == reason


def test_size_bounds():
    with pytest.raises(ElectionWireError) as info:
        decode_election(codec.encode({"v": 2, "t": "hb", "cluster": "c", "pad": b"x" * 2000}))
    assert info.value.reason == "too_large"
    body = b"x" * (wire.MAX_COMMAND_BODY + 1)
    too_big = msgspec.msgpack.encode(
        {
            "v": 2,
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
        "v": 2,
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
@given(near_commands)
def test_random_term_proofs_only_raise_wire_errors(value):
    try:
        command = decode_command(codec.encode(value))
    except ElectionWireError as exc:
        assert exc.reason in {"malformed", "too_large", "too_deep", "bad_key"}, exc
        return
    proof = command.proof
    if proof is not None:  # what passes is within its bounds
        assert 1 <= len(proof.votes) <= wire.MAX_PROOF_VOTES
        assert all(0 < len(v.voter) <= 128 and len(v.sig) <= 128 for v in proof.votes)
        assert 0 <= proof.term < 2**63
    assert decode_command(wire.encode(command)) == command


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
