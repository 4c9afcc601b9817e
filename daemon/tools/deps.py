"""The import check: no import circle among our modules, the layering rules, no testing kit.

    python -m daemon.tools.deps [--root DIR] [--allow FILE] [--strict]

It reads the source with `ast` (nothing is imported) and fails (exit 1), naming each offending
import by file and line, on:

- an import circle among the modules of our packages (daemon, p2p, registry, scheduler,
  contracts). Every import of one of our modules counts, wherever it stands: at module level,
  under `if TYPE_CHECKING:`, or inside a function. A lazy or type-only import avoids the error
  at import time but not the circle: the two modules still cannot be read, tested or moved
  apart (as the model imported its decoder inside a function, which imported the model back,
  and services imported `Daemon` back for their annotations). Lazy imports of
  other people's modules (torch) are not ours and never count.
- an import that breaks the layering of DESIGN.md: p2p imports nothing of ours, registry
  only p2p, scheduler only p2p and registry, contracts only p2p; daemon may import all.
- a production import of the testing kit (`p2p.testing`, and the old `p2p.memnet`, should
  it come back). Production means the packages above, which the wheel
  ships, less the kit itself. tests/ and bench/ are not production: neither is shipped, and
  a simulation on the in-memory network (bench/registry.py) is what the kit is for.
  `daemon/tools/` is shipped and counts.

`importlib.import_module("...")` with a literal name counts as an import too.

Known offences that other work is removing are listed, each with its reason, in the
allow-list file beside this module (deps_allow.txt); the goal is an empty list. An allowed
cycle entry is one import edge (`importer -> imported`) taken out of the graph before the
cycles are looked for, so cutting a circle anywhere keeps the check green. An entry that no
longer matches anything (for a cycle entry: whose import no longer closes a circle) is
reported as stale (a failure with --strict).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("daemon", "p2p", "registry", "scheduler", "contracts")
# What each package may import of ours (DESIGN.md, "Layout"); daemon may import everything.
LAYERS: dict[str, frozenset[str]] = {
    "p2p": frozenset({"p2p"}),
    "registry": frozenset({"registry", "p2p"}),
    "scheduler": frozenset({"scheduler", "p2p", "registry"}),
    "contracts": frozenset({"contracts", "p2p"}),
    "daemon": frozenset(PACKAGES),
}
TESTING_KIT = ("p2p.testing", "p2p.memnet")
KINDS = ("cycle", "layer", "testing-kit")
DEFAULT_ALLOW = Path(__file__).with_name("deps_allow.txt")


@dataclass(frozen=True)
class Import:
    """One import of one of our modules: who, what, where."""

    importer: str
    imported: str
    path: Path
    line: int

    def where(self) -> str:
        return f"{self.path}:{self.line}"


@dataclass(frozen=True)
class Violation:
    kind: str  # one of KINDS
    importer: str
    imported: str
    message: str

    @property
    def key(self) -> tuple[str, str, str]:
        return (self.kind, self.importer, self.imported)


@dataclass
class Report:
    violations: list[Violation] = field(default_factory=list)
    allowed: list[tuple[str, str, str]] = field(default_factory=list)  # entries that matched
    stale: list[tuple[str, str, str]] = field(default_factory=list)  # entries that did not
    errors: list[str] = field(default_factory=list)  # files that do not parse
    modules: int = 0
    edges: int = 0

    def ok(self, strict: bool = False) -> bool:
        return not self.violations and not self.errors and not (strict and self.stale)


class AllowListError(ValueError):
    pass


def _is_under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def find_modules(root: Path) -> dict[str, Path]:
    """Our modules under `root`: dotted name -> file relative to `root` (a package is its
    __init__.py)."""
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        base = root / package
        if not (base / "__init__.py").is_file():
            continue
        for path in sorted(base.rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if all(part.isidentifier() for part in parts):
                modules[".".join(parts)] = path.relative_to(root)
    return modules


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The deepest of our modules that importing `name` imports, or None if not ours."""
    parts = name.split(".")
    if parts[0] not in PACKAGES:
        return None
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _literal_import_module(node: ast.Call) -> str | None:
    """The name in `importlib.import_module("x")` / `import_module("x")`, if literal."""
    func = node.func
    called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    if called not in ("import_module", "__import__") or not node.args:
        return None
    arg = node.args[0]
    return arg.value if isinstance(arg, ast.Constant) and isinstance(arg.value, str) else None


