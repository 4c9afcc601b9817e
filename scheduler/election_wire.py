"""The typed wire forms of a cluster's election and of its coordinator's commands.

Every message a peer sends is first decoded by `p2p.codec` (size and depth limits, no
extension types), its version checked (an unknown one is refused as `bad_version`), and then
converted into one of the msgspec Structs below, whose field types and `Meta` bounds are the
whole contract: anything else is an `ElectionWireError` with a short reason (a metrics
label). Nothing past this module sees an untyped peer message.

Election messages are not signed: the transport authenticates the sender (libp2p's Noise
handshake binds the connection to the peer id; the request handler is told who sent it).
Commands are signed by the coordinator's node key (`scheduler.fencing`), since they are
checked by members that may get them second hand and keep them as evidence.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from p2p import codec

WIRE_VERSION = 1
ELECTION_PROTOCOL = "/gridmesh/election/1.0.0"
COMMAND_PROTOCOL = "/gridmesh/cluster/command/1.0.0"
MAX_ELECTION_BYTES = 1024  # every election message is a few dozen bytes
MAX_COMMAND_BODY = 64 * 1024
MAX_COMMAND_BYTES = MAX_COMMAND_BODY + 1024

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
    voter's own."""

    cluster: ClusterName
    term: Term
    granted: bool
    pre: bool
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


class Command(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    """A coordinator's command (assign a shard, release it, scale...), fenced by cluster,
    term and sequence number and signed by the coordinator (`scheduler.fencing`)."""

    cluster: ClusterName
    term: Term
    seq: Seq
    action: Action
    body: Annotated[bytes, Meta(max_length=MAX_COMMAND_BODY)]
    signer: PeerId
    sig: Signature
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
