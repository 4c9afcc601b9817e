"""vDAG specs: parsed, versioned, nested vDAGs expanded, compiled into a plan. Sans-IO.

A vDAG entry (the AIOS format, see `registry.schemas`) is parsed into a typed
`VdagSpec` by `parse`, which runs the registry's own checks (shape, bounds, and the graph
checks of `registry.vdags`: self-loops, cycles, nodes nothing feeds, dead ends, names).
`compile_plan` then needs the other entries, through two callbacks:

- ``versions(name) -> specs``: every stored version of a vDAG name, for sub-vDAGs;
- ``block_known(block_id) -> bool``: whether a node's ``manualBlockId`` names a block.

It refuses an unknown block, an unknown sub-vDAG, a vDAG nested inside itself (at any
depth), names a sub-vDAG does not declare, nesting deeper than `MAX_NESTING` and plans of more
than `MAX_PLAN_STEPS` steps or `MAX_PLAN_EDGES` edges, and gives a `VdagPlan`: every block
node of the whole nesting, labelled by its path (``sub/summarize``), in topological order,
with its level (steps of one level are independent: the executor may run them in parallel).

Versions: ``vdagURI`` is ``name``, ``name:version`` or ``name:version-tag`` (AIOS joins the
version and its release tag with ``-``). A name alone picks the latest version (versions
compared part by part, numbers as numbers); ``name:1.0`` picks the latest of ``1.0`` and its
tagged releases (``1.0-stable``). A pinned version stays resolvable after newer ones are
written, as long as the entries are kept under different keys (``name:version``).

Every error is a `VdagError` naming the node or edge: ``nodes[2] 'sub': unknown sub-vDAG
'summarizer:2'``, ``graph.connections[3] 'a' -> 'b': closes the cycle a -> b -> a``; an error
inside a sub-vDAG says which node nests it: ``nodes[2] 'sub': in vDAG summarizer:1.0:
nodes[0] 'x': unknown block 'gone'``.
"""

from __future__ import annotations

import heapq
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from registry import schemas
from registry.vdags import (
    PolicyRule,
    VdagEdge,
    VdagNode,
    VdagPort,
    VdagSpec,
    VdagSpecError,
    check_all_used,
    version_of,
)
from registry.vdags import parse as parse_graph

__all__ = [
    "MAX_NESTING",
    "MAX_PLAN_EDGES",
    "MAX_PLAN_STEPS",
    "Catalog",
    "PlanEdge",
    "PlanPort",
    "PlanStep",
    "PolicyRule",
    "VdagEdge",
    "VdagError",
    "VdagNode",
    "VdagPlan",
    "VdagPort",
    "VdagSpec",
    "compile_plan",
    "parse",
    "parse_uri",
    "version_key",
    "version_of",
]

MAX_NESTING = 8  # vDAGs inside vDAGs, the outermost counting as 1
MAX_PLAN_STEPS = 1024  # block nodes of the whole nesting
MAX_PLAN_EDGES = 8192  # an edge between two sub-vDAGs joins each output step to each input

Versions = Callable[[str], Iterable[VdagSpec]]
BlockKnown = Callable[[str], bool]


class VdagError(VdagSpecError):
    """A vDAG spec refused: its text names the node or edge (``nodes[2] 'x': ...``)."""


def _show(text: str, limit: int = 64) -> str:
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


def parse(value: Any, key: str | None = None) -> VdagSpec:
    """A vDAG spec from JSON data, as the registry would store it under `key`; VdagError
    (never anything else) for anything it refuses."""
    if not isinstance(value, dict):
        raise VdagError("", f"a vDAG spec must be an object, not {type(value).__name__}")
    try:
        schemas.validate_value("vdags", key or "vdag", value)
    except schemas.SchemaError as exc:
        message = str(exc).split(": ", 1)[-1]  # without the "vdags/<key>: " prefix
        path = exc.path
        if path and message.startswith(path + " "):
            raise VdagError(path, message[len(path) + 1 :]) from None
        raise VdagError("", message) from None
    try:
        return parse_graph(value)  # validate_value ran it: this cannot fail now
    except VdagSpecError as exc:
        raise VdagError(exc.path, exc.problem) from None


