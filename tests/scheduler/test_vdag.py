"""vDAG specs: bad specs refused with an error naming the node or edge, good ones compiled to
the expected plan (linear, fan-out/fan-in, nested), versions, and the parser fuzzed."""

from __future__ import annotations

import contextlib
import copy
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler.vdag import (
    Catalog,
    VdagError,
    VdagSpec,
    compile_plan,
    parse,
    parse_uri,
    version_key,
)

BLOCKS = {"detect", "classify", "summarise", "llama", "embed"}


def node(label: str, block: str | None = None, vdag: str | None = None, **extra: Any) -> dict:
    raw: dict[str, Any] = {"nodeLabel": label, "nodeType": "vdag" if vdag else "block"}
    if vdag:
        raw["vdagURI"] = vdag
    else:
        raw["manualBlockId"] = block or "detect"
    raw.update(extra)
    return raw


def spec(
    nodes: list[dict],
    inputs: list[Any],
    outputs: list[Any],
    edges: list[Any] = (),  # type: ignore[assignment]
    name: str = "p",
    version: Any = "1.0",
) -> dict[str, Any]:
    return {
        "vdagName": name,
        "vdagVersion": version,
        "nodes": nodes,
        "graph": {"input": inputs, "output": outputs, "connections": list(edges)},
    }


def chain(*labels: str) -> list[dict[str, str]]:
    return [{"from": a, "to": b} for a, b in zip(labels, labels[1:], strict=False)]


LINEAR = spec(
    [node("a", "detect"), node("b", "classify"), node("c", "summarise")],
    ["a"],
    ["c"],
    chain("a", "b", "c"),
)
# AIOS's own form: b and c read a; d reads b and c
DIAMOND = spec(
    [node("a"), node("b", "classify"), node("c", "embed"), node("d", "summarise")],
    [{"nodeLabel": "a", "inputNames": ["image"]}],
    [{"nodeLabel": "d", "outputNames": ["summary"]}],
    [
        {"nodeLabel": "b", "inputs": [{"nodeLabel": "a", "outputNames": ["boxes"]}]},
        {"nodeLabel": "c", "inputs": ["a"]},
        {"nodeLabel": "d", "inputs": ["b", "c"]},
    ],
)
SUB = spec(  # q:1: x feeds y and z, both feed w
    [node("x"), node("y", "classify"), node("z", "embed"), node("w", "summarise")],
    [{"nodeLabel": "x", "inputNames": ["text"]}],
    [{"nodeLabel": "w", "outputNames": ["summary"]}],
    [*chain("x", "y", "w"), *chain("x", "z", "w")],
    name="q",
    version="1",
)
NESTED = spec(
    [node("pre"), node("sub", vdag="q"), node("post", "llama")],
    ["pre"],
    ["post"],
    chain("pre", "sub", "post"),
)


def catalog(*raws: dict[str, Any]) -> Catalog:
    return Catalog.of(parse(raw) for raw in raws)


def refusal(raw: Any, *others: dict[str, Any], blocks: set[str] = BLOCKS, **limits: Any) -> str:
    with pytest.raises(VdagError) as info:
        compile_plan(parse(raw), catalog(*others).versions, blocks.__contains__, **limits)
    return str(info.value)


def changed(raw: dict[str, Any], path: list[Any], new: Any) -> dict[str, Any]:
    raw = copy.deepcopy(raw)
    target = raw
    for step in path[:-1]:
        target = target[step]
    target[path[-1]] = new
    return raw


def nests(name: str, uri: str) -> dict[str, Any]:
    return spec([node("in"), node("s", vdag=uri)], ["in"], ["s"], chain("in", "s"), name, "1")


DEEP = [nests(f"v{i}", f"v{i + 1}") for i in range(9)] + [spec([node("a")], ["a"], ["a"], [], "v9")]

