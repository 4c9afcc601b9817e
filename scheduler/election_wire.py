"""The typed wire forms of a cluster's election and of its coordinator's commands.

Every message a peer sends is first decoded by `p2p.codec` (size and depth limits, no
extension types), its version checked (an unknown one is refused as `bad_version`), and then
converted into one of the msgspec Structs below, whose field types and `Meta` bounds are the
whole contract: anything else is an `ElectionWireError` with a short reason (a metrics
label). Nothing past this module sees an untyped peer message.

Election messages are not signed: the transport authenticates the sender (libp2p's Noise
handshake binds the connection to the peer id; the request handler is told who sent it).
Two things are: a granted vote (not a pre-vote) carries the voter's signature over (cluster,
term, candidate) (`scheduler.fencing.vote_signing_bytes`), so that the winner can prove it
won; and a coordinator's command is signed by its node key and carries its term's proof, a
`TermProof` made of a majority of the voters' vote signatures (`scheduler.fencing`), since
commands are checked by members that take no part in the election (workers), may get them
second hand and keep them as evidence.

Version 2 added those two signatures; a version 1 message is refused as `bad_version`.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from p2p import codec

WIRE_VERSION = 2
ELECTION_PROTOCOL = "/gridmesh/election/1.0.0"
COMMAND_PROTOCOL = "/gridmesh/cluster/command/1.0.0"
MAX_ELECTION_BYTES = 1024  # every election message is a few dozen bytes
MAX_COMMAND_BODY = 64 * 1024
# a term's proof holds at most this many votes: a majority of up to 255 voters (a cluster with
# more voters cannot prove a term, and its coordinator's commands are refused as no_term_proof)
MAX_PROOF_VOTES = 128
MAX_PROOF_BYTES = MAX_PROOF_VOTES * (128 + 128 + 8) + 256
MAX_COMMAND_BYTES = MAX_COMMAND_BODY + MAX_PROOF_BYTES + 1024

ClusterName = Annotated[str, Meta(min_length=1, max_length=64)]
PeerId = Annotated[str, Meta(min_length=1, max_length=128)]
Term = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Round = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Seq = Annotated[int, Meta(ge=1, le=2**63 - 1)]
Action = Annotated[str, Meta(min_length=1, max_length=32)]
Signature = Annotated[bytes, Meta(max_length=128)]


class ElectionWireError(ValueError):
    """A peer's election or command message does not fit its typed form; `reason` is a
    metrics label (`malformed`, `too_large`, `bad_version`, `unknown_type`, ...)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Msg(msgspec.Struct, forbid_unknown_fields=True, frozen=True, tag_field="t"):
    pass


class VoteRequest(_Msg, tag="vote"):
    """Raft's RequestVote; with `pre`, a pre-vote for `term` (the candidate's term + 1) that
    changes no one's term or vote."""

    cluster: ClusterName
    term: Term
    pre: bool
    v: int = WIRE_VERSION


class VoteReply(_Msg, tag="vote_reply"):
    """The answer to a VoteRequest: `term` is the request's term when granted, else the
    voter's own. A granted vote (not a pre-vote) carries `proof`, the voter's signature over
    (cluster, term, candidate); a candidate counts no granted vote without a valid one."""

    cluster: ClusterName
    term: Term
    granted: bool
    pre: bool
    proof: Signature | None = None
    v: int = WIRE_VERSION


class Heartbeat(_Msg, tag="hb"):
    """The coordinator's heartbeat; `round` numbers them so that an answer extends the
    lease from the moment its round was sent."""

    cluster: ClusterName
    term: Term
    round: Round
    v: int = WIRE_VERSION


class HeartbeatReply(_Msg, tag="hb_reply"):
    """`ok` when the member follows the heartbeat's term; else `term` is the member's
    higher one (the sender is stale and steps down)."""

    cluster: ClusterName
    term: Term
    round: Round
    ok: bool
    v: int = WIRE_VERSION


ElectionMessage = VoteRequest | VoteReply | Heartbeat | HeartbeatReply
_ELECTION_TAGS = frozenset({"vote", "vote_reply", "hb", "hb_reply"})


class Vote(msgspec.Struct, forbid_unknown_fields=True, frozen=True, array_like=True):
    """One voter's signature over (cluster, term, candidate): its vote in that term."""

    voter: PeerId
    sig: Signature


class TermProof(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """That `candidate` won `term` of `cluster`: the signed votes it collected (a majority of
    the voters, each once; checked by `scheduler.fencing.FenceKeeper`)."""

    cluster: ClusterName
    term: Term
    candidate: PeerId
    votes: Annotated[tuple[Vote, ...], Meta(min_length=1, max_length=MAX_PROOF_VOTES)]


class Command(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A coordinator's command (assign a shard, release it, scale...), fenced by cluster,
    term and sequence number and signed by the coordinator (`scheduler.fencing`).

    `proof` is the coordinator's proof of its term; it is not under the signature (it proves
    itself) and may be left out once the member has accepted a command of the term, which it
    remembers (its fence)."""

    cluster: ClusterName
    term: Term
    seq: Seq
    action: Action
    body: Annotated[bytes, Meta(max_length=MAX_COMMAND_BODY)]
    signer: PeerId
    sig: Signature
    proof: TermProof | None = None
    v: int = WIRE_VERSION


_T = TypeVar("_T")


def _decode_map(data: bytes, max_bytes: int) -> dict[str, Any]:
    if not isinstance(data, bytes | bytearray):
        raise ElectionWireError("malformed", "a message is bytes")
    try:
        msg = codec.decode(bytes(data), max_bytes=max_bytes)
    except codec.CodecError as exc:
        raise ElectionWireError(exc.reason, str(exc)) from None
    if not isinstance(msg, dict):
        raise ElectionWireError("malformed", "an election message is a map")
    version = msg.get("v")
    if type(version) is not int or version != WIRE_VERSION:
        raise ElectionWireError("bad_version", f"unsupported election wire version {version!r:.20}")
    return msg


def _convert(raw: Any, type_: Any) -> Any:
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as exc:
        raise ElectionWireError("malformed", str(exc)[:200]) from None
    except (TypeError, ValueError, RecursionError) as exc:  # defensive: never anything else
        raise ElectionWireError("malformed", type(exc).__name__) from None


def decode_election(data: bytes) -> ElectionMessage:
    """An election message, or ElectionWireError."""
    msg = _decode_map(data, MAX_ELECTION_BYTES)
    tag = msg.get("t")
    if not isinstance(tag, str) or tag not in _ELECTION_TAGS:
        raise ElectionWireError("unknown_type", f"unknown election message {str(tag)[:32]!r}")
    return _convert(msg, ElectionMessage)  # type: ignore[no-any-return]


def decode_command(data: bytes) -> Command:
    """A coordinator command (its signature not yet checked), or ElectionWireError."""
    return _convert(_decode_map(data, MAX_COMMAND_BYTES), Command)  # type: ignore[no-any-return]


def encode(message: ElectionMessage | Command) -> bytes:
    return msgspec.msgpack.encode(message)
