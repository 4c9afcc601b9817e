"""A transport-free JSON-RPC 2.0 dispatcher.

`Dispatcher.handle` takes the raw request body and returns the serialized response (or None
when JSON-RPC says nothing is sent back). It never raises for bad input or failing handlers:
every problem becomes a JSON-RPC error object, so a transport only has to move bytes.

The caller bounds the body size before calling `handle`; nesting depth is bounded by a
pre-scan (`json_too_deep`) before the body reaches the C parser. That parser recurses on the C
stack up to the interpreter's recursion limit, which py_ecc (imported by eth_account) raises
to 100,000 on import: 70,000 `[` then overflowed the stack and killed the process. The scan
makes the depth independent of that limit, and `cap_recursion_limit` puts the limit back.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import sys
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import msgspec

from daemon.api.params import Param, convert, first_paragraph, signature_params
from daemon.errors import GridmeshError, InvalidParams, status_of

log = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603

MAX_BATCH = 100
MAX_JSON_DEPTH = 64  # arrays and objects nested inside each other, the envelope included
SANE_RECURSION_LIMIT = 1000  # CPython's default
_MAX_NAME_IN_MESSAGE = 64
_MAX_EXC_MESSAGE = 200

# Who sent the request being handled, set by the transport (e.g. "rpc:127.0.0.1:40312", one
# per connection); handlers use it to apply per-requester caps.
REQUESTER: ContextVar[str] = ContextVar("gridmesh_rpc_requester", default="")

Handler = Callable[..., Awaitable[Any]]
OutcomeHook = Callable[[str, str], None]

_NO_ID = object()  # marks a notification: the request had no "id" member


class RPCError(Exception):
    """A JSON-RPC error object as it goes out. The dispatcher makes these for protocol
    errors; handlers raise a `daemon.errors.GridmeshError` kind, whose code the table in
    `daemon.errors` decides (`rpc_error`)."""

    def __init__(self, code: int, message: str, data: Any = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = data

    def to_dict(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.data is not None:
            err["data"] = self.data
        return err


def invalid_params(msg: str, data: Any = None) -> InvalidParams:
    """The error a handler raises for a semantically bad argument (-32602)."""
    return InvalidParams(msg, data)


def rpc_error(error: GridmeshError) -> RPCError:
    """`error` as the JSON-RPC error object its kind maps to (`daemon.errors.STATUS`)."""
    return RPCError(status_of(error).jsonrpc, error.message, error.data)


@dataclass(frozen=True)
class _Method:
    name: str
    handler: Handler
    params: tuple[Param, ...]
    description: str
    struct: type[msgspec.Struct]  # validates the bound params (types, bounds)


class _Reject(Exception):
    """Internal: stop processing one request with this error and outcome label."""

    def __init__(self, error: RPCError, outcome: str) -> None:
        super().__init__(error.message)
        self.error = error
        self.outcome = outcome


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


# A JSON string (escapes included); what is left outside strings is structure and scalars.
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}


def json_too_deep(data: bytes, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether `data` nests arrays/objects deeper than `limit`, without parsing it.

    Linear and iterative: strings are cut out by a regex, then the brackets left are summed.
    An unterminated string counts its brackets (the body is invalid JSON anyway).
    """
    if data.count(b"[") + data.count(b"{") <= limit:  # the usual case: nothing to scan
        return False
    brackets = _JSON_STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    return max(accumulate(_STEP[b] for b in brackets), default=0) > limit


def cap_recursion_limit(limit: int = SANE_RECURSION_LIMIT) -> None:
    """Undo py_ecc's import-time `sys.setrecursionlimit(100000)` for this process.

    py_ecc is imported here, once, so that its side effect happens now and not later, when
    eth_account is first imported lazily (p2p.identity); then the limit is lowered again, so
    a deep recursion anywhere is a RecursionError and never a C stack overflow. Called where
    the daemon starts its RPC server and where the CLI makes its RPC client.
    """
    import py_ecc  # noqa: F401 - for its import side effect

    if sys.getrecursionlimit() > limit:
        sys.setrecursionlimit(limit)


