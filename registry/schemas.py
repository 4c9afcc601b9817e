"""Registry kinds, the schema of each kind's values, and the admission hooks.

An entry is ``(kind, key) -> value`` where value is a JSON-like dict. Values arrive from users
over RPC and from peers over gossip, so everything here is bounded and every failure is a
`SchemaError` whose message names the entry and the offending field path, e.g.
``blocks/llama-shard-0: policyRulesSpec[1].name must be a string``.

Shapes are declared with `Spec` (types, required, nested fields, list items, enum, bounds)
rather than written as code; the few rules that span fields (blockId equals the key,
minInstances <= maxInstances, vDAG graph references) follow each kind's spec.

The AIOS block and vDAG specs (see DESIGN.md, "Formats worth keeping compatible") are
accepted as AIOS writes them, flattened (a vDAG node is the node object itself, not the
parser's ``{"spec": {"values": ...}}`` wrapper). A vDAG's ``graph`` takes the shapes that
AIOS uses and a simpler edge form:

- ``input`` / ``output``: non-empty lists whose items are a node label or an object with a
  ``nodeLabel`` (``{"nodeLabel": "a", "inputNames": ["input_0"]}``); other keys are kept.
- ``connections``: objects with a ``nodeLabel`` and optional ``inputs`` (items as above:
  the nodes feeding it), as AIOS writes them, or ``{"from": "a", "to": "b"}`` edges.
Every label named anywhere in the graph must be the ``nodeLabel`` of a node.

Admission hooks are pure functions of a `Write` that return a refusal reason or None; a
later issue replaces them with sandboxed Python policies. They judge the write itself (limits,
URI schemes); who may write what (owners, cluster admins) needs replica state and is
checked in `registry.replica`.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from registry import kinds, query, vdags
from registry.specs import (
    KINDS,
    MAX_DEPTH,
    MAX_KEY_LENGTH,
    MAX_LIST_ITEMS,
    MAX_STRING_LENGTH,
    MAX_VALUE_BYTES,
    PEER_ID_RE,
    SPECS,
    Spec,
)

__all__ = [
    "KINDS",
    "MAX_DEPTH",
    "MAX_KEY_LENGTH",
    "MAX_LIST_ITEMS",
    "MAX_STRING_LENGTH",
    "MAX_VALUE_BYTES",
    "AdmissionHook",
    "SchemaError",
    "Spec",
    "Write",
    "admit",
    "default_hooks",
    "spec_of",
    "validate_key",
    "validate_value",
]


_INT_MIN, _INT_MAX = -(2**63), 2**64 - 1  # what msgpack and sqlite can carry

_KEY_RE = re.compile(r"[A-Za-z0-9._:@/-]+")
_IDENT_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_-]*")
_SURROGATE_RE = re.compile("[\ud800-\udfff]")


class SchemaError(ValueError):
    """A key or value that does not fit its kind. `path` is the offending field path."""

    def __init__(self, message: str, path: str = "") -> None:
        super().__init__(message)
        self.path = path


class _Invalid(Exception):
    """Raised inside the checks; turned into a SchemaError with the entry's name."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(problem)
        self.path = path
        self.problem = problem


