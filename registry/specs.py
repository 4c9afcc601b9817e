"""The declared shapes of the registry kinds' values: `Spec` and one declaration per kind.

Declarations only, no checking: `registry.schemas` checks values against them (with error
messages that name the field path) and `registry.kinds` derives typed msgspec Structs from
the same declarations, so that the two can never disagree on a shape.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from p2p.records import MAX_PRICE_PER_UNIT

KINDS: tuple[str, ...] = (
    "clusters",
    "members",
    "components",
    "blocks",
    "vdags",
    "policies",
    "endpoints",
)

MAX_KEY_LENGTH = 200
MAX_STRING_LENGTH = 4096
MAX_LIST_ITEMS = 1024
MAX_VALUE_BYTES = 64 * 1024
MAX_DEPTH = 16  # containers nested inside each other, the value itself counting as 1
PEER_ID_RE = re.compile(r"[A-Za-z0-9._:@-]{1,128}")
MAX_REQUIRE_CHARS = 1024  # a cluster's `require` filter expression
RECORD_CHUNK_CHARS = 4096  # a member entry's resource record: base64 in chunks of this size
RECORD_MAX_CHUNKS = 8


@dataclass(frozen=True, eq=False)
class Spec:
    """The expected shape of one field.

    types: any of "str", "int", "number" (int or float), "bool", "dict", "list", "any"
    (which excludes null), "null".
    fields: for a dict, the known keys; unknown keys are refused unless `open`.
    values: for a dict, the spec of every value. items: for a list, the spec of each item.
    min_len / max_len bound a string's characters or a list's items; minimum / maximum bound
    a number. unique: list items must not repeat. pattern: a string must fullmatch it, and
    `pattern_doc` says in words what that means.
    """

    types: tuple[str, ...]
    required: bool = False
    fields: Mapping[str, Spec] | None = None
    open: bool = False
    values: Spec | None = None
    items: Spec | None = None
    enum: frozenset[str] | None = None
    min_len: int | None = None
    max_len: int | None = None
    minimum: float | None = None
    maximum: float | None = None
    unique: bool = False
    pattern: re.Pattern[str] | None = None
    pattern_doc: str = ""


def text(required: bool = False, *, min_len: int | None = None, **kw: Any) -> Spec:
    if required and min_len is None:
        min_len = 1  # a required name, id or URI is never empty
    return Spec(("str",), required=required, min_len=min_len, **kw)


def integer(required: bool = False, **kw: Any) -> Spec:
    return Spec(("int",), required=required, **kw)


def obj(fields: Mapping[str, Spec] | None = None, required: bool = False, **kw: Any) -> Spec:
    """A dict: closed over `fields` when given, free-form otherwise."""
    return Spec(("dict",), required=required, fields=fields, **kw)


def array(items: Spec, required: bool = False, **kw: Any) -> Spec:
    return Spec(("list",), required=required, items=items, **kw)


def one_of(*names: str, required: bool = False) -> Spec:
    return text(required, enum=frozenset(names))


_COMMON: dict[str, Spec] = {
    "metadata": obj(),
    "labels": obj(values=text()),
}

_PEER_ID = text(
    True, pattern=PEER_ID_RE, pattern_doc="a peer id (1 to 128 of A-Z a-z 0-9 . _ : @ -)"
)
_POLICY_RULE = obj(
    {
        "name": text(True),
        "policyRuleURI": text(True),
        "parameters": obj(),
        "settings": obj(),
    }
)
_GRAPH_REF = Spec(("str", "dict"), fields={"nodeLabel": text(True)}, open=True, min_len=1)
_CONNECTION = obj(
    {
        "nodeLabel": text(),
        "inputs": array(_GRAPH_REF),
        "from": text(),
        "to": text(),
    },
    open=True,
)
_VDAG_NODE = obj(
    {
        "nodeLabel": text(True),
        "nodeType": one_of("block", "vdag", required=True),
        "vdagURI": text(),
        "manualBlockId": text(),
        "assignmentPolicyRule": obj(),
        "preprocessingPolicyRule": obj(),
        "postprocessingPolicyRule": obj(),
        # Also in AIOS's vDAG registry's node object:
        "modelParameters": obj(),
        "inputProtocol": obj(),
        "outputProtocol": obj(),
        "IOMap": array(Spec(("any",))),
    }
)

_ANNOUNCED_PARAMETERS: dict[str, Spec] = {
    "ms_per_layer": Spec(("number",), minimum=0.0, maximum=1e6),
    "cache_tokens_free": integer(minimum=0),
    "parameters_bytes": integer(minimum=0),
    "dtype": text(max_len=32),
    "host": Spec(("str", "null"), max_len=128),  # a node without a local socket: null
    # the server's price per unit of work (the stablecoin's smallest unit per layer-token)
    "price_per_unit": integer(minimum=0, maximum=MAX_PRICE_PER_UNIT),
    # the server's load, read by its cluster coordinator's scaling: steps waiting for its
    # compute, and the share of recent time it spent computing
    "queue_length": integer(minimum=0, maximum=1 << 20),
    "utilisation": Spec(("number",), minimum=0.0, maximum=1.0),
}

_SCHEMAS: dict[str, dict[str, Spec]] = {
    "clusters": {
        "name": text(True),
        "admins": array(_PEER_ID, True, min_len=1, unique=True),
        "description": text(),
        "tags": array(text()),
        # open: settings written before these fields were declared stay readable
        "settings": obj(
            {
                "admission": one_of("open", "approval", "allowlist"),
                "require": text(max_len=MAX_REQUIRE_CHARS),  # a registry.query filter
                "allowlist": array(_PEER_ID, unique=True),
            },
            open=True,
        ),
    },
    "members": {
        "cluster_id": text(True),
        "peer_id": _PEER_ID,
        # admin, voter, worker; "coordinator" and "observer" are the older vocabulary, still
        # read (as voter and worker: registry.clusters) but refused in self-joins
        "roles": array(
            one_of("admin", "voter", "worker", "coordinator", "observer"),
            True,
            min_len=1,
            unique=True,
        ),
        # absent: active. "requested": a join request in an approval cluster, not a member
        "status": one_of("requested", "active"),
        # the joiner's signed resource record (p2p.records wire bytes, base64, in chunks
        # because registry strings are bounded), for the cluster's `require` expression
        "resource_record": array(
            text(min_len=1, max_len=RECORD_CHUNK_CHARS), min_len=1, max_len=RECORD_MAX_CHUNKS
        ),
    },
    "components": {
        "name": text(True),
        "version": text(True),
        "componentType": one_of("model", "block", "policy", "vdag", "service"),
        "uri": text(),
        "description": text(),
        "cluster_id": text(),
        "config": obj(),
    },
    "blocks": {
        "blockId": text(True),
        "blockComponentURI": text(True),
        "minInstances": integer(minimum=0),
        "maxInstances": integer(minimum=0),
        "blockInitData": obj(),
        "initSettings": obj(),
        # free-form (AIOS), except the fields a server announcement puts there, which every
        # node reads when it routes (registry.blocks): they must have their types
        "parameters": obj(_ANNOUNCED_PARAMETERS, open=True),
        "policyRulesSpec": array(_POLICY_RULE),
        "cluster_id": text(),
        "model": text(),
        "layers": array(integer(minimum=0), min_len=2, max_len=2),
        "served_by": array(_PEER_ID, unique=True),
    },
    "vdags": {
        "vdagName": text(True),
        # AIOS writes {"version": "1.0.0", "release-tag": "stable"}; a plain string also works.
        "vdagVersion": Spec(
            ("str", "dict"),
            required=True,
            min_len=1,
            fields={"version": text(), "release-tag": text()},
        ),
        "discoveryTags": array(text()),
        "controller": obj(),
        "nodes": array(_VDAG_NODE, True, min_len=1),
        "graph": obj(
            {
                "input": array(_GRAPH_REF, True, min_len=1),
                "output": array(_GRAPH_REF, True, min_len=1),
                "connections": array(_CONNECTION),
            },
            required=True,
        ),
    },
    "policies": {
        "name": text(True),
        "policyURI": text(),
        "description": text(),
        "parameters": obj(),
        "settings": obj(),
    },
    "endpoints": {
        "url": text(True),
        "protocol": one_of("grpc", "http", "openai", required=True),
        "block_id": text(),
        "vdag": text(),
        "model": text(),
        "peer_id": replace(_PEER_ID, required=False),
    },
}

SPECS: dict[str, Spec] = {
    kind: obj({**fields, **_COMMON}, required=True) for kind, fields in _SCHEMAS.items()
}
