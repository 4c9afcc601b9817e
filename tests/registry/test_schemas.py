"""Registry kinds: key rules, value schemas, bounds, and the default admission hooks."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.specs import substitute_self
from registry.schemas import (
    KINDS,
    SchemaError,
    Write,
    admit,
    default_hooks,
    validate_key,
    validate_value,
)
from registry.specs import SPECS

SAMPLES = Path(__file__).resolve().parents[2] / "configs" / "samples"
PEER = "12D3KooWEyoppNCUx8Yx66oV9fJnriXwCcXwDDUA2kj6vnc6iDEp"


def load_sample(name: str) -> dict[str, Any]:
    """A sample as `gridmesh apply` reads it, with `$SELF` standing for the applying node."""
    doc = substitute_self(yaml.safe_load((SAMPLES / f"{name}.yaml").read_text()), PEER)
    assert set(doc) == {"kind", "key", "value"}
    return doc


VALID: dict[str, tuple[str, dict[str, Any]]] = {
    "clusters": ("lab-west", {"name": "Lab West", "admins": [PEER]}),
    "members": (
        "lab-west/" + PEER,
        {"cluster_id": "lab-west", "peer_id": PEER, "roles": ["worker"]},
    ),
    "components": ("llama:1", {"name": "llama", "version": "1"}),
    "blocks": ("shard-0", {"blockId": "shard-0", "blockComponentURI": "llama:1"}),
    "vdags": (
        "pipeline",
        {
            "vdagName": "pipeline",
            "vdagVersion": "1.0.0",
            "nodes": [{"nodeLabel": "a", "nodeType": "block"}],
            "graph": {"input": ["a"], "output": ["a"]},
        },
    ),
    "policies": ("least-loaded", {"name": "least-loaded"}),
    "endpoints": ("shard-0@peer", {"url": "grpc://10.0.0.1:50051", "protocol": "grpc"}),
}

FULL_VDAG: dict[str, Any] = {
    "vdagName": "llm-analyzer",
    "vdagVersion": {"version": "0.0.6", "release-tag": "stable"},
    "discoveryTags": ["llm", "chat"],
    "controller": {"inputSources": []},
    "nodes": [
        {
            "nodeLabel": "gemma",
            "nodeType": "block",
            "manualBlockId": "gemma-block",
            "preprocessingPolicyRule": {},
            "postprocessingPolicyRule": {"policyRuleURI": "post:0.0.1-stable"},
            "modelParameters": {},
            "IOMap": [{"inputs": [{"name": "input_0", "reference": "input_0"}]}],
        },
        {
            "nodeLabel": "scout",
            "nodeType": "block",
            "assignmentPolicyRule": {"policyRuleURI": "assign:1"},
        },
        {"nodeLabel": "sub", "nodeType": "vdag", "vdagURI": "summarizer:1.0-stable"},
    ],
    "graph": {
        "input": [{"nodeLabel": "gemma", "inputNames": ["input_0"]}],
        "output": [{"nodeLabel": "sub", "outputNames": ["output_0"]}],
        "connections": [
            {"nodeLabel": "scout", "inputs": [{"nodeLabel": "gemma", "outputNames": ["output_0"]}]},
            {"from": "scout", "to": "sub"},
            {"nodeLabel": "sub", "inputs": ["scout"]},
        ],
    },
}


def error(kind: str, key: str, value: Any) -> str:
    with pytest.raises(SchemaError) as info:
        validate_value(kind, key, value)
    return str(info.value)


# --------------------------------------------------------------------------- valid examples


def test_kinds() -> None:
    assert KINDS == (
        "clusters",
        "members",
        "components",
        "blocks",
        "vdags",
        "policies",
        "endpoints",
    )
    assert set(VALID) == set(KINDS) == set(default_hooks)


@pytest.mark.parametrize("kind", KINDS)
def test_minimal_valid_value_of_each_kind(kind: str) -> None:
    key, value = VALID[kind]
    validate_key(kind, key)
    validate_value(kind, key, value)
    assert admit(Write(kind, key, value, author=PEER)) is None


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_accepts_metadata_and_labels(kind: str) -> None:
    key, value = VALID[kind]
    value = {**value, "metadata": {"any": [1, {"thing": None}]}, "labels": {"app.io/x": "y"}}
    validate_value(kind, key, value)
    bad = {**value, "labels": {"team": 3}}
    assert error(kind, key, bad).endswith("labels.team must be a string")


@pytest.mark.parametrize("name", ["cluster", "component", "block"])
def test_samples_are_valid(name: str) -> None:
    doc = load_sample(name)
    validate_key(doc["kind"], doc["key"])
    validate_value(doc["kind"], doc["key"], doc["value"])
    assert admit(Write(doc["kind"], doc["key"], doc["value"], author=PEER)) is None


def test_full_examples() -> None:
    validate_value("vdags", "llm-analyzer", FULL_VDAG)
    validate_value(
        "clusters",
        "c",
        {
            "name": "c",
            "admins": [PEER, "p0"],
            "description": "d",
            "tags": ["x"],
            "settings": {"k": 1},
        },
    )
    validate_value(
        "members",
        "c/p0",
        {"cluster_id": "c", "peer_id": "p0", "roles": ["admin", "coordinator", "observer"]},
    )
    validate_value(
        "policies",
        "p",
        {"name": "p", "policyURI": "p:1", "description": "", "parameters": {}, "settings": {}},
    )
    validate_value(
        "endpoints",
        "e",
        {
            "url": "https://x.example/v1",
            "protocol": "openai",
            "block_id": "b",
            "vdag": "v",
            "model": "m",
            "peer_id": PEER,
        },
    )
    for ctype in ("model", "block", "policy", "vdag", "service"):
        validate_value("components", "c", {"name": "c", "version": "1", "componentType": ctype})


# --------------------------------------------------------------------------- keys


@pytest.mark.parametrize(
    "key", ["a", "llama-3-8b:1.0.0", "x/y/z", "user@host", "A.b_c-d:e@f/g", "k" * 200]
)
def test_good_keys(key: str) -> None:
    validate_key("blocks", key)


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("", "1 to 200 characters"),
        ("k" * 201, "1 to 200 characters"),
        ("has space", "may only use"),
        ("semi;colon", "may only use"),
        ("ünï", "may only use"),
        ("a\nb", "may only use"),
        ("/lead", "must not start or end with '/'"),
        ("trail/", "must not start or end with '/'"),
        ("a//b", "contain '//'"),
        ("a/../b", "'..'"),
        ("..", "'..'"),
    ],
)
def test_bad_keys(key: str, problem: str) -> None:
    with pytest.raises(SchemaError, match="blocks: key") as info:
        validate_key("blocks", key)
    assert problem in str(info.value)


def test_member_keys() -> None:
    validate_key("members", "lab/" + PEER)
    for key in ("lab", "lab/a/b", "lab/"):
        with pytest.raises(SchemaError, match="cluster_id>/<peer_id>|start or end"):
            validate_key("members", key)


def test_key_and_kind_types() -> None:
    with pytest.raises(SchemaError, match="unknown kind 'jobs'; expected one of clusters"):
        validate_key("jobs", "k")
    with pytest.raises(SchemaError, match="unknown kind"):
        validate_value("jobs", "k", {})
    with pytest.raises(SchemaError, match="unknown kind"):
        validate_key(None, "k")  # type: ignore[arg-type]
    with pytest.raises(SchemaError, match="key must be a string"):
        validate_key("blocks", 5)  # type: ignore[arg-type]
    with pytest.raises(SchemaError, match="key must be a string"):
        validate_value("members", 5, VALID["members"][1])  # type: ignore[arg-type]


# --------------------------------------------------------------------------- common mistakes


def test_value_must_be_an_object() -> None:
    assert error("blocks", "b", [1]) == "blocks/b: value must be an object, not list"
    assert "must be an object" in error("blocks", "b", None)


@pytest.mark.parametrize("kind", KINDS)
def test_missing_required(kind: str) -> None:
    key, value = VALID[kind]
    for name in value:
        broken = {k: v for k, v in value.items() if k != name}
        assert error(kind, key, broken) == f"{kind}/{key}: {name} is required"


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_field_lists_allowed_ones(kind: str) -> None:
    key, value = VALID[kind]
    message = error(kind, key, {**value, "bogus": 1})
    assert message.startswith(f"{kind}/{key}: unknown field 'bogus' (allowed: ")
    for name in value:
        assert name in message
    assert "metadata" in message and "labels" in message


@pytest.mark.parametrize(
    ("kind", "field", "bad", "expected"),
    [
        ("clusters", "name", 5, "name must be a string"),
        ("clusters", "name", "", "name must not be empty"),
        ("clusters", "admins", [], "admins must not be empty"),
        ("clusters", "admins", PEER, "admins must be a list"),
        ("clusters", "admins", [PEER, 7], "admins[1] must be a string"),
        ("clusters", "admins", ["has space"], "admins[0] must be a peer id"),
        ("clusters", "admins", [PEER, PEER], "admins repeats"),
        ("clusters", "tags", ["a", 1], "tags[1] must be a string"),
        ("clusters", "settings", [], "settings must be an object"),
        ("members", "roles", [], "roles must not be empty"),
        ("members", "roles", ["boss"], "roles[0] must be one of admin, coordinator, observer"),
        ("members", "roles", ["admin", "admin"], "roles repeats"),
        ("components", "version", 1.0, "version must be a string"),
        ("components", "componentType", "gadget", "componentType must be one of block, model"),
        ("components", "config", "x", "config must be an object"),
        ("blocks", "minInstances", -1, "minInstances must be >= 0"),
        ("blocks", "minInstances", 1.5, "minInstances must be an integer"),
        ("blocks", "maxInstances", True, "maxInstances must be an integer"),
        ("blocks", "maxInstances", "3", "maxInstances must be an integer"),
        ("blocks", "blockInitData", [], "blockInitData must be an object"),
        ("blocks", "layers", [0], "layers must have at least 2 items"),
        ("blocks", "layers", [0, 1, 2], "layers must have at most 2 items"),
        ("blocks", "layers", [-1, 4], "layers[0] must be >= 0"),
        ("blocks", "layers", [4, 4], "layers must be [start, end) with start < end"),
        ("blocks", "layers", [0, "8"], "layers[1] must be an integer"),
        ("blocks", "served_by", [""], "served_by[0] must not be empty"),
        ("vdags", "vdagVersion", 1, "vdagVersion must be a string or an object"),
        ("vdags", "vdagVersion", {"v": "1"}, "vdagVersion has unknown field 'v'"),
        ("vdags", "nodes", [], "nodes must not be empty"),
        ("vdags", "graph", [], "graph must be an object"),
        ("policies", "parameters", "p", "parameters must be an object"),
        ("endpoints", "protocol", "ftp", "protocol must be one of grpc, http, openai"),
        ("endpoints", "url", None, "url must be a string"),
        ("endpoints", "peer_id", "a/b", "peer_id must be a peer id"),
    ],
)
def test_wrong_types_and_bounds(kind: str, field: str, bad: Any, expected: str) -> None:
    key, value = VALID[kind]
    assert error(kind, key, {**value, field: bad}).startswith(f"{kind}/{key}: {expected}")


def test_policy_rules_spec_paths() -> None:
    rules = [
        {"name": "a", "policyRuleURI": "a:1"},
        {"name": 3, "policyRuleURI": "b:1"},
    ]
    value = {"blockId": "llama-shard-0", "blockComponentURI": "c", "policyRulesSpec": rules}
    assert (
        error("blocks", "llama-shard-0", value)
        == "blocks/llama-shard-0: policyRulesSpec[1].name must be a string"
    )
    rules[1] = {"name": "b"}
    assert error("blocks", "llama-shard-0", value).endswith(
        "policyRulesSpec[1].policyRuleURI is required"
    )
    rules[1] = {"name": "b", "policyRuleURI": "b:1", "extra": 1}
    assert "policyRulesSpec[1] has unknown field 'extra'" in error("blocks", "llama-shard-0", value)


def test_block_cross_field_rules() -> None:
    base = {"blockId": "shard-0", "blockComponentURI": "c"}
    assert (
        error("blocks", "shard-0", {**base, "blockId": "shard-1"})
        == "blocks/shard-0: blockId 'shard-1' must equal the key 'shard-0'"
    )
    assert (
        error("blocks", "shard-0", {**base, "minInstances": 5, "maxInstances": 2})
        == "blocks/shard-0: minInstances (5) must be <= maxInstances (2)"
    )
    validate_value("blocks", "shard-0", {**base, "minInstances": 2, "maxInstances": 2})
    validate_value("blocks", "shard-0", {**base, "minInstances": 0})
    validate_value("blocks", "shard-0", {**base, "layers": [0, 1]})


def test_member_value_must_match_key() -> None:
    key = "lab/p1"
    good = {"cluster_id": "lab", "peer_id": "p1", "roles": ["worker"]}
    validate_value("members", key, good)
    assert "cluster_id 'other' does not match the key" in error(
        "members", key, {**good, "cluster_id": "other"}
    )
    assert "peer_id 'p2' does not match the key" in error("members", key, {**good, "peer_id": "p2"})


def test_vdag_graph_rules() -> None:
    def broken(path: list[Any], new: Any) -> str:
        value = copy.deepcopy(FULL_VDAG)
        target = value
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = new
        return error("vdags", "v", value)

    assert (
        broken(["nodes", 1, "nodeLabel"], "gemma") == "vdags/v: nodes[1].nodeLabel repeats 'gemma'"
    )
    assert broken(["graph", "input", 0, "nodeLabel"], "ghost") == (
        "vdags/v: graph.input[0].nodeLabel names unknown node 'ghost'"
    )
    assert broken(["graph", "output", 0], "ghost").endswith(
        "graph.output[0] names unknown node 'ghost'"
    )
    assert broken(["graph", "connections", 0, "nodeLabel"], "ghost").endswith(
        "graph.connections[0].nodeLabel names unknown node 'ghost'"
    )
    assert broken(["graph", "connections", 0, "inputs", 0, "nodeLabel"], "ghost").endswith(
        "graph.connections[0].inputs[0].nodeLabel names unknown node 'ghost'"
    )
    assert broken(["graph", "connections", 2, "inputs", 0], "ghost").endswith(
        "graph.connections[2].inputs[0] names unknown node 'ghost'"
    )
    assert broken(["graph", "connections", 1, "to"], "ghost").endswith(
        "graph.connections[1].to names unknown node 'ghost'"
    )
    assert broken(["graph", "connections", 1], {"from": "scout"}).endswith(
        "graph.connections[1] needs a nodeLabel (with inputs) or both from and to"
    )
    assert broken(["graph", "connections", 1], "scout->sub").endswith(
        "graph.connections[1] must be an object"
    )
    assert broken(["graph", "input"], []).endswith("graph.input must not be empty")
    assert broken(["graph", "input", 0], {"inputNames": []}).endswith(
        "graph.input[0].nodeLabel is required"
    )
    assert broken(["graph", "input", 0], 3).endswith("graph.input[0] must be a string or an object")
    assert broken(["graph", "extra"], []).endswith(
        "graph has unknown field 'extra' (allowed: input, output, connections)"
    )
    assert broken(["nodes", 2, "vdagURI"], "").endswith(
        "nodes[2].vdagURI is required when nodeType is 'vdag'"
    )
    assert broken(["nodes", 0, "nodeType"], "model").endswith(
        "nodes[0].nodeType must be one of block, vdag (got 'model')"
    )
    assert "nodes[0] has unknown field 'spec'" in broken(["nodes", 0, "spec"], {})
    assert broken(["nodes", 0, "modelParameters"], 1).endswith(
        "nodes[0].modelParameters must be an object"
    )


# --------------------------------------------------------------------------- bounds


def test_oversized_value() -> None:
    key, value = VALID["policies"]
    big = {**value, "metadata": {f"k{i}": "x" * 4000 for i in range(17)}}
    message = error("policies", key, big)
    assert message.startswith("policies/least-loaded: value is too large")
    many = {**value, "metadata": {f"k{i}": 1 for i in range(20_000)}}
    assert "too large" in error("policies", key, many)
    validate_value("policies", key, {**value, "metadata": {"k": "x" * 4000}})


def test_long_strings_and_lists() -> None:
    key, value = VALID["clusters"]
    assert error("clusters", key, {**value, "description": "x" * 4097}) == (
        "clusters/lab-west: description has string longer than 4096 characters"
    )
    validate_value("clusters", key, {**value, "description": "x" * 4096})
    assert error("clusters", key, {**value, "tags": ["t"] * 1025}) == (
        "clusters/lab-west: tags has 1025 items (limit 1024)"
    )
    validate_value("clusters", key, {**value, "tags": ["t"] * 1024})
    assert "a key of string longer" in error(
        "clusters", key, {**value, "settings": {"k" * 5000: 1}}
    )


def test_too_deep() -> None:
    key, value = VALID["policies"]

    def nested(levels: int) -> dict[str, Any]:
        inner: dict[str, Any] = {}
        for _ in range(levels):
            inner = {"n": inner}
        return inner

    # the value is level 1, "parameters" level 2, so 14 more levels reach 16
    validate_value("policies", key, {**value, "parameters": nested(14)})
    message = error("policies", key, {**value, "parameters": nested(15)})
    assert message.startswith("policies/least-loaded: parameters.n.n")
    assert message.endswith("nests deeper than 16 levels")
    assert "nests deeper" in error("policies", key, {**value, "parameters": nested(5000)})
    lists: Any = []
    for _ in range(100):
        lists = [lists]
    assert "nests deeper" in error("policies", key, {**value, "metadata": {"x": lists}})


def test_non_json_data() -> None:
    key, value = VALID["policies"]
    assert (
        error("policies", key, {**value, 7: 1})
        == "policies/least-loaded: value has a non-string key '7'"
    )
    for bad, expected in [
        ({1, 2}, "must be JSON data, not set"),
        ((1, 2), "must be JSON data, not tuple"),
        (b"x", "must be JSON data, not bytes"),
        (float("nan"), "must be a finite number"),
        (float("inf"), "must be a finite number"),
        (2**70, "does not fit in 64 bits"),
        ({1: "x"}, "has a non-string key"),
        ("\ud800", "unpaired surrogate"),
    ]:
        message = error("policies", key, {**value, "metadata": {"x": bad}})
        assert expected in message, message
        assert "metadata" in message


json_like = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=10),
        st.binary(max_size=2),
    ),
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=8), st.integers()), inner, max_size=4),
        st.tuples(inner),
    ),
    max_leaves=20,
)
field_names = st.sampled_from(
    sorted({name for spec in SPECS.values() for name in spec.fields or {}} | {"metadata", "x"})
)


@settings(max_examples=400)
@given(
    st.sampled_from(KINDS),
    st.text(max_size=12) | st.sampled_from(["k", "lab/p1", "shard-0"]),
    st.dictionaries(field_names, json_like, max_size=6) | json_like,
)
def test_random_values_validate_or_raise_schema_error(kind: str, key: str, value: Any) -> None:
    with contextlib.suppress(SchemaError):
        validate_key(kind, key)
    try:
        validate_value(kind, key, value)
    except SchemaError as exc:
        assert str(exc).startswith(f"{kind}/")
    reason = admit(Write(kind, key, value if isinstance(value, dict) else None, author="p1"))
    assert reason is None or isinstance(reason, str)


# --------------------------------------------------------------------------- admission


def write(kind: str, **changes: Any) -> Write:
    key, value = VALID[kind]
    return Write(kind, key, {**value, **changes}, author=PEER)


def test_admit_block_limits() -> None:
    assert admit(write("blocks", maxInstances=10_000)) is None
    assert "maxInstances 10001 is over the limit of 10000" in (
        admit(write("blocks", maxInstances=10_001)) or ""
    )
    assert "minInstances" in (admit(write("blocks", minInstances=20_000)) or "")
    assert "layers beyond" in (admit(write("blocks", layers=[0, 10**6])) or "")
    assert "local file" in (admit(write("blocks", blockComponentURI="file:///etc/passwd")) or "")


@pytest.mark.parametrize(
    "url", ["http://h:80/x", "https://h.example/v1", "grpc://10.0.0.1:5000", "GRPCS://[::1]:443"]
)
def test_admit_endpoint_accepts(url: str) -> None:
    assert admit(write("endpoints", url=url)) is None


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("ftp://h/x", "url scheme 'ftp' is refused"),
        ("file:///etc/passwd", "url scheme 'file' is refused"),
        ("javascript:alert(1)", "url scheme 'javascript' is refused"),
        ("localhost:5000", "url scheme 'localhost' is refused"),
        ("10.0.0.1:5000", "url scheme '' is refused"),
        ("http://", "has no host"),
        ("http://user:pw@h/x", "credentials"),
        ("http://[::1", "not a valid URL"),
    ],
)
def test_admit_endpoint_refuses(url: str, reason: str) -> None:
    assert reason in (admit(write("endpoints", url=url)) or "")


def test_admit_endpoint_peer_must_be_author() -> None:
    assert admit(write("endpoints", peer_id=PEER)) is None
    assert "only be written by that peer" in (admit(write("endpoints", peer_id="other")) or "")


def test_admit_other_kinds() -> None:
    assert "at most 64 admins" in (
        admit(write("clusters", admins=[f"p{i}" for i in range(65)])) or ""
    )
    assert "local file" in (admit(write("components", uri="/home/me/model.bin")) or "")
    assert admit(write("components", uri="hf://org/model")) is None
    assert "local file" in (admit(write("policies", policyURI="../x.py")) or "")
    nodes = [{"nodeLabel": f"n{i}", "nodeType": "block"} for i in range(257)]
    assert "at most 256 nodes" in (admit(write("vdags", nodes=nodes)) or "")


@pytest.mark.parametrize("kind", KINDS)
def test_deletes_are_admitted(kind: str) -> None:
    key, _ = VALID[kind]
    assert admit(Write(kind, key, None, author=PEER, existing_author="someone")) is None


def test_admit_custom_hooks_and_failures() -> None:
    w = write("blocks")
    assert admit(w, {"blocks": lambda _: "no blocks today"}) == "no blocks today"
    assert admit(w, {}) == "no admission hook for kind 'blocks'"

    def crash(_: Write) -> str | None:
        raise KeyError("boom")

    assert admit(w, {"blocks": crash}) == "admission hook for blocks failed: KeyError"
    assert admit(Write("jobs", "k", {}, author=PEER)) == "no admission hook for kind 'jobs'"


def test_hooks_tolerate_invalid_values() -> None:
    for kind in KINDS:
        for value in ({}, {"url": 5, "maxInstances": "x", "layers": "ab", "nodes": 3}, None):
            reason = admit(Write(kind, "k", value, author=PEER))  # type: ignore[arg-type]
            assert reason is None or isinstance(reason, str)


def test_write_is_frozen() -> None:
    w = write("blocks")
    with pytest.raises(AttributeError):
        w.author = "x"  # type: ignore[misc]
    assert w.existing_author is None
