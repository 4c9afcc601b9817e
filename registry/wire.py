"""The typed wire forms of the registry protocols: entries, gossip and anti-entropy messages.

Every message a peer sends is first decoded by `p2p.codec` (size and depth limits, no
extension types) and then converted into one of the msgspec Structs below, whose field types
and `Meta` bounds are the whole contract: anything else is a `WireError` with a short reason
(a metrics label). Nothing past this module sees an untyped peer message.

Entries inside a message are converted one at a time (`entry_items` keeps them raw), so one
bad entry is refused and counted on its own and the rest of the batch still applies.
"""

from __future__ import annotations

from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import Meta

from p2p import codec

WIRE_VERSION = 1
BUCKETS = 16
DIGEST_BYTES = 8
MAX_KINDS = 64  # kinds a digests message may name (there are 7 today)
MAX_TRANSFER = 256  # entries or ids in one gossip message, pull or push
MAX_LISTING = 2000  # summaries in one listing page
MAX_CURSOR_KEY = 200

Kind = Annotated[str, Meta(min_length=1, max_length=32)]
Key = Annotated[str, Meta(min_length=1, max_length=200)]
PeerId = Annotated[str, Meta(min_length=1, max_length=128)]
U63 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Signature = Annotated[bytes, Meta(max_length=128)]
Digest = Annotated[bytes, Meta(min_length=DIGEST_BYTES, max_length=DIGEST_BYTES)]
VersionDigest = Annotated[bytes, Meta(max_length=DIGEST_BYTES)]
BucketIndex = Annotated[int, Meta(ge=0, le=BUCKETS - 1)]


class WireError(ValueError):
    """A peer's registry message does not fit its typed form. `reason` is a metrics label."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class _Struct(msgspec.Struct, forbid_unknown_fields=True, frozen=True):
    pass


class WireEntry(_Struct):
    """One signed registry entry as it travels (`registry.entry.Entry.to_wire`)."""

    kind: Kind
    key: Key
    value: dict[str, Any] | None
    ts: tuple[U63, U63]
    author: PeerId
    created: tuple[U63, U63]
    owner: PeerId
    sig: Signature


class Gossip(_Struct):
    """A registry gossip message: new entries, kept raw until each is converted."""

    v: int
    entries: Annotated[list[Any], Meta(max_length=MAX_TRANSFER)]


class Cursor(_Struct):
    """Where a listing page starts: after this (kind, key)."""

    kind: Kind
    key: Annotated[str, Meta(max_length=MAX_CURSOR_KEY)]


class DigestsOp(_Struct, tag_field="op", tag="digests"):
    v: int
    digests: Annotated[
        dict[Kind, Annotated[list[Digest], Meta(min_length=BUCKETS, max_length=BUCKETS)]],
        Meta(max_length=MAX_KINDS),
    ]
    after: Cursor | None = None  # the listing page after this id (None: the first page)


class PullOp(_Struct, tag_field="op", tag="pull"):
    v: int
    ids: Annotated[list[tuple[Kind, Key]], Meta(max_length=MAX_TRANSFER)]


class PushOp(_Struct, tag_field="op", tag="push"):
    v: int
    entries: Annotated[list[Any], Meta(max_length=MAX_TRANSFER)]


SyncOp = DigestsOp | PullOp | PushOp

Summary = tuple[Kind, Key, tuple[U63, U63, PeerId], tuple[U63, U63, PeerId, VersionDigest]]


class ListingReply(_Struct):
    v: int
    buckets: Annotated[list[tuple[Kind, BucketIndex]], Meta(max_length=MAX_KINDS * BUCKETS)]
    summaries: Annotated[list[Summary], Meta(max_length=MAX_LISTING)]
    truncated: bool
    next: Cursor | None = None  # set when truncated: ask again with `after` = next


class PullReply(_Struct):
    """The entries found, in the order asked, up to the reply's byte budget; `more` is set
    when some found entries did not fit (ask again for the ids not yet received)."""

    v: int
    entries: Annotated[list[Any], Meta(max_length=MAX_TRANSFER)]
    more: bool = False


class PushReply(_Struct):
    v: int
    applied: Annotated[int, Meta(ge=0)]


_T = TypeVar("_T")


def _decode_map(data: bytes, max_bytes: int) -> dict[str, Any]:
    try:
        msg = codec.decode(data, max_bytes=max_bytes)
    except codec.CodecError as exc:
        raise WireError(exc.reason, str(exc)) from None
    if not isinstance(msg, dict):
        raise WireError("malformed", "a registry message is a map")
    if msg.get("v") != WIRE_VERSION:
        raise WireError("bad_version", f"unsupported registry wire version {msg.get('v')!r:.20}")
    return msg


def convert(raw: Any, type_: type[_T], reason: str = "malformed") -> _T:
    """`raw` (decoded msgpack) as `type_`, or WireError naming the first problem."""
    try:
        return msgspec.convert(raw, type_, strict=True)
    except msgspec.ValidationError as exc:
        raise WireError(reason, str(exc)[:200]) from None
    except (TypeError, ValueError, RecursionError) as exc:  # defensive: never anything else
        raise WireError(reason, type(exc).__name__) from None


def decode_gossip(data: bytes, max_bytes: int) -> Gossip:
    return convert(_decode_map(data, max_bytes), Gossip)


def decode_sync_op(data: bytes, max_bytes: int) -> SyncOp:
    msg = _decode_map(data, max_bytes)
    if msg.get("op") not in ("digests", "pull", "push"):
        raise WireError("unknown_op", f"unknown sync op {str(msg.get('op'))[:32]!r}")
    return convert(msg, SyncOp)  # type: ignore[arg-type]


def decode_reply(data: bytes, type_: type[_T], max_bytes: int) -> _T:
    """A sync reply; a peer's refusal (`{"v": 1, "error": ...}`) is WireError("refused")."""
    msg = _decode_map(data, max_bytes)
    if "error" in msg:
        raise WireError("refused", f"peer refused: {str(msg['error'])[:200]}")
    return convert(msg, type_)


def encode(message: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(message)
