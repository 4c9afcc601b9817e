"""The shard control protocol: a peer asks this daemon to load or unload a range of layers
(when its config allows). Requests are validated here, at the boundary, before anything else."""

from __future__ import annotations

from typing import Annotated, Literal, Union

import msgspec

from daemon.shards.jobs import ShardServiceError

CONTROL_PROTOCOL = "/gridmesh/shard-control/1.0.0"
# loading a range may first import torch and then read gigabytes: allow it time
LOAD_TIMEOUT_S = 300.0


# the shard control protocol's requests, validated at the boundary
_Name = Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
_Layer = Annotated[int, msgspec.Meta(ge=0, le=1 << 16)]


class LoadRequest(msgspec.Struct, tag_field="op", tag="load", frozen=True):
    model: _Name
    model_dir: Annotated[str, msgspec.Meta(min_length=1, max_length=4096)]
    start: _Layer
    end: _Layer
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"


class UnloadRequest(msgspec.Struct, tag_field="op", tag="unload", frozen=True):
    model: _Name


ControlRequest = Union[LoadRequest, UnloadRequest]  # noqa: UP007 - msgspec wants a Union
_CONTROL = msgspec.msgpack.Decoder(ControlRequest)  # type: ignore[arg-type]
MAX_CONTROL_BYTES = 16 * 1024


def decode_control(payload: bytes) -> LoadRequest | UnloadRequest:
    """A control request with bounded fields and a known op, or ShardServiceError with the
    code a peer is answered (`too_large`, `bad_request`, `malformed`)."""
    if len(payload) > MAX_CONTROL_BYTES:
        raise ShardServiceError(
            "too_large", f"a control message is at most {MAX_CONTROL_BYTES} bytes"
        )
    try:
        return _CONTROL.decode(payload)
    except msgspec.ValidationError as exc:
        raise ShardServiceError("bad_request", str(exc)[:300]) from None
    except msgspec.MsgspecError as exc:
        raise ShardServiceError("malformed", f"not msgpack: {str(exc)[:200]}") from None