def imports_of(root: Path, module: str, modules: dict[str, Path]) -> Iterator[Import]:
    """Every import of one of our modules in `module`, at any depth of its syntax tree."""
    path = modules[module]
    tree = ast.parse((root / path).read_bytes(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                if node.level - 1 >= len(base_parts):
                    continue  # beyond the top of our package: not ours
                base = ".".join(base_parts[: len(base_parts) - (node.level - 1)])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            # `from a import b` imports a.b when b is a module, else a (for the name b)
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                for alias in node.names
            ]
        elif isinstance(node, ast.Call):
            literal = _literal_import_module(node)
            targets = [literal] if literal else []
        for target in targets:
            resolved = _resolve(target, modules)
            if resolved is not None and resolved != module:
                yield Import(module, resolved, path, node.lineno)


def read_allow_list(path: Path | None) -> set[tuple[str, str, str]]:
    """`KIND IMPORTER -> IMPORTED` per line; `#` starts a comment; blank lines are skipped."""
    if path is None or not path.exists():
        return set()
    entries: set[tuple[str, str, str]] = set()
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        words = line.split()
        if len(words) != 4 or words[2] != "->" or words[0] not in KINDS:
            raise AllowListError(
                f"{path}:{number}: expected 'KIND IMPORTER -> IMPORTED' with KIND one of "
                f"{', '.join(KINDS)}, got {raw.strip()!r}"
            )
        entries.add((words[0], words[1], words[3]))
    return entries


def _strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module only."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def _cycle_through(component: list[str], graph: dict[str, set[str]]) -> list[str]:
    """One circle inside a strongly connected component, as [a, b, ..., a] (shortest from a)."""
    members = set(component)
    start = component[0]
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for child in sorted(graph[node] & members):
                if child == start:
                    path = [node]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [*reversed(path), start]
                if child not in parents:
                    parents[child] = node
                    following.append(child)
        frontier = following
    raise AssertionError(f"no circle through {start}")  # a component always has one


def check(root: Path, allow: set[tuple[str, str, str]] | None = None) -> Report:
    """Check the tree at `root` against the rules, allowing the listed entries."""
    allow = allow or set()
    report = Report()
    modules = find_modules(root)
    report.modules = len(modules)
    sites: dict[tuple[str, str], Import] = {}  # the first import of each edge
    for module, path in modules.items():
        try:
            for found in imports_of(root, module, modules):
                sites.setdefault((found.importer, found.imported), found)
        except SyntaxError as exc:
            report.errors.append(f"{path}: does not parse: {exc}")
    report.edges = len(sites)
    matched: set[tuple[str, str, str]] = set()

    def offend(kind: str, imp: Import, message: str) -> None:
        key = (kind, imp.importer, imp.imported)
        if key in allow:
            matched.add(key)
        else:
            report.violations.append(Violation(kind, imp.importer, imp.imported, message))

    for (importer, imported), imp in sorted(sites.items()):
        own, theirs = importer.split(".")[0], imported.split(".")[0]
        if theirs not in LAYERS[own]:
            may = ", ".join(sorted(LAYERS[own] - {own})) or "nothing of ours"
            offend("layer", imp, f"{imp.where()}: {own} may import {may}; it imports {imported}")
        in_kit = any(_is_under(imported, kit) for kit in TESTING_KIT)
        from_kit = any(_is_under(importer, kit) for kit in TESTING_KIT)
        if in_kit and not from_kit:
            offend(
                "testing-kit",
                imp,
                f"{imp.where()}: production module {importer} imports the testing kit ({imported})",
            )

    # an allowed edge is in use while it still closes a circle (its ends share a component)
    full: dict[str, set[str]] = {module: set() for module in modules}
    for importer, imported in sites:
        full[importer].add(imported)
    component_of = {m: n for n, c in enumerate(_strongly_connected(full)) for m in c}
    graph: dict[str, set[str]] = {module: set() for module in modules}
    for importer, imported in sites:
        if ("cycle", importer, imported) not in allow:
            graph[importer].add(imported)
        elif component_of.get(importer, -1) == component_of.get(imported, -2):
            matched.add(("cycle", importer, imported))
    for component in _strongly_connected(graph):
        circle = _cycle_through(component, graph)
        steps = [sites[(a, b)] for a, b in zip(circle, circle[1:], strict=False)]
        lines = "\n".join(f"    {s.importer} -> {s.imported}  ({s.where()})" for s in steps)
        others = sorted(set(component) - set(circle))
        more = f"\n    (the circle's component also holds {', '.join(others)})" if others else ""
        message = f"import circle {' -> '.join(circle)}:\n{lines}{more}"
        # one violation per circle, keyed by its closing edge (a candidate to allow or cut)
        report.violations.append(
            Violation("cycle", steps[-1].importer, steps[-1].imported, message)
        )
    report.allowed = sorted(matched)
    report.stale = sorted(allow - matched)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.tools.deps", description=__doc__)
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--root",
        type=Path,
        default=Path(__file__).resolve().parents[2],
        help="the source tree to check (default: the one this module is in)",
    )
    parser.add_argument(
        "--allow",
        type=Path,
        default=DEFAULT_ALLOW,
        help="allow-list file of known offences (default: %(default)s)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="fail on allow-list entries that match nothing"
    )
    args = parser.parse_args(argv)
    try:
        allow = read_allow_list(args.allow)
    except AllowListError as exc:
        print(f"deps: {exc}", file=sys.stderr)
        return 2
    report = check(args.root, allow)
    for error in report.errors:
        print(f"ERROR {error}")
    for violation in report.violations:
        print(f"FAIL {violation.kind}: {violation.message}")
    for kind, importer, imported in report.allowed:
        print(f"allowed (known, listed in {args.allow.name}) {kind} {importer} -> {imported}")
    for kind, importer, imported in report.stale:
        print(f"STALE allow-list entry, remove it: {kind} {importer} -> {imported}")
    verdict = "ok" if report.ok(args.strict) else "FAILED"
    print(
        f"deps {verdict}: {report.modules} modules, {report.edges} imports of our modules, "
        f"{len(report.violations)} violations, {len(report.errors)} unparsable, "
        f"{len(report.allowed)} allowed, {len(report.stale)} stale"
    )
    return 0 if report.ok(args.strict) else 1


if __name__ == "__main__":
    sys.exit(main())