def _show(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def _join(path: str, name: str) -> str:
    if _IDENT_RE.fullmatch(name) and len(name) <= 64:
        return f"{path}.{name}" if path else name
    return f"{path}[{_show(name)}]"


# --------------------------------------------------------------------------- JSON bounds


def _check_json(value: Any, path: str, depth: int, budget: list[int]) -> None:
    """JSON types only, strings/lists/depth bounded; `budget` counts a lower bound of bytes."""
    if isinstance(value, dict | list):
        if depth > MAX_DEPTH:
            raise _Invalid(path, f"nests deeper than {MAX_DEPTH} levels")
        budget[0] += 2
        if isinstance(value, list):
            if len(value) > MAX_LIST_ITEMS:
                raise _Invalid(path, f"has {len(value)} items (limit {MAX_LIST_ITEMS})")
            for i, item in enumerate(value):
                budget[0] += 1
                _check_json(item, f"{path}[{i}]", depth + 1, budget)
        else:
            for name, item in value.items():
                if not isinstance(name, str):
                    raise _Invalid(path, f"has a non-string key {_show(repr(name))}")
                _check_string(name, path, "a key of ")
                budget[0] += len(name) + 4
                _check_json(item, _join(path, name), depth + 1, budget)
    elif isinstance(value, str):
        _check_string(value, path)
        budget[0] += len(value) + 2
    elif isinstance(value, bool) or value is None:
        budget[0] += 4
    elif isinstance(value, int):
        if not _INT_MIN <= value <= _INT_MAX:
            raise _Invalid(path, "is an integer that does not fit in 64 bits")
        budget[0] += 1
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Invalid(path, "must be a finite number")
        budget[0] += 1
    else:
        raise _Invalid(path, f"must be JSON data, not {type(value).__name__}")
    if budget[0] > MAX_VALUE_BYTES:
        raise _Invalid("", f"value is too large (more than {MAX_VALUE_BYTES} bytes as JSON)")


def _check_string(text: str, path: str, what: str = "") -> None:
    if len(text) > MAX_STRING_LENGTH:
        raise _Invalid(path, f"has {what}string longer than {MAX_STRING_LENGTH} characters")
    if not text.isascii() and _SURROGATE_RE.search(text):
        raise _Invalid(path, f"has {what}string with an unpaired surrogate")


def _check_bounds(value: dict[str, Any]) -> None:
    _check_json(value, "", 1, [0])
    size = len(json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8"))
    if size > MAX_VALUE_BYTES:
        raise _Invalid("", f"value is too large: {size} bytes as JSON (limit {MAX_VALUE_BYTES})")


# --------------------------------------------------------------------------- Spec

_TYPE_NAMES = {
    "str": "a string",
    "int": "an integer",
    "number": "a number",
    "bool": "a boolean",
    "dict": "an object",
    "list": "a list",
    "null": "null",
}


def _type_ok(types: tuple[str, ...], value: Any) -> str | None:
    """The matching type name for `value`, or None."""
    if isinstance(value, bool):
        name = "bool"
    elif isinstance(value, int):
        name = "int"
    elif isinstance(value, float):
        name = "number"
    elif isinstance(value, str):
        name = "str"
    elif isinstance(value, dict):
        name = "dict"
    elif isinstance(value, list):
        name = "list"
    elif value is None and "null" in types:
        return "null"
    else:
        return None
    if "any" in types or name in types:
        return name
    if name == "int" and "number" in types:
        return "number"
    return None


def _check(spec: Spec, value: Any, path: str) -> None:
    kind = _type_ok(spec.types, value)
    if kind is None:
        wanted = " or ".join(_TYPE_NAMES.get(t, t) for t in spec.types)
        raise _Invalid(path, f"must be {wanted}")
    if kind == "str":
        if spec.enum is not None and value not in spec.enum:
            allowed = ", ".join(sorted(spec.enum))
            raise _Invalid(path, f"must be one of {allowed} (got {_show(value)})")
        _check_length(spec, len(value), path, "characters")
        if spec.pattern is not None and not spec.pattern.fullmatch(value):
            raise _Invalid(path, f"must be {spec.pattern_doc} (got {_show(value)})")
    elif kind in ("int", "number"):
        if spec.minimum is not None and value < spec.minimum:
            raise _Invalid(path, f"must be >= {spec.minimum} (got {value})")
        if spec.maximum is not None and value > spec.maximum:
            raise _Invalid(path, f"must be <= {spec.maximum} (got {value})")
    elif kind == "list":
        _check_length(spec, len(value), path, "items")
        if spec.items is not None:
            for i, item in enumerate(value):
                _check(spec.items, item, f"{path}[{i}]")
        if spec.unique:
            seen: set[Any] = set()
            for item in value:
                marker = json.dumps(item, sort_keys=True)
                if marker in seen:
                    raise _Invalid(path, f"repeats {marker[:64]}")
                seen.add(marker)
    elif kind == "dict":
        _check_object(spec, value, path)


def _check_length(spec: Spec, length: int, path: str, unit: str) -> None:
    if spec.min_len is not None and length < spec.min_len:
        if spec.min_len == 1:
            raise _Invalid(path, "must not be empty")
        raise _Invalid(path, f"must have at least {spec.min_len} {unit}")
    if spec.max_len is not None and length > spec.max_len:
        raise _Invalid(path, f"must have at most {spec.max_len} {unit}")


def _check_object(spec: Spec, value: dict[str, Any], path: str) -> None:
    if spec.fields is not None:
        if not spec.open:
            for name in value:
                if name not in spec.fields:
                    allowed = ", ".join(spec.fields)
                    problem = f"unknown field {_show(name)} (allowed: {allowed})"
                    raise _Invalid(path, f"has {problem}" if path else problem)
        for name, sub in spec.fields.items():
            if name in value:
                _check(sub, value[name], _join(path, name))
            elif sub.required:
                raise _Invalid(_join(path, name), "is required")
    if spec.values is not None:
        for name, item in value.items():
            _check(spec.values, item, _join(path, name))


def _check_clusters(key: str, value: dict[str, Any]) -> None:
    settings = value.get("settings") or {}
    require = settings.get("require")
    if isinstance(require, str) and require.strip():
        try:
            query.parse(require)
        except query.QueryError as exc:
            raise _Invalid("settings.require", f"is not a valid filter: {exc}") from None


def _check_members(key: str, value: dict[str, Any]) -> None:
    cluster_id, _, peer_id = key.partition("/")
    if value["cluster_id"] != cluster_id:
        raise _Invalid(
            "cluster_id", f"{_show(value['cluster_id'])} does not match the key ({cluster_id!r})"
        )
    if value["peer_id"] != peer_id:
        raise _Invalid("peer_id", f"{_show(value['peer_id'])} does not match the key ({peer_id!r})")


def _check_blocks(key: str, value: dict[str, Any]) -> None:
    if value["blockId"] != key:
        raise _Invalid("blockId", f"{_show(value['blockId'])} must equal the key {_show(key)}")
    low, high = value.get("minInstances"), value.get("maxInstances")
    if low is not None and high is not None and low > high:
        raise _Invalid("minInstances", f"({low}) must be <= maxInstances ({high})")
    layers = value.get("layers")
    if layers is not None and layers[0] >= layers[1]:
        raise _Invalid("layers", f"must be [start, end) with start < end (got {layers})")


def _label_of(ref: Any) -> str:
    return ref if isinstance(ref, str) else ref["nodeLabel"]


def _check_vdags(key: str, value: dict[str, Any]) -> None:
    labels: set[str] = set()
    for i, node in enumerate(value["nodes"]):
        label = node["nodeLabel"]
        if label in labels:
            raise _Invalid(f"nodes[{i}].nodeLabel", f"repeats {_show(label)}")
        labels.add(label)
        if node["nodeType"] == "vdag" and not node.get("vdagURI"):
            raise _Invalid(f"nodes[{i}].vdagURI", "is required when nodeType is 'vdag'")

    def known(label: str, path: str) -> None:
        if label not in labels:
            raise _Invalid(path, f"names unknown node {_show(label)}")

    graph = value["graph"]
    for part in ("input", "output"):
        for i, ref in enumerate(graph[part]):
            path = f"graph.{part}[{i}]"
            known(_label_of(ref), path if isinstance(ref, str) else f"{path}.nodeLabel")
    for i, edge in enumerate(graph.get("connections", [])):
        path = f"graph.connections[{i}]"
        if "nodeLabel" not in edge and not ("from" in edge and "to" in edge):
            raise _Invalid(path, "needs a nodeLabel (with inputs) or both from and to")
        for name in ("nodeLabel", "from", "to"):
            if name in edge:
                known(edge[name], f"{path}.{name}")
        for j, ref in enumerate(edge.get("inputs", [])):
            ref_path = f"{path}.inputs[{j}]"
            known(_label_of(ref), ref_path if isinstance(ref, str) else f"{ref_path}.nodeLabel")
    try:  # the graph itself: cycles, unfed nodes, dead ends, names (registry.vdags)
        vdags.parse(value)
    except vdags.VdagSpecError as exc:
        raise _Invalid(exc.path, exc.problem) from None


_CROSS_CHECKS: dict[str, Callable[[str, dict[str, Any]], None]] = {
    "clusters": _check_clusters,
    "members": _check_members,
    "blocks": _check_blocks,
    "vdags": _check_vdags,
}


# --------------------------------------------------------------------------- public checks


def _check_kind(kind: Any) -> None:
    if not isinstance(kind, str) or kind not in KINDS:
        shown = _show(kind) if isinstance(kind, str) else type(kind).__name__
        raise SchemaError(f"unknown kind {shown}; expected one of {', '.join(KINDS)}")


def validate_key(kind: str, key: str) -> None:
    """Keys are 1..200 of ``[A-Za-z0-9._:@/-]``, no leading, trailing or double ``/``, no ``..``;
    a member's key is ``<cluster_id>/<peer_id>``."""
    _check_kind(kind)
    if not isinstance(key, str):
        raise SchemaError(f"{kind}: a key must be a string, not {type(key).__name__}", "key")
    problem = None
    if not 1 <= len(key) <= MAX_KEY_LENGTH:
        problem = f"must be 1 to {MAX_KEY_LENGTH} characters long (got {len(key)})"
    elif not _KEY_RE.fullmatch(key):
        problem = "may only use letters, digits and . _ : @ / -"
    elif key.startswith("/") or key.endswith("/") or "//" in key:
        problem = "must not start or end with '/' or contain '//'"
    elif ".." in key:
        problem = "must not contain '..'"
    elif kind == "members":
        cluster_id, _, peer_id = key.partition("/")
        if not cluster_id or not PEER_ID_RE.fullmatch(peer_id):
            problem = "must be <cluster_id>/<peer_id> (one '/')"
    if problem is not None:
        raise SchemaError(f"{kind}: key {_show(key)} {problem}", "key")


def validate_value(kind: str, key: str, value: dict[str, Any]) -> None:
    """Check `value` against its kind's schema; raise SchemaError naming the field path."""
    _check_kind(kind)
    if not isinstance(key, str):
        raise SchemaError(f"{kind}: a key must be a string, not {type(key).__name__}", "key")
    shown = key if len(key) <= MAX_KEY_LENGTH else "?"
    name = f"{kind}/{shown if _KEY_RE.fullmatch(shown) else _show(shown)}"
    try:
        if not isinstance(value, dict):
            raise _Invalid("", f"value must be an object, not {type(value).__name__}")
        _check_bounds(value)
        _check(SPECS[kind], value, "")
        cross = _CROSS_CHECKS.get(kind)
        if cross is not None:
            cross(key, value)
        _check_typed(kind, value)
    except _Invalid as exc:
        if exc.path:
            message = f"{exc.path} {exc.problem}"
        elif exc.problem.startswith(("value ", "unknown field")):
            message = exc.problem
        else:
            message = f"value {exc.problem}"
        raise SchemaError(f"{name}: {message}", exc.path) from None


def spec_of(kind: str) -> Spec:
    """The declared shape of a kind's values (`registry.kinds` derives its Structs from it)."""
    _check_kind(kind)
    return SPECS[kind]


def _check_typed(kind: str, value: dict[str, Any]) -> None:
    """Every accepted value must also have its typed form (`registry.kinds`)."""
    try:
        kinds.typed_value(kind, value)
    except kinds.TypedValueError as exc:
        raise _Invalid("", f"value has no typed form: {exc}") from None


# --------------------------------------------------------------------------- admission


@dataclass(frozen=True)
class Write:
    """A proposed put (`value` set) or delete (`value` None) by `author`.

    `existing_author` is who wrote the entry now stored under (kind, key), or None if none is.
    """

    kind: str
    key: str
    value: dict[str, Any] | None
    author: str
    existing_author: str | None = None


AdmissionHook = Callable[[Write], str | None]

MAX_CLUSTER_ADMINS = 64
MAX_BLOCK_INSTANCES = 10_000
MAX_LAYER_INDEX = 100_000
MAX_VDAG_NODES = vdags.MAX_NODES
# a server announcement's key: registry.blocks.announcement_key(model, start, end, peer_id)
ANNOUNCEMENT_KEY_RE = re.compile(r".+\.[0-9]+-[0-9]+\.([A-Za-z0-9]{12})")
ENDPOINT_SCHEMES = frozenset({"http", "https", "grpc", "grpcs"})


def _field(write: Write, name: str) -> Any:
    return write.value.get(name) if isinstance(write.value, dict) else None


def _local_uri(uri: Any) -> bool:
    """A file: URI or a filesystem path: it would point into whichever machine reads it."""
    if not isinstance(uri, str):
        return False
    return uri.startswith(("/", "~", "./", "../", "\\")) or uri.lower().startswith("file:")


def _admit_cluster(write: Write) -> str | None:
    admins = _field(write, "admins")
    if isinstance(admins, list) and len(admins) > MAX_CLUSTER_ADMINS:
        return f"a cluster may have at most {MAX_CLUSTER_ADMINS} admins (got {len(admins)})"
    return None


def _admit_member(write: Write) -> str | None:
    # Who may join, as what (admins, self-joins by the cluster's admission rule, its
    # `require` on the joiner's resource record) needs the cluster entry: the replica checks
    # it with `registry.clusters.member_refusal`. Here: what no writer may do.
    roles = _field(write, "roles")
    if _field(write, "status") == "requested" and isinstance(roles, list) and "admin" in roles:
        return "a join request cannot ask for the admin role: an admin grants it"
    return None


def _admit_component(write: Write) -> str | None:
    if _local_uri(_field(write, "uri")):
        return "a component's uri must not be a local file path"
    return None


def _admit_block(write: Write) -> str | None:
    for name in ("minInstances", "maxInstances"):
        count = _field(write, name)
        if isinstance(count, int) and count > MAX_BLOCK_INSTANCES:
            return f"{name} {count} is over the limit of {MAX_BLOCK_INSTANCES}"
    layers = _field(write, "layers")
    if isinstance(layers, list) and any(isinstance(n, int) and n > MAX_LAYER_INDEX for n in layers):
        return f"layers beyond {MAX_LAYER_INDEX} are refused"
    if _local_uri(_field(write, "blockComponentURI")):
        return "a block's blockComponentURI must not be a local file path"
    served_by = _field(write, "served_by")
    if isinstance(served_by, list) and served_by and served_by != [write.author]:
        return "served_by may only name the peer writing it: a server announces itself"
    reserved = ANNOUNCEMENT_KEY_RE.fullmatch(write.key)
    if reserved and not write.author.endswith(reserved.group(1)):
        return (
            "keys of the form <model>.<start>-<end>.<last 12 characters of a peer id> are "
            "that peer's server announcements"
        )
    return None


def _admit_vdag(write: Write) -> str | None:
    nodes = _field(write, "nodes")
    if isinstance(nodes, list) and len(nodes) > MAX_VDAG_NODES:
        return f"a vDAG may have at most {MAX_VDAG_NODES} nodes (got {len(nodes)})"
    return None


def _admit_policy(write: Write) -> str | None:
    if _local_uri(_field(write, "policyURI")):
        return "a policy's policyURI must not be a local file path"
    return None


def _admit_endpoint(write: Write) -> str | None:
    if write.value is None:
        return None
    url = _field(write, "url")
    if not isinstance(url, str):
        return "an endpoint needs a url"
    try:
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        has_userinfo = "@" in parts.netloc
        host = parts.hostname
    except ValueError:
        return f"url {_show(url)} is not a valid URL"
    if scheme not in ENDPOINT_SCHEMES:
        allowed = ", ".join(sorted(ENDPOINT_SCHEMES))
        return f"url scheme {_show(scheme)} is refused (allowed: {allowed})"
    if not host:
        return f"url {_show(url)} has no host"
    if has_userinfo:
        return "url must not carry credentials (user:password@)"
    peer_id = _field(write, "peer_id")
    if peer_id is not None and peer_id != write.author:
        return "an endpoint naming a peer_id may only be written by that peer"
    return None


default_hooks: dict[str, AdmissionHook] = {
    "clusters": _admit_cluster,
    "members": _admit_member,
    "components": _admit_component,
    "blocks": _admit_block,
    "vdags": _admit_vdag,
    "policies": _admit_policy,
    "endpoints": _admit_endpoint,
}


def admit(write: Write, hooks: Mapping[str, AdmissionHook] = default_hooks) -> str | None:
    """Run the kind's hook: a refusal reason, or None to accept.

    Validate the key and value first (`validate_key`, `validate_value`); hooks tolerate
    invalid values but do not report schema errors. A kind without a hook is refused, and a
    hook that raises refuses the write rather than crashing the caller.
    """
    hook = hooks.get(write.kind) if isinstance(write.kind, str) else None
    if hook is None:
        return f"no admission hook for kind {_show(str(write.kind))}"
    try:
        reason = hook(write)
    except Exception as exc:  # a hook is policy, not infrastructure: fail closed
        return f"admission hook for {write.kind} failed: {type(exc).__name__}"
    return None if reason is None else str(reason)
