"""The model package's shape: no private name crosses its modules, its modules import in one
direction, and none is over 600 lines. Read from the source with `ast`; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import daemon.shards

PACKAGE = "daemon.shards.model"
ROOT = Path(daemon.shards.__file__).parent / "model"
MAX_LINES = 600


def _resolve(node: ast.ImportFrom, module: str) -> str:
    """The absolute module name an `ImportFrom` in `module` (PACKAGE itself for the
    package's `__init__`) names."""
    if not node.level:
        return node.module or ""
    parts = module.split(".") if module == PACKAGE else module.split(".")[:-1]
    base = parts[: len(parts) - node.level + 1]
    return ".".join([*base, node.module] if node.module else base)


def _in_package(name: str) -> bool:
    return name == PACKAGE or name.startswith(PACKAGE + ".")


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def check_module(source: str, module: str) -> tuple[list[str], set[str]]:
    """(private names `module` takes from other modules of the package, the package modules
    it imports; PACKAGE stands for its `__init__`).

    Private names (a leading `_`, dunders aside) may be used only where they are defined: a
    module imports none by name from the package, and reads a private attribute only on
    `self` or `cls` (not `shard._rotary(...)`) or on a module from outside the package
    (`torch._C`)."""
    problems: list[str] = []
    imported: set[str] = set()
    external: set[str] = set()  # local names bound to things from outside the package
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            origin = _resolve(node, module)
            if not _in_package(origin):
                external.update(a.asname or a.name for a in node.names)
                continue
            for alias in node.names:
                submodule = f"{origin}.{alias.name}"
                is_module = origin == PACKAGE and (ROOT / f"{alias.name}.py").is_file()
                imported.add(submodule if is_module else origin)
                if _private(alias.name):
                    problems.append(f"{module}: imports {alias.name} from {origin}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if _in_package(alias.name):
                    imported.add(alias.name)
                else:
                    external.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or not _private(node.attr):
            continue
        root = node.value
        while isinstance(root, ast.Attribute):
            root = root.value
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue  # self._x; not self.shard._x
        dotted = ast.unparse(node)
        if isinstance(root, ast.Name) and root.id in external and not _in_package(dotted):
            continue
        problems.append(f"{module}: reads {dotted}")
    imported.discard(module)
    return problems, imported


def _modules() -> dict[str, str]:
    """Source by module name; the package's `__init__` is PACKAGE."""
    return {
        PACKAGE if path.stem == "__init__" else f"{PACKAGE}.{path.stem}": path.read_text()
        for path in sorted(ROOT.glob("*.py"))
    }


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle in `graph`, or None."""
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return [*path[path.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_checker_finds_private_names_and_circles():
    bad = (
        "import torch\n"
        "from daemon.shards.model.layers import Attention, _repeat_kv\n"
        "from .config import _int\n"
        "from daemon.shards.model import shard as s\n"
        "from daemon.shards.model import ModelError\n"
        "import daemon.shards.model.kvcache\n"
        "x = s._private\n"
        "y = daemon.shards.model.kvcache._hidden\n"
        "z = s.LlamaShard.__name__\n"
        "shard._rotary(x)\n"
        "self.shard._rotary(x)\n"
        "self._mine, cls._ours, torch._C\n"
    )
    problems, imported = check_module(bad, f"{PACKAGE}.decode")
    assert problems == [
        f"{PACKAGE}.decode: imports _repeat_kv from {PACKAGE}.layers",
        f"{PACKAGE}.decode: imports _int from {PACKAGE}.config",
        f"{PACKAGE}.decode: reads s._private",
        f"{PACKAGE}.decode: reads daemon.shards.model.kvcache._hidden",
        f"{PACKAGE}.decode: reads shard._rotary",
        f"{PACKAGE}.decode: reads self.shard._rotary",
    ]
    assert imported == {
        PACKAGE,  # the __init__, which imports every module: a circle
        f"{PACKAGE}.layers",
        f"{PACKAGE}.config",
        f"{PACKAGE}.shard",
        f"{PACKAGE}.kvcache",
    }
    init = "from .config import ModelError\nfrom . import tiny\n"
    assert check_module(init, PACKAGE) == ([], {f"{PACKAGE}.config", f"{PACKAGE}.tiny"})
    assert check_module("from torch import _C\nimport os\nos._exit", f"{PACKAGE}.x") == ([], set())
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_private_name_crosses_the_package_modules():
    modules = _modules()
    assert len(modules) >= 5, sorted(modules)
    problems = [p for module, text in modules.items() for p in check_module(text, module)[0]]
    assert problems == []


def test_the_package_modules_import_in_one_direction():
    modules = _modules()
    graph = {module: check_module(text, module)[1] for module, text in modules.items()}
    assert all(deps <= set(modules) for deps in graph.values()), graph
    assert _cycle(graph) is None
    # the leaves are what they say: families imports nothing of the package, config only it
    assert graph[f"{PACKAGE}.families"] == set()
    assert graph[f"{PACKAGE}.config"] == {f"{PACKAGE}.families"}


def test_every_module_is_under_600_lines():
    sizes = {path.name: len(path.read_text().splitlines()) for path in ROOT.glob("*.py")}
    assert max(sizes.values()) <= MAX_LINES, sizes
