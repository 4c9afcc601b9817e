"""Shard messages on the wire: a small msgpack header, then raw tensor bytes. Never pickle.

A frame is `u32 header length | msgpack header | tensor bytes`. The header says what the
message is and, for a tensor, its dtype and shape; the decoder checks both against limits
before it touches the bytes, so a peer cannot make us allocate more than `max_bytes`.
"""

from __future__ import annotations

import math
import struct
from typing import Any

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
MAX_HEADER_BYTES = 64 * 1024
MAX_TENSOR_BYTES = 256 << 20
MAX_DIMS = 4
_LEN = struct.Struct(">I")


class WireError(ValueError):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def encode(header: dict[str, Any], tensor: torch.Tensor | None = None) -> bytes:
    header = dict(header)
    payload = b""
    if tensor is not None:
        tensor = tensor.detach().contiguous().cpu()
        if tensor.dtype not in NAMES:
            raise WireError("bad_dtype", f"{tensor.dtype} cannot be sent")
        header["dtype"] = NAMES[tensor.dtype]
        header["shape"] = list(tensor.shape)
        # bfloat16 has no numpy twin: send its raw 16-bit pattern
        raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
        payload = raw.numpy().tobytes()
    packed = codec.encode(header)
    return _LEN.pack(len(packed)) + packed + payload


def decode(
    frame: bytes, *, max_bytes: int = MAX_TENSOR_BYTES
) -> tuple[dict[str, Any], torch.Tensor | None]:
    if len(frame) < _LEN.size:
        raise WireError("malformed", "frame shorter than its length prefix")
    (header_len,) = _LEN.unpack_from(frame)
    if header_len > MAX_HEADER_BYTES or _LEN.size + header_len > len(frame):
        raise WireError("malformed", "bad header length")
    try:
        header = codec.decode(frame[_LEN.size : _LEN.size + header_len], max_bytes=MAX_HEADER_BYTES)
    except codec.CodecError as exc:
        raise WireError("malformed", str(exc)) from None
    if not isinstance(header, dict):
        raise WireError("malformed", "header must be a map")
    payload = memoryview(frame)[_LEN.size + header_len :]
    if "dtype" not in header:
        if payload:
            raise WireError("malformed", "bytes after a header without a tensor")
        return header, None
    dtype, shape = DTYPES.get(str(header.get("dtype"))), header.get("shape")
    if dtype is None:
        raise WireError("bad_dtype", f"dtype {str(header.get('dtype'))[:20]!r} is not allowed")
    if (
        not isinstance(shape, list)
        or not 1 <= len(shape) <= MAX_DIMS
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise WireError("bad_shape", "shape must be 1 to 4 non-negative integers")
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes > max_bytes:
        raise WireError("too_large", f"tensor of {nbytes} bytes exceeds the limit of {max_bytes}")
    if nbytes != len(payload):
        raise WireError("bad_shape", f"shape {shape} needs {nbytes} bytes, got {len(payload)}")
    if nbytes == 0:
        return header, torch.empty(shape, dtype=dtype)
    storage = torch.int16 if dtype == torch.bfloat16 else dtype
    tensor = torch.frombuffer(bytearray(payload), dtype=storage).reshape(shape)
    return header, tensor.view(dtype) if dtype == torch.bfloat16 else tensor
