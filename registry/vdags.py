"""A vDAG entry read into a typed graph, and the checks that need nothing but the entry.

`registry.schemas` checks a `vdags` value's shape (types, bounds, labels named in the graph
are nodes) and then calls `parse`, which turns it into a `VdagSpec` (nodes, edges, the
vDAG's input and output ports) and refuses what no registry lookup can fix: a block node
naming a sub-vDAG or a vdag node naming a block, a node feeding itself, a cycle, a node that
nothing feeds, a node whose output goes nowhere, and input or output names that the node
does not declare (its ``IOMap``) or that are fed twice. Every error names the node or the
edge: ``nodes[2] 'classify': ...``, ``graph.connections[3] 'a' -> 'b': ...``.

What needs other entries (unknown blocks, unknown or cyclic sub-vDAGs, names across a
nesting) and the compiled plan live in `scheduler.vdag`; this module is here because the
registry must refuse a broken graph from a peer as well as from a user, and `registry`
imports nothing above it.

Edges: ``{"nodeLabel": "b", "inputs": ["a", {"nodeLabel": "c", "outputNames": [...]}]}``
(AIOS: b reads a and c) or ``{"from": "a", "to": "b"}``; both may carry ``outputNames``
(which outputs of the producer) and ``inputNames`` (which inputs of the consumer). The same
edge written twice is one edge.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

MAX_NODES = 256  # nodes of one vDAG (a nested vDAG counts as one)
MAX_NAMES = 64  # input or output names on one port or edge
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")  # a policy package's content hash


class VdagSpecError(ValueError):
    """A vDAG that cannot run: `path` is where (``nodes[2]``, ``graph.connections[3]``),
    `subject` the node or edge there (``'classify'``, ``'a' -> 'b'``), `problem` what is
    wrong. Its text is ``nodes[2] 'classify': problem``."""

    def __init__(self, path: str, problem: str, subject: str = "") -> None:
        self.path = path
        self.subject = subject
        self.detail = problem
        self.problem = f"{subject}: {problem}" if subject else problem
        super().__init__(f"{path} {self.problem}" if path else self.problem)


class PolicyRule(msgspec.Struct, frozen=True):
    """A node's policy: the policy's URI, what the spec passes to it, and (``policyRuleDigest``,
    ours) the content hash the policy package must have, ``sha256:<64 hex digits>``."""

    uri: str
    parameters: dict[str, Any]
    settings: dict[str, Any]
    digest: str | None = None


class VdagNode(msgspec.Struct, frozen=True):
    index: int
    label: str
    type: Literal["block", "vdag"]
    block_id: str | None
    vdag_uri: str | None
    assignment: PolicyRule | None
    preprocessing: PolicyRule | None
    postprocessing: PolicyRule | None
    model_parameters: dict[str, Any]
    inputs: tuple[str, ...]  # declared in its IOMap; empty: not declared
    outputs: tuple[str, ...]

    @property
    def path(self) -> str:
        return f"nodes[{self.index}]"

    def error(self, problem: str) -> VdagSpecError:
        return VdagSpecError(self.path, problem, _show(self.label))


class VdagEdge(msgspec.Struct, frozen=True):
    """`src`'s output feeds `dst`; `path` is where the spec says so."""

    src: str
    dst: str
    output_names: tuple[str, ...]
    input_names: tuple[str, ...]
    path: str

    def error(self, problem: str) -> VdagSpecError:
        return VdagSpecError(self.path, problem, f"{_show(self.src)} -> {_show(self.dst)}")


class VdagPort(msgspec.Struct, frozen=True):
    """A node that takes the vDAG's input (graph.input) or gives its output (graph.output)."""

    label: str
    names: tuple[str, ...]  # inputNames / outputNames; empty: all
    path: str


class VdagSpec(msgspec.Struct, frozen=True):
    name: str
    version: str  # "1.0.0", or with its release tag "1.0.0-stable"
    tags: tuple[str, ...]
    controller: dict[str, Any]
    nodes: tuple[VdagNode, ...]
    inputs: tuple[VdagPort, ...]
    outputs: tuple[VdagPort, ...]
    edges: tuple[VdagEdge, ...]

    @property
    def uri(self) -> str:
        """How a parent's ``vdagURI`` pins this version: ``name:version``."""
        return f"{self.name}:{self.version}"

    def node(self, label: str) -> VdagNode:
        return next(n for n in self.nodes if n.label == label)

    def input_names(self) -> tuple[str, ...]:
        """The names its graph.input declares (empty: none declared)."""
        return _union(port.names for port in self.inputs)

    def output_names(self) -> tuple[str, ...]:
        return _union(port.names for port in self.outputs)