# (case, spec, other vDAGs in the registry, the error's text)
BAD: list[tuple[str, Any, list[dict[str, Any]], str]] = [
    ("not an object", ["a"], [], "a vDAG spec must be an object, not list"),
    (
        "duplicate node label",
        changed(LINEAR, ["nodes", 1, "nodeLabel"], "a"),
        [],
        "nodes[1].nodeLabel repeats 'a'",
    ),
    (
        "dangling edge (from)",
        changed(LINEAR, ["graph", "connections", 1, "from"], "ghost"),
        [],
        "graph.connections[1].from names unknown node 'ghost'",
    ),
    (
        "dangling edge (AIOS inputs)",
        changed(DIAMOND, ["graph", "connections", 2, "inputs", 1], "ghost"),
        [],
        "graph.connections[2].inputs[1] names unknown node 'ghost'",
    ),
    (
        "self-loop",
        changed(LINEAR, ["graph", "connections", 1, "to"], "b"),
        [],
        "graph.connections[1] 'b' -> 'b': a node cannot feed itself",
    ),
    (
        "cycle",
        spec([node("a"), node("b"), node("c")], ["a"], ["c"], [*chain("a", "b", "c", "b")]),
        [],
        "graph.connections[2] 'c' -> 'b': closes the cycle b -> c -> b",
    ),
    (
        "cycle through a nested vDAG",
        NESTED,
        [nests("q", "r"), nests("r", "p")],
        "nodes[1] 'sub': in vDAG q:1: nodes[1] 's': in vDAG r:1: nodes[1] 's': nests a vDAG "
        "inside itself: p:1.0 -> q:1 -> r:1 -> p:1.0",
    ),
    (
        "vDAG nesting itself",
        spec([node("a"), node("me", vdag="p:1.0")], ["a"], ["me"], chain("a", "me")),
        [],
        "nodes[1] 'me': nests a vDAG inside itself: p:1.0 -> p:1.0",
    ),
    (
        "unknown block",
        changed(LINEAR, ["nodes", 1, "manualBlockId"], "nope"),
        [],
        "nodes[1] 'b': unknown block 'nope'",
    ),
    ("unknown sub-vDAG", NESTED, [], "nodes[1] 'sub': unknown sub-vDAG 'q'"),
    (
        "unknown version of a sub-vDAG",
        changed(NESTED, ["nodes", 1, "vdagURI"], "q:2"),
        [SUB],
        "nodes[1] 'sub': unknown sub-vDAG 'q:2'",
    ),
    (
        "unknown block inside a nested vDAG",
        NESTED,
        [changed(SUB, ["nodes", 2, "manualBlockId"], "gone")],
        "nodes[1] 'sub': in vDAG q:1: nodes[2] 'z': unknown block 'gone'",
    ),
    (
        "an output nobody consumes",
        changed(LINEAR, ["graph", "output"], ["b"]),
        [],
        "nodes[2] 'c': its output goes nowhere",
    ),
    (
        "a branch whose output goes nowhere",
        spec([node("a"), node("b"), node("c")], ["a"], ["b"], [*chain("a", "b"), *chain("a", "c")]),
        [],
        "nodes[2] 'c': its output goes nowhere (no connection out of it, and it is not in "
        "graph.output)",
    ),
    (
        "an input nobody produces",
        spec([node("a"), node("b"), node("c")], ["a"], ["c"], [*chain("a", "c"), *chain("b", "c")]),
        [],
        "nodes[1] 'b': nothing feeds its input (no connection into it, and it is not in "
        "graph.input)",
    ),
    (
        "unknown output name",
        changed(DIAMOND, ["nodes", 0, "IOMap"], [{"outputs": [{"name": "crops"}]}]),
        [],
        "graph.connections[0].inputs[0] 'a' -> 'b': output name 'boxes' is not an output of "
        "'a' (declared: crops)",
    ),
    (
        "unknown input name",
        changed(DIAMOND, ["nodes", 0, "IOMap"], [{"inputs": [{"name": "img"}]}]),
        [],
        "graph.input[0] 'a': input name 'image' is not an input of 'a' (declared: img)",
    ),
    (
        "mismatched names across a nesting",
        changed(NESTED, ["graph", "connections", 1, "outputNames"], ["labels"]),
        [SUB],
        "graph.connections[1] 'sub' -> 'post': output name 'labels' is not an output of vDAG "
        "q:1 (declared: summary)",
    ),
    (
        "an input fed twice",
        spec(
            [node("a"), node("b"), node("c", IOMap=[{"inputs": [{"name": "x"}]}])],
            ["a", "b"],
            ["c"],
            [
                {"from": "a", "to": "c", "inputNames": ["x"]},
                {"from": "b", "to": "c", "inputNames": ["x"]},
            ],
        ),
        [],
        "graph.connections[1] 'b' -> 'c': feeds input 'x' of 'c', fed by graph.connections[0] too",
    ),
    (
        "a declared input nobody produces",
        spec(
            [node("a"), node("c", IOMap=[{"inputs": [{"name": "x"}, {"name": "y"}]}])],
            ["a"],
            ["c"],
            [{"from": "a", "to": "c", "inputNames": ["x"]}],
        ),
        [],
        "nodes[1] 'c': input 'y' of 'c' is fed by nothing (what feeds it names x)",
    ),
    (
        "a declared output nobody consumes",
        spec(
            [node("a", IOMap=[{"outputs": [{"name": "boxes"}, {"name": "scores"}]}]), node("b")],
            ["a"],
            ["b"],
            [{"from": "a", "to": "b", "outputNames": ["boxes"]}],
        ),
        [],
        "nodes[0] 'a': output 'scores' of 'a' is read by nothing (what reads it names boxes)",
    ),
    (
        "a sub-vDAG's output nobody consumes",
        changed(
            changed(NESTED, ["nodes", 1, "vdagURI"], "two"),
            ["graph", "connections", 1, "outputNames"],
            ["a"],
        ),
        [
            spec(
                [node("u"), node("v")],
                ["u", "v"],
                [
                    {"nodeLabel": "u", "outputNames": ["a"]},
                    {"nodeLabel": "v", "outputNames": ["b"]},
                ],
                name="two",
                version="1",
            ),
        ],
        "nodes[1] 'sub': output 'b' of vDAG two:1 is read by nothing (what reads it names a)",
    ),
    (
        "wrong type: label",
        changed(LINEAR, ["nodes", 0, "nodeLabel"], 7),
        [],
        "nodes[0].nodeLabel must be a string",
    ),
    (
        "wrong type: nodeType",
        changed(LINEAR, ["nodes", 0, "nodeType"], "model"),
        [],
        "nodes[0].nodeType must be one of block, vdag (got 'model')",
    ),
    (
        "wrong type: connections",
        changed(LINEAR, ["graph", "connections"], {"a": "b"}),
        [],
        "graph.connections must be a list",
    ),
    (
        "wrong type: outputNames",
        changed(LINEAR, ["graph", "connections", 0, "outputNames"], "boxes"),
        [],
        "graph.connections[0] 'a' -> 'b': outputNames must be a list of non-empty strings",
    ),
    ("missing graph", {k: v for k, v in LINEAR.items() if k != "graph"}, [], "graph is required"),
    (
        "block node naming a sub-vDAG",
        changed(LINEAR, ["nodes", 1, "vdagURI"], "q"),
        [],
        "nodes[1] 'b': a block node takes manualBlockId, not vdagURI",
    ),
    (
        "block node without a block",
        spec([{"nodeLabel": "a", "nodeType": "block"}], ["a"], ["a"]),
        [],
        "nodes[0] 'a': a block node needs a manualBlockId or an assignmentPolicyRule",
    ),
    (
        "policy without a URI",
        changed(LINEAR, ["nodes", 2, "preprocessingPolicyRule"], {"parameters": {}}),
        [],
        "nodes[2] 'c': preprocessingPolicyRule.policyRuleURI must be a non-empty string",
    ),
    (
        "policy with a malformed content hash",
        changed(
            LINEAR,
            ["nodes", 0, "assignmentPolicyRule"],
            {"policyRuleURI": "ll:1", "policyRuleDigest": "md5:abc"},
        ),
        [],
        "nodes[0] 'a': assignmentPolicyRule.policyRuleDigest must be sha256:<64 hex digits>",
    ),
    (
        "label with a slash",
        spec([node("a/b")], ["a/b"], ["a/b"]),
        [],
        "nodes[0] 'a/b': nodeLabel must not contain '/'",
    ),
    (
        "edge in both forms",
        changed(LINEAR, ["graph", "connections", 0, "nodeLabel"], "b"),
        [],
        "graph.connections[0] gives nodeLabel (with inputs) or from and to, not both",
    ),
    ("nesting too deep", DEEP[0], DEEP[1:], "nests vDAGs deeper than 8 levels"),
    (
        "a name that cannot be told from its version",
        changed(LINEAR, ["vdagName"], "p:2"),
        [],
        "vdagName must not contain ':' (it separates name and version)",
    ),
    (
        "too many nodes",
        spec([node(f"n{i}") for i in range(257)], ["n0"], ["n0"]),
        [],
        "nodes has 257 nodes (limit 256)",
    ),
]


