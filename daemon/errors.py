"""The daemon's errors: one root (`GridmeshError`), a subclass per kind of failure, and ONE
table (`STATUS`) that decides what each kind is on every front door: its JSON-RPC error
code, its gRPC status and its HTTP status.

A method raises the kind of failure it met (`Busy`, `NotFound`, `InvalidParams`...); the
front doors look the code up (`status_of`) and never choose a code themselves or read an
error's text. Errors raised below the daemon (p2p's `NetworkError`, registry's `Rejected`,
the shard service's `ShardServiceError`) stay free of this vocabulary — p2p and registry
import nothing of the daemon — and are translated into these kinds where the daemon meets
them (`from_network`, `from_rejected`, `from_shard_service`).

Codes a client sees are part of the API: the table keeps those of the earlier hand-written
mappings (busy -32031 / RESOURCE_EXHAUSTED, not found -32004, a refused registry write
-32020, a network failure -32010, a shard failure -32030, bad params -32602, a missing
cookie -32001 / UNAUTHENTICATED).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar


class GridmeshError(Exception):
    """The root: a failure a client of this daemon may see. `code` names its kind (stable,
    machine-readable, one per class); `data` goes out as the JSON-RPC error's `data`."""

    code: ClassVar[str] = "internal"

    def __init__(self, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.data = data


class InvalidParams(GridmeshError):
    """The request itself is wrong: a bad, missing or out-of-range argument."""

    code = "invalid_params"


class FailedPrecondition(InvalidParams):
    """A valid request this node cannot serve in its current state (e.g. a prompt as text
    where this node holds no tokenizer). JSON-RPC reports it as bad params, as it always
    has; gRPC as FAILED_PRECONDITION."""

    code = "failed_precondition"


class NotFound(GridmeshError):
    """What the request names does not exist (a registry entry, a job)."""

    code = "not_found"


class Unauthorized(GridmeshError):
    """No or a wrong credential (the RPC cookie)."""

    code = "unauthorized"


class Busy(GridmeshError):
    """A cap was reached (generations running, servers' sessions): retry later."""

    code = "busy"


class Unavailable(GridmeshError):
    """Something this daemon depends on cannot answer now."""

    code = "unavailable"


class NetworkFailure(Unavailable):
    """A peer could not be dialed or did not answer."""

    code = "network"


class ShuttingDown(Unavailable):
    """This daemon is stopping."""

    code = "shutting_down"


class RegistryRefused(GridmeshError):
    """The registry refused a write: schema, quota, clock, author..."""

    code = "registry_refused"


class ConfigInvalid(GridmeshError):
    """A setting is missing or wrong."""

    code = "config"


class ShardFailure(GridmeshError):
    """Block shards failed: a load, a plan, a generation."""

    code = "shard"


class ModelNotServed(ShardFailure):
    """No server announces the model."""

    code = "model_not_served"


class ShardRefused(ShardFailure):
    """A shard server refused the request itself (its shape, its arguments)."""

    code = "shard_refused"


class RouteUnavailable(ShardFailure):
    """No route through the servers, or a hop failed, and it could not be recovered."""

    code = "route_unavailable"


class Cancelled(ShardFailure):
    """The generation was cancelled."""

    code = "cancelled"


@dataclass(frozen=True)
class Status:
    """What one kind of error is on each front door."""

    jsonrpc: int
    grpc: str  # a `grpc.StatusCode` name (this module does not import grpc)
    http: int


# THE mapping. Every row is a class above; `status_of` walks an error's classes, so a
# subclass without a row gets its parent's.
STATUS: dict[type[GridmeshError], Status] = {
    GridmeshError: Status(-32603, "INTERNAL", 500),
    InvalidParams: Status(-32602, "INVALID_ARGUMENT", 400),
    FailedPrecondition: Status(-32602, "FAILED_PRECONDITION", 400),
    NotFound: Status(-32004, "NOT_FOUND", 404),
    Unauthorized: Status(-32001, "UNAUTHENTICATED", 401),
    Busy: Status(-32031, "RESOURCE_EXHAUSTED", 429),
    Unavailable: Status(-32010, "UNAVAILABLE", 503),
    NetworkFailure: Status(-32010, "UNAVAILABLE", 502),
    ShuttingDown: Status(-32010, "UNAVAILABLE", 503),
    RegistryRefused: Status(-32020, "FAILED_PRECONDITION", 409),
    ConfigInvalid: Status(-32603, "FAILED_PRECONDITION", 500),
    ShardFailure: Status(-32030, "ABORTED", 502),
    ModelNotServed: Status(-32030, "NOT_FOUND", 404),
    ShardRefused: Status(-32030, "INVALID_ARGUMENT", 400),
    RouteUnavailable: Status(-32030, "UNAVAILABLE", 503),
    Cancelled: Status(-32030, "CANCELLED", 499),
}

# the kinds by their code, for an error that crossed a boundary as its code alone
BY_CODE: dict[str, type[GridmeshError]] = {cls.code: cls for cls in STATUS}


def status_of(error: GridmeshError | type[GridmeshError]) -> Status:
    """The front doors' codes for `error` (an instance or a class)."""
    cls = error if isinstance(error, type) else type(error)
    for klass in cls.__mro__:
        status = STATUS.get(klass)  # type: ignore[arg-type]
        if status is not None:
            return status
    raise TypeError(f"{cls.__name__} is not a GridmeshError")  # pragma: no cover


# -- errors from below the daemon, translated where the daemon meets them ----------------


def from_network(exc: Exception) -> NetworkFailure:
    """p2p's `NetworkError` (a dial or a request that failed)."""
    return NetworkFailure(str(exc))


def from_rejected(exc: Any) -> GridmeshError:
    """registry's `Rejected` (a refused write, or a key that does not exist)."""
    reason = str(getattr(exc, "reason", "rejected"))
    cls = NotFound if reason == "not_found" else RegistryRefused
    return cls(f"{reason}: {exc}", {"reason": reason})


def from_shard_service(exc: Any) -> GridmeshError:
    """The shard service's `ShardServiceError(code, message)`: busy is `Busy`, anything
    else a `ShardFailure`; the service's code travels as data `reason`."""
    reason = str(getattr(exc, "code", "shard"))
    cls = Busy if reason == "busy" else ShardFailure
    return cls(f"{reason}: {exc}", {"reason": reason})


def from_encoding(exc: Any) -> InvalidParams:
    """A prompt the shard service could not turn into token ids: an empty prompt is a bad
    argument, a missing or broken tokenizer a precondition of this node."""
    cls = InvalidParams if getattr(exc, "code", "") == "empty_prompt" else FailedPrecondition
    return cls(str(exc))


_GENERATION_KINDS: dict[str, type[GridmeshError]] = {"busy": Busy, "refused": ShardRefused}


def from_generation(exc: Exception) -> GridmeshError:
    """A failed step through the chain (`GenerationError`, by its `code`): servers that
    answered busy are `Busy`, a server refusing the request `ShardRefused`, anything else
    `RouteUnavailable`."""
    return _GENERATION_KINDS.get(getattr(exc, "code", ""), RouteUnavailable)(str(exc))


def generation_failure(exc: Exception) -> type[GridmeshError]:
    """The kind of a generation job that failed with `exc` (`GenerationError`, by its
    `code`): `Busy`, `ShardRefused`, else `ShardFailure`."""
    return _GENERATION_KINDS.get(getattr(exc, "code", ""), ShardFailure)