def _union(groups: Any) -> tuple[str, ...]:
    out: dict[str, None] = {}
    for names in groups:
        out.update(dict.fromkeys(names))
    return tuple(out)


def _show(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def version_of(raw: Any) -> str:
    """AIOS writes ``{"version": "1.0", "release-tag": "stable"}``: "1.0-stable"; a string
    stays as it is."""
    if isinstance(raw, str):
        return raw
    if isinstance(raw, dict):
        version, tag = raw.get("version"), raw.get("release-tag")
        parts = [p for p in (version, tag) if isinstance(p, str) and p]
        return "-".join(parts)
    return ""


# --------------------------------------------------------------------------- parsing

Where = tuple[str, str]  # (path, subject) of a VdagSpecError


def _names(raw: Any, where: Where, field: str) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(n, str) and n for n in raw):
        raise VdagSpecError(where[0], f"{field} must be a list of non-empty strings", where[1])
    if len(raw) > MAX_NAMES:
        raise VdagSpecError(where[0], f"{field} has {len(raw)} names (limit {MAX_NAMES})", where[1])
    if len(set(raw)) != len(raw):
        raise VdagSpecError(where[0], f"{field} repeats a name", where[1])
    return tuple(raw)


def _io_map(raw: Any, where: Where) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The input and output names a node's IOMap declares."""
    if raw is None:
        return (), ()
    ins: dict[str, None] = {}
    outs: dict[str, None] = {}
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise VdagSpecError(where[0], f"IOMap[{i}] must be an object", where[1])
        for side, found in (("inputs", ins), ("outputs", outs)):
            ports = item.get(side, [])
            if not isinstance(ports, list):
                raise VdagSpecError(where[0], f"IOMap[{i}].{side} must be a list", where[1])
            for j, port in enumerate(ports):
                name = port.get("name") if isinstance(port, dict) else None
                if not isinstance(name, str) or not name:
                    problem = f"IOMap[{i}].{side}[{j}].name must be a non-empty string"
                    raise VdagSpecError(where[0], problem, where[1])
                found[name] = None
    return tuple(ins), tuple(outs)


def _policy(raw: Any, where: Where, field: str) -> PolicyRule | None:
    if not raw:  # absent or {}: AIOS writes {} for "no policy"
        return None
    uri = raw.get("policyRuleURI")
    if not isinstance(uri, str) or not uri:
        raise VdagSpecError(where[0], f"{field}.policyRuleURI must be a non-empty string", where[1])
    parameters, settings = raw.get("parameters", {}), raw.get("settings", {})
    for name, value in (("parameters", parameters), ("settings", settings)):
        if not isinstance(value, dict):
            raise VdagSpecError(where[0], f"{field}.{name} must be an object", where[1])
    digest = raw.get("policyRuleDigest")
    if digest is not None and not (isinstance(digest, str) and DIGEST_RE.fullmatch(digest)):
        problem = f"{field}.policyRuleDigest must be sha256:<64 hex digits> (its content hash)"
        raise VdagSpecError(where[0], problem, where[1])
    return PolicyRule(uri, parameters, settings, digest)


def _node(index: int, raw: dict[str, Any]) -> VdagNode:
    label = raw["nodeLabel"]
    where = (f"nodes[{index}]", _show(label))
    if "/" in label or not label.strip() or label != label.strip():
        problem = "nodeLabel must not contain '/' (it joins nested labels), be blank or padded"
        raise VdagSpecError(where[0], problem, where[1])
    kind = raw["nodeType"]
    block_id, vdag_uri = raw.get("manualBlockId") or None, raw.get("vdagURI") or None
    if kind == "block" and vdag_uri is not None:
        raise VdagSpecError(where[0], "a block node takes manualBlockId, not vdagURI", where[1])
    if kind == "vdag" and block_id is not None:
        raise VdagSpecError(where[0], "a vdag node takes vdagURI, not manualBlockId", where[1])
    ins, outs = _io_map(raw.get("IOMap"), where)
    rules = {
        name: _policy(raw.get(name), where, name)
        for name in ("assignmentPolicyRule", "preprocessingPolicyRule", "postprocessingPolicyRule")
    }
    return VdagNode(
        index=index,
        label=label,
        type=kind,
        block_id=block_id,
        vdag_uri=vdag_uri,
        assignment=rules["assignmentPolicyRule"],
        preprocessing=rules["preprocessingPolicyRule"],
        postprocessing=rules["postprocessingPolicyRule"],
        model_parameters=raw.get("modelParameters") or {},
        inputs=ins,
        outputs=outs,
    )