@pytest.mark.parametrize(("case", "raw", "others", "expected"), BAD, ids=[b[0] for b in BAD])
def test_bad_specs_are_refused_naming_what_is_wrong(
    case: str, raw: Any, others: list[dict[str, Any]], expected: str
) -> None:
    assert expected in refusal(raw, *others)


def test_the_table_covers_the_issue() -> None:
    assert len(BAD) >= 15


def test_the_plan_size_is_bounded() -> None:
    error = refusal(NESTED, SUB, max_steps=4)
    assert error == "nodes[1] 'sub': in vDAG q:1: nodes[3] 'w': the plan grows past 4 steps"


def test_the_plan_edges_are_bounded() -> None:
    """An edge between two sub-vDAGs joins every output step of one to every input step of the
    other: 16 x 16 here."""
    wide = spec(
        [node(f"n{i}") for i in range(16)],
        [f"n{i}" for i in range(16)],
        [f"n{i}" for i in range(16)],
        name="wide",
        version="1",
    )
    twice = spec([node("s", vdag="wide"), node("t", vdag="wide")], ["s"], ["t"], chain("s", "t"))
    plan = compile_plan(parse(twice), catalog(wide).versions, BLOCKS.__contains__)
    assert len(plan.edges) == 256 and plan.levels[1][0] == "t/n0"
    assert refusal(twice, wide, max_edges=255) == (
        "graph.connections[0] 's' -> 't': the plan grows past 255 edges"
    )


