"""What crosses the network for a cluster's coordinator (daemon.cluster.coordinator), typed
and bounded: the requests a member forwards to its coordinator over `COORDINATOR_PROTOCOL`,
and the bodies of the coordinator's fenced commands (`assign`, `release`, `deployments`),
which arrive already fenced by the runtime as dicts and are converted here before use."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

import msgspec
from msgspec import Meta

from p2p import codec
from scheduler.shard_plan import ModelSpec

COORDINATOR_PROTOCOL = "/gridmesh/cluster-coordinator/1.0.0"
MAX_REQUEST_BYTES = 16 * 1024
MAX_REPLY_BYTES = 1 << 20
MAX_DEPLOYMENTS = 64  # per cluster
MAX_INSTANCES = 64
MAX_WAIT_S = 600.0

ASSIGN = "assign"
RELEASE = "release"
DEPLOYMENTS = "deployments"

ClusterName = Annotated[str, Meta(pattern=r"^[A-Za-z0-9._:@-]{1,64}$")]
ModelName = Annotated[str, Meta(min_length=1, max_length=256)]
ModelDir = Annotated[str, Meta(min_length=1, max_length=4096)]
Dtype = Literal["float32", "float16", "bfloat16"]
Layer = Annotated[int, Meta(ge=0, le=1 << 16)]
Bytes = Annotated[int, Meta(ge=0, le=2**62)]
Instances = Annotated[int, Meta(ge=1, le=MAX_INSTANCES)]
Counter = Annotated[int, Meta(ge=0, le=2**62)]


class WireError(ValueError):
    """A request or body that can't be used; `reason` is what /metrics counts."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class _Strict(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    pass


Window = Annotated[int, Meta(ge=1, le=2**31)]  # a sliding-attention layer's window


class ModelShape(_Strict):
    """A model's size as placement needs it (scheduler.shard_plan.ModelSpec)."""

    num_layers: Annotated[int, Meta(ge=1, le=1 << 16)]
    layer_bytes: Bytes
    embed_bytes: Bytes
    head_bytes: Bytes
    cache_bytes_per_layer: Bytes = 0
    kv_bytes_per_token: Bytes = 0  # one position of one layer's keys and values
    layer_windows: Annotated[tuple[Window | None, ...], Meta(max_length=1 << 16)] = ()


class DeploySpec(_Strict):
    """A block deployed through a cluster: what to load, and how many copies (AIOS's
    minInstances / maxInstances; `replicas`, the copies wanted now, lies between them)."""

    model: ModelName
    model_dir: ModelDir
    shape: ModelShape
    dtype: Dtype = "float32"
    replicas: Instances = 1
    min_instances: Instances = 1
    max_instances: Instances = 1

    def model_spec(self) -> ModelSpec:
        shape = self.shape
        return ModelSpec(
            self.model,
            shape.num_layers,
            shape.layer_bytes,
            shape.embed_bytes,
            shape.head_bytes,
            shape.cache_bytes_per_layer,
            shape.kv_bytes_per_token,
            shape.layer_windows,
        )

    def problem(self) -> str | None:
        if self.min_instances > self.max_instances:
            return "min_instances must be at most max_instances"
        if not self.min_instances <= self.replicas <= self.max_instances:
            return "replicas must lie between min_instances and max_instances"
        return None


class Deployment(_Strict):
    """One entry of a cluster's deployment table: the spec and the copies it targets now."""

    spec: DeploySpec
    target: Instances


class DeployRequest(_Strict, tag_field="op", tag="deploy"):
    cluster: ClusterName
    spec: DeploySpec
    wait_s: Annotated[float, Meta(ge=0.0, le=MAX_WAIT_S)] = 60.0


class PlanRequest(_Strict, tag_field="op", tag="plan"):
    cluster: ClusterName
    spec: DeploySpec


class UndeployRequest(_Strict, tag_field="op", tag="undeploy"):
    cluster: ClusterName
    model: ModelName


class TableRequest(_Strict, tag_field="op", tag="table"):
    """A new coordinator asks the members for the deployment table they last accepted."""

    cluster: ClusterName


class LoadFailed(_Strict, tag_field="op", tag="load_failed"):
    """A member tells its coordinator that it could not carry out an `assign` (the range is
    placed elsewhere at once, not after `assign_timeout_s`)."""

    cluster: ClusterName
    model: ModelName
    start: Layer
    end: Layer
    error: Annotated[str, Meta(max_length=300)] = ""


Request = Union[DeployRequest, PlanRequest, UndeployRequest, TableRequest, LoadFailed]  # noqa: UP007
_REQUEST = msgspec.msgpack.Decoder(Request)  # type: ignore[arg-type]


class AssignBody(_Strict):
    """`assign`: load layers [start, end) of a model and announce them."""

    model: ModelName
    model_dir: ModelDir
    start: Layer
    end: Layer
    dtype: Dtype = "float32"


class ReleaseBody(_Strict):
    """`release`: stop serving the model's layers [start, end) (any range: None)."""

    model: ModelName
    start: Layer | None = None
    end: Layer | None = None


class TableBody(_Strict):
    """`deployments`: the cluster's deployment table, versioned by (term, version)."""

    term: Counter
    version: Counter
    deployments: Annotated[list[Deployment], Meta(max_length=MAX_DEPLOYMENTS)]


S = TypeVar("S", bound=msgspec.Struct)


AnyRequest = DeployRequest | PlanRequest | UndeployRequest | TableRequest | LoadFailed


def decode_request(payload: bytes) -> AnyRequest:
    if len(payload) > MAX_REQUEST_BYTES:
        raise WireError("too_large", f"a coordinator request is at most {MAX_REQUEST_BYTES} bytes")
    try:
        return _REQUEST.decode(payload)
    except msgspec.ValidationError as exc:
        raise WireError("bad_request", str(exc)[:300]) from None
    except msgspec.MsgspecError as exc:
        raise WireError("malformed", f"not msgpack: {str(exc)[:200]}") from None


def encode_request(request: msgspec.Struct) -> bytes:
    return msgspec.msgpack.encode(request)


def body_of(kind: type[S], body: Any) -> S:
    """A command body (a dict the runtime decoded) as its typed form; WireError if not."""
    try:
        typed = msgspec.convert(body, kind)
    except (msgspec.ValidationError, TypeError) as exc:
        raise WireError("bad_body", str(exc)[:300]) from None
    if isinstance(typed, AssignBody) and typed.start >= typed.end:
        raise WireError("bad_body", "start must be below end")
    return typed


def to_body(value: msgspec.Struct) -> dict[str, Any]:
    """A Struct as the plain dict a command carries."""
    return msgspec.to_builtins(value)


def decode_reply(raw: bytes) -> dict[str, Any]:
    """A coordinator's reply: a dict, bounded; WireError otherwise."""
    try:
        reply = codec.decode(raw, max_bytes=MAX_REPLY_BYTES)
    except codec.CodecError as exc:
        raise WireError("malformed", f"a malformed reply: {str(exc)[:200]}") from None
    if not isinstance(reply, dict):
        raise WireError("malformed", "a reply is a map")
    return reply
