"""The vDAG block protocol: one request/response per Python-block call, between the daemon
running a vDAG and a daemon serving one of its blocks; and where those servers are found.

Request (msgpack): `BlockCall {block, digest, input, context, timeout_s}`; answer:
`BlockReply {ok, output, kind, message, load}` (on the multiplexed stream of
daemon.vdags.streams, batches of them, each under its call's id: `[MuxCall {id, call}]`,
`[MuxReply {id, reply}]`) — `load` is the calls to that block running at
the server when it answered (what least-loaded assignment reads). Both are decoded into
typed structs with the codec's size and depth bounds; a malformed request is refused and
counted, never raised into the host.

A server announces each Python block it serves as a `blocks` entry under
``<block id>@<last 12 characters of its peer id>`` with ``served_by: [its peer id]`` and
``parameters: {instanceOf: <block id>, digest: <the block package's hash>, kind: python}``
(`instance_key`, `instance_value`); `python_instances` reads them back, keeping only entries
the named server wrote itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any

import msgspec
from msgspec import Meta

from daemon.vdags.values import MAX_DEPTH, MAX_VALUE_BYTES
from p2p import codec
from registry.entry import Entry

BLOCK_PROTOCOL = "/gridmesh/vdag-block/1.0.0"
MAX_BLOCK_ID = 128
MAX_MESSAGE_BYTES = MAX_VALUE_BYTES + 64 * 1024  # a value and its envelope
MAX_TIMEOUT_S = 3600.0

BlockId = Annotated[str, Meta(min_length=1, max_length=MAX_BLOCK_ID, pattern=r"^[A-Za-z0-9._:-]+$")]
Digest = Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$")]


class BlockCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    block: BlockId
    input: Any
    timeout_s: Annotated[float, Meta(gt=0, le=MAX_TIMEOUT_S)]
    digest: Digest | None = None  # the block package the caller expects
    context: dict[str, Any] = {}


class BlockReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    ok: bool
    output: Any = None
    kind: Annotated[str, Meta(max_length=64)] = ""  # a failure's label
    message: Annotated[str, Meta(max_length=8192)] = ""
    load: Annotated[int, Meta(ge=0)] = 0


MAX_CALL_ID = (1 << 32) - 1


class MuxCall(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A block call on the multiplexed stream (daemon.vdags.streams): `id` pairs it with
    its reply, so that calls to one peer share one stream and are answered in any order."""

    id: Annotated[int, Meta(ge=0, le=MAX_CALL_ID)]
    call: BlockCall


class MuxReply(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: Annotated[int, Meta(ge=0, le=MAX_CALL_ID)]
    reply: BlockReply


# A frame of the multiplexed stream is a batch: the calls (replies) queued while the one
# before was sent, at most MAX_BATCH and MAX_MESSAGE_BYTES together.
MAX_BATCH = 64
MuxCalls = Annotated[list[MuxCall], Meta(min_length=1, max_length=MAX_BATCH)]
MuxReplies = Annotated[list[MuxReply], Meta(min_length=1, max_length=MAX_BATCH)]


class ProtocolError(ValueError):
    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def encode(message: BlockCall | BlockReply | MuxCall | MuxReply) -> bytes:
    return codec.encode(msgspec.to_builtins(message))


def decode_call(payload: bytes) -> BlockCall:
    return _decode(payload, BlockCall)


def decode_reply(payload: bytes) -> BlockReply:
    return _decode(payload, BlockReply)


def batch_frame(items: list[bytes]) -> bytes:
    """One frame of encoded MuxCalls (or MuxReplies): a msgpack array of them."""
    n = len(items)
    head = bytes([0x90 | n]) if n < 16 else b"\xdc" + n.to_bytes(2, "big")
    return head + b"".join(items)


def decode_mux_calls(payload: bytes) -> list[MuxCall]:
    return _decode(payload, MuxCalls, 2)


def decode_mux_replies(payload: bytes) -> list[MuxReply]:
    return _decode(payload, MuxReplies, 2)


def _decode(payload: bytes, kind: type[Any], envelope: int = 0) -> Any:
    """`payload` as a `kind`: a value at most MAX_DEPTH deep inside its envelope (two
    levels; `envelope` more for the multiplexed stream's batch and wrapper)."""
    try:
        depth = MAX_DEPTH + 2 + envelope
        raw = codec.decode(payload, max_bytes=MAX_MESSAGE_BYTES, max_depth=depth)
        return msgspec.convert(raw, kind)
    except codec.CodecError as exc:
        raise ProtocolError(exc.reason, str(exc)) from None
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid", str(exc)) from None


# -- instances in the `blocks` registry -----------------------------------------------------


def instance_key(block_id: str, peer_id: str) -> str:
    return f"{block_id}@{peer_id[-12:]}"


def instance_value(block_id: str, peer_id: str, digest: str) -> dict[str, Any]:
    return {
        "blockId": instance_key(block_id, peer_id),
        "blockComponentURI": f"python:{digest}",
        "served_by": [peer_id],
        "parameters": {"instanceOf": block_id, "digest": digest, "kind": "python"},
    }


class Instance(msgspec.Struct, frozen=True):
    peer_id: str
    digest: str


def python_instances(entries: Iterable[Entry], block_id: str) -> list[Instance]:
    """The servers announcing Python block `block_id`, by peer id; only entries written by
    the server they name, under that server's key."""
    found: dict[str, Instance] = {}
    for entry in entries:
        if entry.kind != "blocks" or entry.deleted or not isinstance(entry.value, dict):
            continue
        params = entry.value.get("parameters")
        if not isinstance(params, dict) or params.get("instanceOf") != block_id:
            continue
        author = entry.author
        if (
            not isinstance(author, str)
            or entry.value.get("served_by") != [author]
            or entry.key != instance_key(block_id, author)
            or not isinstance(params.get("digest"), str)
        ):
            continue
        found[author] = Instance(author, params["digest"])
    return sorted(found.values(), key=lambda i: i.peer_id)