def test_a_cycle_names_every_node_on_it() -> None:
    raw = spec(
        [node("a"), node("b"), node("c"), node("d")],
        ["a"],
        ["d"],
        [*chain("a", "b", "c", "d"), {"nodeLabel": "b", "inputs": ["d"]}],
    )
    assert refusal(raw) == (
        "graph.connections[3].inputs[0] 'd' -> 'b': closes the cycle b -> c -> d -> b"
    )


# --------------------------------------------------------------------------- good specs


def steps(plan: Any) -> list[tuple[str, str | None, int, tuple[str, ...]]]:
    return [(s.label, s.block_id, s.level, s.after) for s in plan.steps]


def test_linear() -> None:
    plan = compile_plan(parse(LINEAR), Catalog().versions, BLOCKS.__contains__)
    assert steps(plan) == [
        ("a", "detect", 0, ()),
        ("b", "classify", 1, ("a",)),
        ("c", "summarise", 2, ("b",)),
    ]
    assert [p.step for p in plan.inputs] == ["a"] and [p.step for p in plan.outputs] == ["c"]
    assert plan.levels == [["a"], ["b"], ["c"]]


def test_fan_out_and_fan_in() -> None:
    plan = compile_plan(parse(DIAMOND), Catalog().versions, BLOCKS.__contains__)
    assert plan.levels == [["a"], ["b", "c"], ["d"]]  # b and c may run in parallel
    assert plan.steps[3].after == ("b", "c")
    assert [(e.src, e.dst, e.output_names) for e in plan.edges] == [
        ("a", "b", ("boxes",)),
        ("a", "c", ()),
        ("b", "d", ()),
        ("c", "d", ()),
    ]
    assert plan.inputs[0].names == ("image",) and plan.outputs[0].names == ("summary",)


def test_nested_vdags_are_expanded_with_their_path() -> None:
    plan = compile_plan(parse(NESTED), catalog(SUB).versions, BLOCKS.__contains__)
    assert steps(plan) == [
        ("pre", "detect", 0, ()),
        ("sub/x", "detect", 1, ("pre",)),
        ("sub/y", "classify", 2, ("sub/x",)),
        ("sub/z", "embed", 2, ("sub/x",)),
        ("sub/w", "summarise", 3, ("sub/y", "sub/z")),
        ("post", "llama", 4, ("sub/w",)),
    ]
    assert plan.nested == ("q:1",)
    assert {s.label: s.vdag for s in plan.steps}["sub/y"] == "q:1"
    raw = plan.to_json()
    assert raw["vdag"] == "p:1.0" and raw["levels"][2] == ["sub/y", "sub/z"]