class Dispatcher:
    """Routes JSON-RPC 2.0 requests to registered async handlers.

    `on_outcome(method, outcome)` is called once per request (batch members included) with
    the method name, or "-" when the request had no valid or known method (so unknown names
    sent by clients cannot blow up metric label cardinality), and "ok" or an error reason.
    """

    def __init__(
        self, *, on_outcome: OutcomeHook | None = None, max_batch: int = MAX_BATCH
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self._methods: dict[str, _Method] = {}
        self._on_outcome = on_outcome
        self.max_batch = max_batch

    def register(self, name: str, handler: Handler, description: str | None = None) -> None:
        """Register `async def handler(...)` as method `name`.

        Its parameters are its signature: each annotation (`Annotated[T, msgspec.Meta(...)]`
        for bounds and a `description`) is the parameter's type, validation and
        documentation, a default makes it optional (see `daemon.api.params`). A value that
        breaks them answers -32602 naming the parameter. `description` defaults to the first
        paragraph of the handler's docstring.
        """
        if not isinstance(name, str) or not name:
            raise ValueError("method name must be a non-empty string")
        if name.startswith("rpc."):
            raise ValueError("method names starting with 'rpc.' are reserved by JSON-RPC 2.0")
        if name in self._methods:
            raise ValueError(f"method {name!r} is already registered")
        if not inspect.iscoroutinefunction(handler):
            raise TypeError(f"handler for {name!r} must be an async function")
        if description is None:
            description = first_paragraph(handler)
        declared, struct = signature_params(name, handler)
        self._methods[name] = _Method(name, handler, declared, description, struct)

    def handler(self, name: str) -> Handler | None:
        """The handler registered as `name` (for a method that delegates to another; its
        arguments are then the caller's to validate), or None."""
        method = self._methods.get(name)
        return method.handler if method is not None else None

    def describe(self) -> list[dict[str, Any]]:
        """All methods, sorted by name, in a JSON-ready form (served as `rpc_methods`)."""
        return [
            {
                "name": m.name,
                "description": m.description,
                "params": [
                    {
                        "name": p.name,
                        "type": p.type_name,
                        "required": p.required,
                        "description": p.description,
                    }
                    for p in m.params
                ],
            }
            for m in sorted(self._methods.values(), key=lambda m: m.name)
        ]

    async def handle(self, body: bytes) -> bytes | None:
        """Serialized response to `body`, or None when there is nothing to send."""
        if json_too_deep(body):
            self._outcome("-", "parse_error")
            msg = f"parse error: JSON nested deeper than {MAX_JSON_DEPTH} levels"
            return _dump(_error_response(None, RPCError(PARSE_ERROR, msg)))
        try:
            text = body.decode("utf-8")
            doc = json.loads(text, parse_constant=_reject_constant)
        except (UnicodeDecodeError, ValueError, RecursionError) as e:
            self._outcome("-", "parse_error")
            msg = "parse error: body is not valid UTF-8 JSON"
            if isinstance(e, RecursionError):
                msg = "parse error: JSON nested too deeply"
            return _dump(_error_response(None, RPCError(PARSE_ERROR, msg)))

        if isinstance(doc, list):
            if not doc:
                self._outcome("-", "invalid_request")
                err = RPCError(INVALID_REQUEST, "invalid request: empty batch")
                return _dump(_error_response(None, err))
            if len(doc) > self.max_batch:
                self._outcome("-", "invalid_request")
                err = RPCError(
                    INVALID_REQUEST,
                    f"invalid request: batch of {len(doc)} exceeds the limit of {self.max_batch}",
                )
                return _dump(_error_response(None, err))
            parts = [r for r in [await self._handle_one(item) for item in doc] if r is not None]
            return b"[" + b",".join(parts) + b"]" if parts else None
        return await self._handle_one(doc)

    async def _handle_one(self, req: Any) -> bytes | None:
        """Process one request object; returns its serialized response or None."""
        req_id: Any = None
        method_label = "-"
        try:
            if not isinstance(req, dict):
                raise _Reject(
                    RPCError(INVALID_REQUEST, "invalid request: expected a JSON object"),
                    "invalid_request",
                )
            req_id = _extract_id(req)
            if req.get("jsonrpc") != "2.0":
                raise _Reject(
                    RPCError(INVALID_REQUEST, 'invalid request: "jsonrpc" must be "2.0"'),
                    "invalid_request",
                )
            name = req.get("method")
            if not isinstance(name, str):
                raise _Reject(
                    RPCError(INVALID_REQUEST, 'invalid request: "method" must be a string'),
                    "invalid_request",
                )
            params = req.get("params", _NO_ID)
            if params is not _NO_ID and not isinstance(params, dict | list):
                raise _Reject(
                    RPCError(
                        INVALID_REQUEST, 'invalid request: "params" must be an object or array'
                    ),
                    "invalid_request",
                )
            method = self._methods.get(name)
            if method is None:
                shown = _short(name, _MAX_NAME_IN_MESSAGE)
                raise _Reject(
                    RPCError(METHOD_NOT_FOUND, f"method not found: {shown!r}"),
                    "method_not_found",
                )
            method_label = name
            kwargs = _bind(method, None if params is _NO_ID else params)
            kwargs = _validate(method.struct, kwargs)
            result = await self._call(method, kwargs)
            response: dict[str, Any] = {"jsonrpc": "2.0", "result": result, "id": req_id}
            outcome = "ok"
        except _Reject as r:
            response = _error_response(req_id, r.error)
            outcome = r.outcome

        if req_id is _NO_ID:
            # A notification (valid envelope, no "id"): executed, never answered.
            self._outcome(method_label, outcome)
            return None
        try:
            out = _dump(response)
        except (TypeError, ValueError, RecursionError) as e:
            log.error("rpc %s: response is not JSON-serializable: %s", method_label, e)
            err = RPCError(INTERNAL_ERROR, "internal error: response is not JSON-serializable")
            out = _dump(_error_response(req_id, err))
            outcome = "internal_error"
        self._outcome(method_label, outcome)
        return out

    async def _call(self, method: _Method, kwargs: dict[str, Any]) -> Any:
        try:
            return await method.handler(**kwargs)
        except RPCError as e:
            raise _Reject(e, "app_error") from None
        except GridmeshError as e:
            raise _Reject(rpc_error(e), "app_error") from None
        except Exception as e:
            # Handlers must never take the daemon down; report and log instead.
            log.exception("rpc %s: handler failed", method.name)
            detail = _short(str(e), _MAX_EXC_MESSAGE)
            msg = f"internal error: {type(e).__name__}: {detail}"
            raise _Reject(RPCError(INTERNAL_ERROR, msg), "internal_error") from None

    def _outcome(self, method: str, outcome: str) -> None:
        if self._on_outcome is None:
            return
        try:
            self._on_outcome(method, outcome)
        except Exception:
            log.exception("rpc on_outcome hook failed")


def _extract_id(req: dict[str, Any]) -> Any:
    """The request's id, `_NO_ID` for a notification; rejects ids of the wrong type."""
    if "id" not in req:
        # Only a well-formed request counts as a notification; errors in the envelope are
        # still reported (with id null), as the JSON-RPC 2.0 examples do.
        if req.get("jsonrpc") == "2.0" and isinstance(req.get("method"), str):
            return _NO_ID
        return None
    req_id = req["id"]
    if req_id is None or isinstance(req_id, str):
        return req_id
    if isinstance(req_id, int) and not isinstance(req_id, bool):
        return req_id
    raise _Reject(
        RPCError(INVALID_REQUEST, 'invalid request: "id" must be a string, integer or null'),
        "invalid_request",
    )


def _bind(method: _Method, params: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
    """Check `params` against the declared parameters and return handler kwargs."""
    declared = method.params
    if params is None:
        given: dict[str, Any] = {}
    elif isinstance(params, list):
        if len(params) > len(declared):
            raise _bad_params(
                f"too many positional parameters for {method.name!r}: "
                f"got {len(params)}, at most {len(declared)}"
            )
        given = {p.name: v for p, v in zip(declared, params, strict=False)}
    else:
        known = {p.name for p in declared}
        extra = sorted(k for k in params if k not in known)
        if extra:
            shown = ", ".join(repr(_short(k, _MAX_NAME_IN_MESSAGE)) for k in extra[:5])
            raise _bad_params(f"unknown parameter(s) for {method.name!r}: {shown}")
        given = dict(params)
    for p in declared:
        if p.name not in given:
            if p.required:
                raise _bad_params(f"missing required parameter {p.name!r} ({p.type_name})")
            continue
        value = given[p.name]
        if not p.accepts(value):
            raise _bad_params(
                f"parameter {p.name!r} must be {p.type_name}, got {_json_type(value)}"
            )
    return given


def _validate(struct: type[msgspec.Struct], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Every field of `struct`, converted from `kwargs` with its bounds checked."""
    try:
        value = convert(struct, kwargs)
    except InvalidParams as e:
        raise _Reject(rpc_error(e), "invalid_params") from None
    return {f: getattr(value, f) for f in struct.__struct_fields__}


def _bad_params(msg: str) -> _Reject:
    return _Reject(rpc_error(InvalidParams(f"invalid params: {msg}")), "invalid_params")


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    return type(value).__name__


def _error_response(req_id: Any, err: RPCError) -> dict[str, Any]:
    return {"jsonrpc": "2.0", "error": err.to_dict(), "id": None if req_id is _NO_ID else req_id}


def _dump(obj: Any) -> bytes:
    # ensure_ascii keeps lone surrogates (legal in JSON strings) encodable; allow_nan=False
    # keeps the output strict JSON.
    return json.dumps(obj, separators=(",", ":"), allow_nan=False).encode("ascii")