def _label(ref: Any) -> str:
    return ref if isinstance(ref, str) else ref["nodeLabel"]


def _ports(refs: list[Any], part: str, field: str) -> tuple[VdagPort, ...]:
    ports: dict[str, VdagPort] = {}
    for i, ref in enumerate(refs):
        path = f"graph.{part}[{i}]"
        label = _label(ref)
        names = () if isinstance(ref, str) else _names(ref.get(field), (path, _show(label)), field)
        if label in ports:  # the same node twice: its names together (none: all of them)
            names = _union((ports[label].names, names)) if names and ports[label].names else ()
            path = ports[label].path
        ports[label] = VdagPort(label, names, path)
    return tuple(ports.values())


def _edges(connections: list[dict[str, Any]]) -> tuple[VdagEdge, ...]:
    edges: dict[tuple[str, str, tuple[str, ...], tuple[str, ...]], VdagEdge] = {}

    def add(src: str, dst: str, raw: Any, path: str) -> None:
        where = (path, f"{_show(src)} -> {_show(dst)}")
        outs = () if isinstance(raw, str) else _names(raw.get("outputNames"), where, "outputNames")
        ins = () if isinstance(raw, str) else _names(raw.get("inputNames"), where, "inputNames")
        edges.setdefault((src, dst, outs, ins), VdagEdge(src, dst, outs, ins, path))

    for i, conn in enumerate(connections):
        path = f"graph.connections[{i}]"
        if "nodeLabel" in conn:
            if "from" in conn or "to" in conn:
                raise VdagSpecError(path, "gives nodeLabel (with inputs) or from and to, not both")
            for j, ref in enumerate(conn.get("inputs", [])):
                add(_label(ref), conn["nodeLabel"], ref, f"{path}.inputs[{j}]")
        else:
            add(conn["from"], conn["to"], conn, path)
    return tuple(edges.values())


def parse(value: dict[str, Any]) -> VdagSpec:
    """The typed graph of a `vdags` value that has passed the registry's shape checks
    (`registry.schemas.validate_value` calls this); VdagSpecError for what cannot run."""
    if len(value["nodes"]) > MAX_NODES:
        raise VdagSpecError("nodes", f"has {len(value['nodes'])} nodes (limit {MAX_NODES})")
    nodes = tuple(_node(i, raw) for i, raw in enumerate(value["nodes"]))
    graph = value["graph"]
    if ":" in value["vdagName"]:
        raise VdagSpecError("vdagName", "must not contain ':' (it separates name and version)")
    version = version_of(value["vdagVersion"])
    if not version:
        raise VdagSpecError("vdagVersion", "must name a version")
    spec = VdagSpec(
        name=value["vdagName"],
        version=version,
        tags=tuple(value.get("discoveryTags") or ()),
        controller=value.get("controller") or {},
        nodes=nodes,
        inputs=_ports(graph["input"], "input", "inputNames"),
        outputs=_ports(graph["output"], "output", "outputNames"),
        edges=_edges(graph.get("connections") or []),
    )
    check_graph(spec)
    return spec


# --------------------------------------------------------------------------- graph checks


def check_graph(spec: VdagSpec) -> None:
    """Self-loops, cycles, nodes nothing feeds or whose output goes nowhere, names."""
    by_label = {n.label: n for n in spec.nodes}
    succ: dict[str, list[VdagEdge]] = {n.label: [] for n in spec.nodes}
    fed = {p.label for p in spec.inputs}
    consumed = {p.label for p in spec.outputs}
    for edge in spec.edges:
        if edge.src == edge.dst:
            raise edge.error("a node cannot feed itself")
        succ[edge.src].append(edge)
        fed.add(edge.dst)
        consumed.add(edge.src)
    _check_acyclic(spec, succ)
    for node in spec.nodes:
        if node.label not in fed:
            raise node.error(
                "nothing feeds its input (no connection into it, and it is not in graph.input)"
            )
        if node.label not in consumed:
            raise node.error(
                "its output goes nowhere (no connection out of it, and it is not in graph.output)"
            )
    _check_names(spec, by_label)
    for node in spec.nodes:
        if node.inputs or node.outputs:
            check_all_used(
                spec, node.label, node.inputs, node.outputs, node.error, repr(node.label)
            )