def test_two_levels_of_nesting_and_a_sub_vdag_as_input_and_output() -> None:
    outer = spec([node("only", vdag="p")], ["only"], ["only"], [], name="o", version="3")
    plan = compile_plan(parse(outer), catalog(NESTED, SUB).versions, BLOCKS.__contains__)
    assert [s.label for s in plan.steps][:2] == ["only/pre", "only/sub/x"]
    assert [p.step for p in plan.inputs] == ["only/pre"]
    assert [p.step for p in plan.outputs] == ["only/post"]
    assert plan.nested == ("p:1.0", "q:1")


def test_names_pick_the_sub_vdag_nodes_an_edge_feeds() -> None:
    two_inputs = spec(
        [node("t"), node("i"), node("join", "summarise")],
        [{"nodeLabel": "t", "inputNames": ["text"]}, {"nodeLabel": "i", "inputNames": ["image"]}],
        ["join"],
        [*chain("t", "join"), *chain("i", "join")],
        name="mm",
        version="1",
    )
    parent = spec(
        [node("cap"), node("m", vdag="mm")],
        ["cap", {"nodeLabel": "m", "inputNames": ["text"]}],
        ["m"],
        [{"from": "cap", "to": "m", "inputNames": ["image"]}],
    )
    plan = compile_plan(parse(parent), catalog(two_inputs).versions, BLOCKS.__contains__)
    assert [(e.src, e.dst) for e in plan.edges if e.src == "cap"] == [("cap", "m/i")]
    assert [p.step for p in plan.inputs] == ["cap", "m/t"]
    bad = changed(parent, ["graph", "input", 1, "inputNames"], ["audio"])
    assert refusal(bad, two_inputs) == (
        "graph.input[1] 'm': input name 'audio' is not an input of vDAG mm:1 (declared: text, "
        "image)"
    )


def test_aios_format_with_version_object_and_policies() -> None:
    raw = copy.deepcopy(DIAMOND)
    raw["vdagVersion"] = {"version": "0.0.6", "release-tag": "stable"}
    raw["discoveryTags"] = ["vision"]
    raw["nodes"][1]["preprocessingPolicyRule"] = {
        "policyRuleURI": "crop:1",
        "parameters": {"size": 224},
    }
    raw["nodes"][1]["postprocessingPolicyRule"] = {}  # AIOS: no policy
    raw["nodes"][3]["postprocessingPolicyRule"] = {
        "policyRuleURI": "redact:3",
        "policyRuleDigest": "sha256:" + "ab" * 32,
    }
    raw["nodes"][2] = {
        "nodeLabel": "c",
        "nodeType": "block",
        "assignmentPolicyRule": {"policyRuleURI": "least-loaded:1"},
    }
    parsed = parse(raw)
    assert parsed.uri == "p:0.0.6-stable" and parsed.tags == ("vision",)
    plan = compile_plan(parsed, Catalog().versions, BLOCKS.__contains__)
    b, c = plan.steps[1], plan.steps[2]
    assert b.preprocessing is not None and b.preprocessing.parameters == {"size": 224}
    assert b.postprocessing is None
    assert c.block_id is None and c.assignment is not None  # its policy picks the block
    assert c.assignment.uri == "least-loaded:1" and c.assignment.digest is None
    assert plan.steps[3].postprocessing.digest == "sha256:" + "ab" * 32  # type: ignore[union-attr]


def test_without_a_block_lookup_blocks_are_not_checked() -> None:
    raw = changed(LINEAR, ["nodes", 1, "manualBlockId"], "nope")
    assert compile_plan(parse(raw), Catalog().versions).steps[1].block_id == "nope"


# --------------------------------------------------------------------------- versions


def test_versions_latest_and_pinned() -> None:
    versions = [changed(SUB, ["vdagVersion"], v) for v in ("1.9", "1.10", "0.3")]
    tagged = changed(SUB, ["vdagVersion"], {"version": "2.0", "release-tag": "beta"})
    cat = catalog(*versions)
    assert cat.resolve("q").version == "1.10"  # type: ignore[union-attr]
    assert cat.resolve("q:1.9").version == "1.9"  # type: ignore[union-attr]
    assert cat.resolve("q", "0.3").version == "0.3"  # type: ignore[union-attr]
    assert cat.resolve("q:7") is None and cat.resolve("nothing") is None
    cat.add(parse(tagged))  # a newer version: the pinned ones stay as they were
    assert cat.resolve("q").version == "2.0-beta"  # type: ignore[union-attr]
    assert cat.resolve("q:2.0").version == "2.0-beta"  # type: ignore[union-attr]
    assert cat.resolve("q:1.9").version == "1.9"  # type: ignore[union-attr]
    pinned = changed(NESTED, ["nodes", 1, "vdagURI"], "q:1.9")
    assert compile_plan(parse(pinned), cat.versions).nested == ("q:1.9",)
    assert compile_plan(parse(NESTED), cat.versions).nested == ("q:2.0-beta",)