# --------------------------------------------------------------------------- versions


def parse_uri(uri: str) -> tuple[str, str | None]:
    """``name[:version]`` -> (name, version or None)."""
    name, sep, version = uri.partition(":")
    return name, (version if sep and version else None)


def version_key(version: str) -> tuple[tuple[int, int, str], ...]:
    """Orders versions part by part (split at . - + _), numbers as numbers, before words."""
    parts = re.split(r"[.\-+_]", version)
    return tuple((0, int(p), "") if p.isascii() and p.isdigit() else (1, 0, p) for p in parts)


def _matches(spec: VdagSpec, version: str | None) -> bool:
    return version is None or spec.version == version or spec.version.startswith(version + "-")


@dataclass
class Catalog:
    """vDAG specs by name and version; the last added of one (name, version) wins."""

    specs: dict[tuple[str, str], VdagSpec] = field(default_factory=dict)

    @classmethod
    def of(cls, specs: Iterable[VdagSpec]) -> Catalog:
        catalog = cls()
        for spec in specs:
            catalog.add(spec)
        return catalog

    def add(self, spec: VdagSpec) -> None:
        self.specs[(spec.name, spec.version)] = spec

    def versions(self, name: str) -> list[VdagSpec]:
        return [s for (n, _), s in self.specs.items() if n == name]

    def resolve(self, uri: str, version: str | None = None) -> VdagSpec | None:
        return resolve(self.versions, uri, version)


def resolve(versions: Versions, uri: str, version: str | None = None) -> VdagSpec | None:
    """The spec `uri` (``name[:version]``, or `version` given apart) names: the latest
    matching version, or None."""
    name, pinned = parse_uri(uri)
    wanted = version if version is not None else pinned
    found = [s for s in versions(name) if s.name == name and _matches(s, wanted)]
    if not found:
        return None
    return max(found, key=lambda s: (version_key(s.version), s.version))


# --------------------------------------------------------------------------- the plan


class PlanStep(msgspec.Struct, frozen=True):
    """One block node of the expanded graph."""

    label: str  # its path through the nesting: "sub/summarize"
    node: str  # its label in its own vDAG
    vdag: str  # that vDAG, "name:version"
    block_id: str | None  # None: its assignment policy picks the block
    assignment: PolicyRule | None
    preprocessing: PolicyRule | None
    postprocessing: PolicyRule | None
    model_parameters: dict[str, Any]
    after: tuple[str, ...]  # the steps whose outputs it takes
    level: int  # 0: takes the vDAG's input only; n: after steps of levels < n


class PlanEdge(msgspec.Struct, frozen=True):
    src: str
    dst: str
    output_names: tuple[str, ...]
    input_names: tuple[str, ...]


class PlanPort(msgspec.Struct, frozen=True):
    step: str
    names: tuple[str, ...]


class VdagPlan(msgspec.Struct, frozen=True):
    name: str
    version: str
    steps: tuple[PlanStep, ...]  # topological order
    edges: tuple[PlanEdge, ...]
    inputs: tuple[PlanPort, ...]  # the steps the vDAG's input goes to
    outputs: tuple[PlanPort, ...]  # the steps whose outputs are the vDAG's output
    nested: tuple[str, ...]  # every sub-vDAG expanded, "name:version"

    @property
    def levels(self) -> list[list[str]]:
        out: list[list[str]] = []
        for step in self.steps:
            while len(out) <= step.level:
                out.append([])
            out[step.level].append(step.label)
        return out

    def to_json(self) -> dict[str, Any]:
        raw = msgspec.to_builtins(self)
        raw["vdag"] = f"{self.name}:{self.version}"
        raw["levels"] = self.levels
        return raw


