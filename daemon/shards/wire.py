"""Shard messages on the wire: a small msgpack header, then raw tensor bytes. Never pickle.

A frame is `u32 header length | msgpack header | tensor bytes`. The header is one of the typed
messages below (tagged by `op`), validated with its bounds by msgspec before anything else is
looked at; for a tensor it also carries the dtype and shape, which the decoder checks against
a byte limit (a fixed one, or one the caller derives from the message, e.g. from the
session's shape) before it touches the bytes, so a peer cannot make us allocate more than
that. Every malformed input raises `WireError`, never anything else.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from typing import Annotated, Any, Literal, Union

import msgspec
import torch

from p2p import codec

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
}
NAMES = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 8 * 1024
MAX_TENSOR_BYTES = 256 << 20
MAX_DIMS = 4
MAX_DEPTH = 256  # hops a chain may declare (a chain has at most one hop per layer)
_LEN = struct.Struct(">I")

# bounds of the header fields
PeerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
SessionId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
LinkToken = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Count = Annotated[int, msgspec.Meta(ge=0, le=1 << 31)]
Text = Annotated[str, msgspec.Meta(max_length=1024)]
Shape = Annotated[list[Count], msgspec.Meta(min_length=1, max_length=MAX_DIMS)]
DTypeName = Literal["float32", "float16", "bfloat16", "int64", "int32"]
JobId = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
# a signed receipt (contracts.eip712.encode_signed_receipt), decoded by the payer's daemon
ReceiptBytes = Annotated[bytes, msgspec.Meta(min_length=1, max_length=4096)]


class WireError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class _Message(msgspec.Struct, tag_field="op", kw_only=True, omit_defaults=True, frozen=True):
    """Every header: its `op` tag, and the tensor's dtype and shape when one follows."""

    dtype: DTypeName | None = None
    shape: Shape | None = None