def test_uris_and_version_order() -> None:
    assert parse_uri("summarizer:1.0-stable") == ("summarizer", "1.0-stable")
    assert parse_uri("summarizer") == ("summarizer", None)
    assert parse_uri("summarizer:") == ("summarizer", None)
    assert version_key("1.10") > version_key("1.9") > version_key("1.0-stable")
    assert sorted(["2", "10", "1.a", "1.2"], key=version_key) == ["1.2", "1.a", "2", "10"]
    assert version_key("1.²") > version_key("1.9")  # a digit that int() does not read: a word


# --------------------------------------------------------------------------- fuzz

JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)
LABELS = st.sampled_from(["a", "b", "c", "d", "e"])
FIELDS = st.sampled_from(
    [
        "vdagName",
        "vdagVersion",
        "nodes",
        "graph",
        "nodeLabel",
        "nodeType",
        "manualBlockId",
        "vdagURI",
        "input",
        "output",
        "connections",
        "inputs",
        "from",
        "to",
        "outputNames",
        "inputNames",
        "IOMap",
        "preprocessingPolicyRule",
        "policyRuleURI",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(JSON)
def test_random_json_is_refused_cleanly(raw: Any) -> None:
    with contextlib.suppress(VdagError):
        parse(raw)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_specs_are_refused_cleanly(data: Any) -> None:
    """Valid specs with one field somewhere replaced by random JSON, or a known field added."""
    raw = copy.deepcopy(data.draw(st.sampled_from([LINEAR, DIAMOND, NESTED, SUB])))
    target: Any = raw
    for _ in range(data.draw(st.integers(0, 4))):
        if isinstance(target, dict) and target:
            target = target[data.draw(st.sampled_from(sorted(target)))]
        elif isinstance(target, list) and target:
            target = target[data.draw(st.integers(0, len(target) - 1))]
    if isinstance(target, dict):
        target[data.draw(FIELDS)] = data.draw(JSON | LABELS)
    elif isinstance(target, list):
        target.append(data.draw(JSON | LABELS))
    try:
        plan = compile_plan(parse(raw), catalog(SUB).versions, BLOCKS.__contains__)
    except VdagError:
        return
    assert plan.steps


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(LABELS, LABELS), max_size=10),
    st.lists(LABELS, min_size=1, max_size=3),
    st.lists(LABELS, min_size=1, max_size=3),
)
def test_random_graphs_compile_in_topological_order_or_are_refused(
    edges: list[tuple[str, str]], inputs: list[str], outputs: list[str]
) -> None:
    labels = sorted({x for e in edges for x in e} | set(inputs) | set(outputs))
    raw = spec([node(x) for x in labels], inputs, outputs, [{"from": a, "to": b} for a, b in edges])
    try:
        parsed: VdagSpec = parse(raw)
    except VdagError as exc:
        assert exc.path  # every refusal says where
        return
    plan = compile_plan(parsed, Catalog().versions, BLOCKS.__contains__)
    position = {s.label: i for i, s in enumerate(plan.steps)}
    level = {s.label: s.level for s in plan.steps}
    assert sorted(position) == labels
    for a, b in edges:
        assert position[a] < position[b] and level[a] < level[b]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=6))
def test_any_versions_resolve(versions: list[str]) -> None:
    cat = Catalog()
    for version in versions:
        with contextlib.suppress(VdagError):  # e.g. an unpaired surrogate
            cat.add(parse(changed(SUB, ["vdagVersion"], version)))
    stored = [v for (_, v) in cat.specs]
    if not stored:
        return
    latest = cat.resolve("q")
    assert latest is not None
    assert version_key(latest.version) == max(version_key(v) for v in stored)
    for version in stored:
        pinned = cat.resolve("q", version)
        assert pinned is not None
        assert pinned.version == version or pinned.version.startswith(version + "-")