@dataclass
class _Part:
    """One vDAG expanded: its steps, edges, and where its input and output attach."""

    steps: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges: dict[tuple[str, str], PlanEdge] = field(default_factory=dict)
    ins: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    outs: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)


@dataclass
class _Context:
    versions: Versions
    block_known: BlockKnown | None
    max_nesting: int
    max_steps: int
    max_edges: int
    count: int = 0
    edges: int = 0
    nested: dict[str, None] = field(default_factory=dict)


def compile_plan(
    spec: VdagSpec,
    versions: Versions,
    block_known: BlockKnown | None = None,
    *,
    max_nesting: int = MAX_NESTING,
    max_steps: int = MAX_PLAN_STEPS,
    max_edges: int = MAX_PLAN_EDGES,
) -> VdagPlan:
    """Expand `spec`'s sub-vDAGs and order the whole graph; VdagError naming the node or
    edge for an unknown block or sub-vDAG, nesting that loops or is too deep, a sub-vDAG
    named by inputs or outputs it does not declare, too many steps. `spec` is judged as if
    it were stored: sub-vDAGs that name it find it, not an older version of it."""

    def with_root(name: str) -> list[VdagSpec]:
        # judged as if applied: a sub-vDAG naming it finds it (and so the cycle)
        found = [s for s in versions(name) if (s.name, s.version) != (spec.name, spec.version)]
        return [*found, spec] if name == spec.name else found

    ctx = _Context(with_root, block_known, max_nesting, max_steps, max_edges)
    try:
        part = _expand(spec, "", (spec.uri,), ctx)
    except VdagError:
        raise
    except VdagSpecError as exc:
        raise VdagError(exc.path, exc.detail, exc.subject) from None
    steps = _order(part)
    return VdagPlan(
        name=spec.name,
        version=spec.version,
        steps=steps,
        edges=tuple(part.edges.values()),
        inputs=tuple(PlanPort(s, n) for s, n in part.ins),
        outputs=tuple(PlanPort(s, n) for s, n in part.outs),
        nested=tuple(ctx.nested),
    )


def _select(
    ports: list[tuple[str, tuple[str, ...]]], names: tuple[str, ...]
) -> list[tuple[str, tuple[str, ...]]]:
    """The ports that take (or give) `names`: all when either side names nothing."""
    if not names:
        return ports
    return [p for p in ports if not p[1] or set(p[1]) & set(names)]


def _check_sub_names(sub: VdagSpec, names: tuple[str, ...], side: str, err: Any) -> None:
    have = sub.input_names() if side == "input" else sub.output_names()
    for name in names:
        if have and name not in have:
            raise err(
                f"{side} name {_show(name)} is not an {side} of vDAG {sub.uri} "
                f"(declared: {', '.join(have)})"
            )