class NextHop(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Where a session's output goes in a chained step: the next server, its session, and
    the link token that server gave the session's opener (a push must show it)."""

    peer: PeerId
    session: SessionId
    link: LinkToken


# -- client -> server ------------------------------------------------------------------


class Open(_Message, tag="open"):
    """Open a session. `prev`: the only peer that may push into it (the previous hop of a
    chain); `next`: where its chained steps push their output (None: the session's owner
    gets the result); `depth`: how many hops the session's whole chain has, so that the
    server splits the steps of concurrent chains into that many micro-batches
    (`daemon.shards.batching`; None, as older clients send: one hop)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    start: Count
    end: Count
    max_length: Annotated[int, msgspec.Meta(ge=1, le=1 << 24)]
    prev: PeerId | None = None
    next: NextHop | None = None
    job: JobId | None = None  # the paid job the session's steps are for (None: free work)
    depth: Annotated[int, msgspec.Meta(ge=1, le=MAX_DEPTH)] | None = None


class Link(_Message, tag="link"):
    """Re-point a session's chained output (after the hops behind it were re-routed)."""

    session: SessionId
    next: NextHop | None = None


class Forward(_Message, tag="forward"):
    """A step. `step` set: chained (the output goes on to the session's next hop, a copy
    or the result to its owner, tagged with `step`); else relayed (answered with `result`).
    `pushed`/`link`: sent by the previous server of a chain, not by the owner."""

    session: SessionId
    position: Count
    step: Count | None = None
    last_only: bool = False
    pushed: bool = False
    link: LinkToken | None = None


class Close(_Message, tag="close"):
    session: SessionId


# -- server -> client ------------------------------------------------------------------


class Opened(_Message, tag="opened"):
    session: SessionId
    link: LinkToken


class Linked(_Message, tag="linked"):
    session: SessionId


class Closed(_Message, tag="closed"):
    pass


class Result(_Message, tag="result"):
    """A step's output. `receipt`: in a paid session, this hop's signed receipt of the step."""

    length: Count | None = None
    step: Count | None = None
    receipt: ReceiptBytes | None = None


class Partial(_Message, tag="partial"):
    """A copy of what a hop pushed on (the client records it for replay), with the hop's
    receipt of the step in a paid session: each hop's receipt reaches the payer once."""

    step: Count
    position: Count
    forward_error: Text | None = None
    failed_peer: PeerId | None = None
    receipt: ReceiptBytes | None = None


class Error(_Message, tag="error"):
    code: Annotated[str, msgspec.Meta(max_length=64)]
    message: Text = ""
    step: Count | None = None


Request = Union[Open, Link, Forward, Close]  # noqa: UP007 - msgspec wants a real Union here
Reply = Union[Opened, Linked, Closed, Result, Partial, Error]  # noqa: UP007
Message = Union[Open, Link, Forward, Close, Opened, Linked, Closed, Result, Partial, Error]  # noqa: UP007
_DECODER = msgspec.msgpack.Decoder(Message)  # type: ignore[arg-type]
_ENCODER = msgspec.msgpack.Encoder()


def encode(header: _Message | dict[str, Any], tensor: torch.Tensor | None = None) -> bytes:
    """A frame. `header` is a typed message (or a plain map: tests craft bad frames so)."""
    payload = b""
    extra: dict[str, Any] = {}
    if tensor is not None:
        tensor = tensor.detach().contiguous().cpu()
        if tensor.dtype not in NAMES:
            raise WireError("bad_dtype", f"{tensor.dtype} cannot be sent")
        extra = {"dtype": NAMES[tensor.dtype], "shape": list(tensor.shape)}
        payload = tensor_bytes(tensor)
    if isinstance(header, _Message):
        packed = _ENCODER.encode(msgspec.structs.replace(header, **extra) if extra else header)
    else:
        packed = codec.encode({**header, **extra})
    return _LEN.pack(len(packed)) + packed + payload


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes as a frame carries them (what receipts hash)."""
    tensor = tensor.detach().contiguous().cpu()
    # bfloat16 has no numpy twin: send its raw 16-bit pattern
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return raw.numpy().tobytes()


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize  # (was a tensor made per call: ~19,000 per bench/verify.py run)


def decode_header(frame: bytes) -> tuple[Message, memoryview]:
    """The validated header of a frame, and its payload bytes (not yet checked)."""
    if len(frame) < _LEN.size:
        raise WireError("malformed", "frame shorter than its length prefix")
    (header_len,) = _LEN.unpack_from(frame)
    if header_len > MAX_HEADER_BYTES or _LEN.size + header_len > len(frame):
        raise WireError("malformed", "bad header length")
    try:
        header = _DECODER.decode(memoryview(frame)[_LEN.size : _LEN.size + header_len])
    except msgspec.ValidationError as exc:
        raise WireError("bad_header", str(exc)[:300]) from None
    except msgspec.MsgspecError as exc:
        raise WireError("malformed", f"not a msgpack header: {str(exc)[:200]}") from None
    if (header.dtype is None) != (header.shape is None):
        raise WireError("bad_shape", "a tensor needs both dtype and shape")
    return header, memoryview(frame)[_LEN.size + header_len :]


def decode(
    frame: bytes, *, max_bytes: int | Callable[[Message], int] = MAX_TENSOR_BYTES
) -> tuple[Message, torch.Tensor | None]:
    """A frame's typed header and tensor. `max_bytes`: the most tensor bytes accepted, or a
    function of the header that says so (e.g. from the session the header names)."""
    header, payload = decode_header(frame)
    limit = max_bytes(header) if callable(max_bytes) else max_bytes
    return header, decode_tensor(header, payload, limit)


def decode_tensor(header: Message, payload: memoryview, max_bytes: int) -> torch.Tensor | None:
    """The tensor a header announces, at most `max_bytes` of it (see `decode`)."""
    if header.dtype is None or header.shape is None:
        if payload:
            raise WireError("malformed", "bytes after a header without a tensor")
        return None
    dtype, shape = DTYPES[header.dtype], header.shape
    nbytes = math.prod(shape) * element_size(dtype)
    if nbytes > max_bytes:
        raise WireError("too_large", f"tensor of {nbytes} bytes exceeds the limit of {max_bytes}")
    if nbytes != len(payload):
        raise WireError("bad_shape", f"shape {shape} needs {nbytes} bytes, got {len(payload)}")
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(bytearray(payload), dtype=storage).reshape(shape)
    return tensor.view(dtype) if dtype == torch.bfloat16 else tensor


def op(message: Message) -> str:
    """A message's `op` tag, e.g. "opened"."""
    return str(message.__struct_config__.tag)