def unmatched(declared: tuple[str, ...], named: list[tuple[str, ...]]) -> list[str]:
    """Declared names that none of `named` (what feeds, or reads, them) names; none when one
    of them names nothing (it takes the whole input, or output)."""
    if not named or any(not names for names in named):
        return []
    used = {name for names in named for name in names}
    return [name for name in declared if name not in used]


def check_all_used(
    spec: VdagSpec,
    label: str,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    error: Any,
    shown: str,
) -> None:
    """Every declared input of node `label` is fed, every declared output read."""
    if not inputs and not outputs:
        return
    feeds = [p.names for p in spec.inputs if p.label == label]
    feeds += [e.input_names for e in spec.edges if e.dst == label]
    for name in unmatched(inputs, feeds):
        raise error(
            f"input {_show(name)} of {shown} is fed by nothing (what feeds it names "
            f"{', '.join(sorted({n for names in feeds for n in names}))})"
        )
    reads = [p.names for p in spec.outputs if p.label == label]
    reads += [e.output_names for e in spec.edges if e.src == label]
    for name in unmatched(outputs, reads):
        raise error(
            f"output {_show(name)} of {shown} is read by nothing (what reads it names "
            f"{', '.join(sorted({n for names in reads for n in names}))})"
        )


def _check_acyclic(spec: VdagSpec, succ: dict[str, list[VdagEdge]]) -> None:
    """Depth-first, iteratively (a spec may have hundreds of nodes in a chain)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for root in spec.nodes:
        if root.label in state:
            continue
        state[root.label] = 1
        path: list[str] = [root.label]
        stack = [iter(succ[root.label])]
        while stack:
            edge = next(stack[-1], None)
            if edge is None:
                state[path.pop()] = 2
                stack.pop()
                continue
            seen = state.get(edge.dst)
            if seen == 1:
                loop = " -> ".join(path[path.index(edge.dst) :] + [edge.dst])
                raise edge.error(f"closes the cycle {loop}")
            if seen is None:
                state[edge.dst] = 1
                path.append(edge.dst)
                stack.append(iter(succ[edge.dst]))


def _check_names(spec: VdagSpec, by_label: dict[str, VdagNode]) -> None:
    """Names a node declares in its IOMap are the only ones others may name it by; each
    declared input is fed once."""
    fed_by: dict[tuple[str, str], str] = {}

    def declared(node: VdagNode, names: tuple[str, ...], side: str, where: Where) -> None:
        have = node.inputs if side == "input" else node.outputs
        if not have:  # undeclared (a vdag node's names are checked when it is expanded)
            return
        for name in names:
            if name not in have:
                problem = (
                    f"{side} name {_show(name)} is not an {side} of {_show(node.label)} "
                    f"(declared: {', '.join(have)})"
                )
                raise VdagSpecError(where[0], problem, where[1])

    def feed(node: VdagNode, names: tuple[str, ...], where: Where) -> None:
        for name in names:
            other = fed_by.setdefault((node.label, name), where[0])
            if other != where[0]:
                problem = f"feeds input {_show(name)} of {_show(node.label)}, fed by {other} too"
                raise VdagSpecError(where[0], problem, where[1])

    for port in spec.inputs:
        where = (port.path, _show(port.label))
        declared(by_label[port.label], port.names, "input", where)
        feed(by_label[port.label], port.names, where)
    for port in spec.outputs:
        declared(by_label[port.label], port.names, "output", (port.path, _show(port.label)))
    for edge in spec.edges:
        where = (edge.path, f"{_show(edge.src)} -> {_show(edge.dst)}")
        declared(by_label[edge.src], edge.output_names, "output", where)
        declared(by_label[edge.dst], edge.input_names, "input", where)
        feed(by_label[edge.dst], edge.input_names, where)