def _expand(spec: VdagSpec, prefix: str, stack: tuple[str, ...], ctx: _Context) -> _Part:
    part = _Part()
    ins: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    outs: dict[str, list[tuple[str, tuple[str, ...]]]] = {}
    subs: dict[str, VdagSpec] = {}
    for node in spec.nodes:
        flat = prefix + node.label
        if node.type == "block":
            _check_block(node, ctx)
            ctx.count += 1
            if ctx.count > ctx.max_steps:
                raise node.error(f"the plan grows past {ctx.max_steps} steps")
            part.steps[flat] = {
                "label": flat,
                "node": node.label,
                "vdag": spec.uri,
                "block_id": node.block_id,
                "assignment": node.assignment,
                "preprocessing": node.preprocessing,
                "postprocessing": node.postprocessing,
                "model_parameters": node.model_parameters,
            }
            ins[node.label] = outs[node.label] = [(flat, ())]
            continue
        sub = _sub_vdag(node, stack, ctx)
        subs[node.label] = sub
        ctx.nested[sub.uri] = None
        try:
            inner = _expand(sub, flat + "/", (*stack, sub.uri), ctx)
        except VdagSpecError as exc:
            raise node.error(f"in vDAG {sub.uri}: {exc}") from None
        part.steps.update(inner.steps)
        part.edges.update(inner.edges)
        ins[node.label], outs[node.label] = inner.ins, inner.outs

    for edge in spec.edges:
        if edge.src in subs:
            _check_sub_names(subs[edge.src], edge.output_names, "output", edge.error)
        if edge.dst in subs:
            _check_sub_names(subs[edge.dst], edge.input_names, "input", edge.error)
        for src, _ in _select(outs[edge.src], edge.output_names):
            for dst, _ in _select(ins[edge.dst], edge.input_names):
                if (src, dst) in part.edges:
                    continue
                ctx.edges += 1
                if ctx.edges > ctx.max_edges:
                    raise edge.error(f"the plan grows past {ctx.max_edges} edges")
                part.edges[(src, dst)] = PlanEdge(src, dst, edge.output_names, edge.input_names)
    for port in spec.inputs:
        if port.label in subs:
            err = VdagError(port.path, "", _show(port.label))
            _check_sub_names(subs[port.label], port.names, "input", _erring(err))
        part.ins.extend((s, port.names) for s, _ in _select(ins[port.label], port.names))
    for port in spec.outputs:
        if port.label in subs:
            err = VdagError(port.path, "", _show(port.label))
            _check_sub_names(subs[port.label], port.names, "output", _erring(err))
        part.outs.extend((s, port.names) for s, _ in _select(outs[port.label], port.names))
    for label, sub in subs.items():
        node = spec.node(label)
        shown = f"vDAG {sub.uri}"
        check_all_used(spec, label, sub.input_names(), sub.output_names(), node.error, shown)
    return part


def _erring(template: VdagError) -> Callable[[str], VdagError]:
    return lambda problem: VdagError(template.path, problem, template.subject)


def _check_block(node: VdagNode, ctx: _Context) -> None:
    if node.block_id is None:
        if node.assignment is None:
            raise node.error("a block node needs a manualBlockId or an assignmentPolicyRule")
    elif ctx.block_known is not None and not ctx.block_known(node.block_id):
        raise node.error(f"unknown block {_show(node.block_id)}")


def _sub_vdag(node: VdagNode, stack: tuple[str, ...], ctx: _Context) -> VdagSpec:
    uri = node.vdag_uri or ""
    sub = resolve(ctx.versions, uri)
    if sub is None:
        raise node.error(f"unknown sub-vDAG {_show(uri)}")
    if sub.uri in stack:
        loop = " -> ".join((*stack[stack.index(sub.uri) :], sub.uri))
        raise node.error(f"nests a vDAG inside itself: {loop}")
    if len(stack) >= ctx.max_nesting:
        raise node.error(f"nests vDAGs deeper than {ctx.max_nesting} levels")
    return sub


def _order(part: _Part) -> tuple[PlanStep, ...]:
    """Kahn's algorithm, ties in spec order; a step's level is one past its deepest input."""
    preds: dict[str, list[str]] = {label: [] for label in part.steps}
    succ: dict[str, list[str]] = {label: [] for label in part.steps}
    for src, dst in part.edges:
        preds[dst].append(src)
        succ[src].append(dst)
    waiting = {label: len(p) for label, p in preds.items()}
    position = {label: i for i, label in enumerate(part.steps)}
    ready = [(position[label], label) for label, n in waiting.items() if n == 0]
    heapq.heapify(ready)
    level: dict[str, int] = {}
    out: list[PlanStep] = []
    while ready:
        _, label = heapq.heappop(ready)
        level[label] = 1 + max((level[p] for p in preds[label]), default=-1)
        out.append(PlanStep(**part.steps[label], after=tuple(preds[label]), level=level[label]))
        for nxt in succ[label]:
            waiting[nxt] -= 1
            if waiting[nxt] == 0:
                heapq.heappush(ready, (position[nxt], nxt))
    if len(out) != len(part.steps):  # each vDAG is acyclic, so its expansion is too
        raise VdagError("", "the expanded graph has a cycle")
    return tuple(out)
