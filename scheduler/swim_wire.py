"""The wire forms of the SWIM failure detector (`scheduler.swim`): msgspec Structs with bounds.

Every message is a msgpack map with a version `v` and a type tag `t`; a message of another
version is refused before anything else is read (`bad_version`), and every field has a type
and a bound (`malformed`, `too_large`). Nothing past `decode` sees an untyped peer message.

Claims about members travel as `Update`s, each signed by whoever makes it:
- `alive` (member, incarnation): signed by the member itself; its signature (`proof`) is the
  member's proof that it had that incarnation;
- `suspect` / `dead` (member, incarnation) by `origin`: signed by the accuser, and carrying the
  member's own `proof` of that incarnation (empty while the member has never been heard from:
  incarnation 0). Nobody can claim an incarnation the member never signed.
The signed bytes (`claim_bytes`) name the cluster, so a claim made in one cluster is no claim
in another.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from msgspec import Meta

WIRE_VERSION = 1
MAX_MESSAGE_BYTES = 64 * 1024  # far above what a message of MAX_UPDATES updates needs
MAX_UPDATES = 32  # updates one message may carry
ALIVE, SUSPECT, DEAD = 0, 1, 2
KIND_NAMES = ("alive", "suspect", "dead")

PeerId = Annotated[str, Meta(min_length=1, max_length=128)]
ClusterName = Annotated[str, Meta(min_length=1, max_length=200)]
U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Signature = Annotated[bytes, Meta(max_length=64)]  # Ed25519; empty where none is due
Kind = Annotated[int, Meta(ge=ALIVE, le=DEAD)]


class WireError(ValueError):
    """A peer's SWIM message does not fit its typed form; `reason` is a metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Update(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """One claim about a member (see the module's docstring for who signs what)."""

    kind: Kind
    member: PeerId
    incarnation: U63
    proof: Signature  # the member's signature of alive(member, incarnation); b"" for 0
    origin: PeerId  # who claims it: the member itself for alive
    sig: Signature  # the origin's signature of this claim; b"" for alive (proof is it)


class Me(msgspec.Struct, array_like=True, frozen=True, forbid_unknown_fields=True):
    """The sender's own alive claim, carried by every message (its incarnation and proof)."""

    incarnation: U63
    proof: Signature


Updates = Annotated[list[Update], Meta(max_length=MAX_UPDATES)]


class _Message(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="t"):
    v: int
    cluster: ClusterName  # one protocol serves every cluster a node belongs to
    seq: U63
    me: Me
    updates: Updates


class Ping(_Message, tag="ping"):
    """A direct probe of `target` (refused by anyone else: a misdirected ping)."""

    target: PeerId


class PingReq(_Message, tag="ping-req"):
    """Ask the receiver to probe `target` and answer with an Ack (it answered) or a Nack."""

    target: PeerId


class Ack(_Message, tag="ack"):
    """The answer to a Ping, a Gossip, or a PingReq whose target answered."""


class Nack(_Message, tag="nack"):
    """The answer to a PingReq whose target did not answer in time (Lifeguard): the asker
    learns that its own link to the relay works, so the miss is not its own slowness."""


class Gossip(_Message, tag="gossip"):
    """Updates only, sent to a few random members while there are updates to spread."""


Message = Ping | PingReq | Ack | Nack | Gossip
REQUESTS = (Ping, PingReq, Gossip)  # answered by a reply (Ack or Nack)
REPLIES = (Ack, Nack)


class _Header(msgspec.Struct):
    v: Any = None


_HEADER = msgspec.msgpack.Decoder(_Header)
_DECODER = msgspec.msgpack.Decoder(Message)
_ENCODER = msgspec.msgpack.Encoder()


def decode(data: bytes, max_bytes: int = MAX_MESSAGE_BYTES) -> Message:
    """A peer's message, or WireError (`too_large`, `bad_version`, `malformed`)."""
    if len(data) > max_bytes:
        raise WireError("too_large", f"{len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        header = _HEADER.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise WireError("malformed", str(exc)[:200]) from None
    if header.v != WIRE_VERSION:
        raise WireError("bad_version", f"unsupported swim wire version {header.v!r:.20}")
    try:
        return _DECODER.decode(data)
    except (msgspec.DecodeError, RecursionError) as exc:
        raise WireError("malformed", str(exc)[:200]) from None


def encode(message: Message) -> bytes:
    return _ENCODER.encode(message)


def claim_bytes(cluster: str, kind: int, member: str, incarnation: int) -> bytes:
    """What the maker of a claim signs: alive by the member itself, suspect/dead by the
    accuser."""
    return b"\0".join(
        (
            b"gridmesh/swim/1",
            cluster.encode(),
            KIND_NAMES[kind].encode(),
            member.encode(),
            incarnation.to_bytes(8, "big"),
        )
    )
