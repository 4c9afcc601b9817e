"""Runs in a sandbox worker only: turns a policy package's bytes into a live instance.

The worker checks the content hash again over the bytes it received (the daemon's check
does not cover what arrives), writes the files to its scratch folder (read back through
`__file__` by policies that ship data), and imports the code from the checked bytes, not
from disk. An import guard lets the policy import the standard library, its own modules and
the top-level packages its manifest requires — which the operator allowed — and nothing
else: `import requests` fails with ImportError even where requests is installed. The guard
is dependency control, not a security boundary: the worker's isolation layers are.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from daemon.sandbox.errors import PolicyInvalid
from daemon.sandbox.package import Manifest, check_package, module_names

MAX_INSTANCES = 64


class PolicyImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the policy's modules from its checked bytes and refuses every import outside
    the standard library, the policy and its requirements."""

    def __init__(self, files: Mapping[str, bytes], root: Path, allowed: Iterable[str]) -> None:
        self.sources: dict[str, tuple[str, bytes, bool]] = {}  # name -> (path, code, is package)
        for path, data in files.items():
            if not path.endswith(".py"):
                continue
            parts = path[:-3].split("/")
            package = parts[-1] == "__init__"
            name = ".".join(parts[:-1] if package else parts)
            if name and all(part.isidentifier() for part in name.split(".")):
                self.sources[name] = (str(root / path), data, package)
        self.own = module_names(files)
        self.allowed = set(allowed)

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        top = fullname.partition(".")[0]
        if top in self.own:
            if fullname not in self.sources:
                return None  # not in the package: ModuleNotFoundError
            origin, _, package = self.sources[fullname]
            spec = importlib.util.spec_from_loader(
                fullname, self, origin=origin, is_package=package
            )
            assert spec is not None
            spec.has_location = True
            if package:
                spec.submodule_search_locations = [str(Path(origin).parent)]
            return spec
        if top in sys.stdlib_module_names or top in self.allowed:
            return None  # the interpreter's own finders
        raise ModuleNotFoundError(
            f"import of {top!r} refused: a policy may import the standard library, its own "
            f"modules and the packages its manifest requires "
            f"({', '.join(sorted(self.allowed)) or 'none'})",
            name=fullname,
        )

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return None

    def exec_module(self, module: ModuleType) -> None:
        origin, data, _ = self.sources[module.__name__]
        code = compile(data, origin, "exec", dont_inherit=True)
        exec(code, module.__dict__)


class LoadedPolicy:
    """The policy class of one package and the instances made of it (one per rule id,
    settings and parameters)."""

    def __init__(self, manifest: Manifest, cls: type) -> None:
        self.manifest = manifest
        self.cls = cls
        self.instances: dict[Any, Any] = {}

    def instance(self, key: Any, rule_id: str, settings: Any, parameters: Any) -> Any:
        if key not in self.instances:
            if len(self.instances) >= MAX_INSTANCES:
                self.instances.pop(next(iter(self.instances)))
            self.instances[key] = self.cls(rule_id, settings, parameters)
        return self.instances[key]


def load(
    files: Mapping[str, bytes],
    digest: str,
    *,
    allowed: Iterable[str],
    root: Path,
) -> LoadedPolicy:
    """Checks `files` against `digest` and the operator's allow-list, writes them under
    `root`, imports the entry module from the checked bytes and returns its class. The
    policy's own import-time errors propagate as they are (the worker reports them)."""
    manifest, _ = check_package(files, expected_digest=digest, allowed=allowed)
    for path, data in files.items():
        target = root / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    importer = PolicyImporter(files, root, manifest.requirements)
    clashes = sorted(name for name in importer.own if name in sys.modules)
    if clashes:
        raise PolicyInvalid(f"the policy's modules {clashes} shadow modules already loaded")
    sys.meta_path.insert(0, importer)
    module = __import__(manifest.module, fromlist=["_"])
    cls = getattr(module, manifest.class_name, None)
    if not isinstance(cls, type):
        raise PolicyInvalid(f"{manifest.entry}: the module has no class {manifest.class_name}")
    for method in ("eval", "management"):
        if not callable(getattr(cls, method, None)):
            raise PolicyInvalid(f"{manifest.entry} has no method {method}(...)")
    return LoadedPolicy(manifest, cls)
