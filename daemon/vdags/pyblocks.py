"""Python blocks: AIOS's block SDK contract, run in the sandbox of the daemon that serves them.

A Python block is a package as a policy is (daemon.sandbox.package: a folder or archive, a
`manifest.json`, a content hash) whose entry class follows AIOS's block contract:

    class Block:
        def __init__(self, context): ...          # {"block_id", "settings", "parameters"}
        def on_preprocess(self, packet): ...      # -> (ok, [entries]) or entries
        def on_data(self, entry): ...             # -> (ok, result) or result
        def on_update(self, parameters): ...      # -> (ok, detail) or detail
        def health(self): ...                     # -> (ok, detail) or detail

A call runs `on_preprocess` on the node's input (absent: the input is the one entry), then
`on_data` on each entry: one entry gives its result, several a list of results. An `ok` of
False fails the call with the detail as its message.

The sandbox pool runs AIOS *policies* (`eval`, `management`); a block runs through it
unchanged by wrapping it: `adapt` adds one module (`ADAPTER_MODULE`) to the block's files
and points the manifest's entry at it. The adapter's `eval` is a block call, its
`management("update", parameters)` is `on_update`, `management("health")` is `health`. The
block's own hash is checked when it is loaded (the digest its operator gives); the wrapped
package has its own hash, which the worker checks again over the bytes it receives.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from daemon.sandbox.errors import PolicyInvalid
from daemon.sandbox.package import MANIFEST, PolicyPackage, check_package, load_package

ADAPTER_MODULE = "gridmesh_block_adapter"
ADAPTER_CLASS = "GridmeshBlock"

ADAPTER = '''"""gridmesh's adapter: AIOS's block contract as a policy (daemon/vdags)."""

import importlib


def _result(value, what):
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], bool):
        ok, value = value
        if not ok:
            raise RuntimeError(f"{what} failed: {value}")
    return value


class GridmeshBlock:
    def __init__(self, rule_id, settings, parameters):
        module, _, name = settings["entry"].partition(":")
        cls = getattr(importlib.import_module(module), name)
        context = {
            "block_id": rule_id,
            "settings": settings.get("settings") or {},
            "parameters": parameters or {},
        }
        self.block = cls(context)

    def eval(self, parameters, input_data, context):
        pre = getattr(self.block, "on_preprocess", None)
        entries = [input_data] if pre is None else _result(pre(input_data), "on_preprocess")
        if not isinstance(entries, list):
            entries = [entries]
        results = [_result(self.block.on_data(entry), "on_data") for entry in entries]
        return results[0] if len(results) == 1 else results

    def management(self, action, data):
        if action == "update":
            return _result(self.block.on_update(data), "on_update")
        if action == "health":
            check = getattr(self.block, "health", None)
            return True if check is None else _result(check(), "health")
        raise ValueError(f"unknown action {action!r} (update, health)")
'''


def adapt(block: PolicyPackage) -> PolicyPackage:
    """`block` wrapped for the sandbox pool (the module docstring says how)."""
    if f"{ADAPTER_MODULE}.py" in block.files or ADAPTER_MODULE in _top_modules(block.files):
        raise PolicyInvalid(f"a block may not have a module named {ADAPTER_MODULE}")
    manifest = json.loads(block.files[MANIFEST])
    manifest["entry"] = f"{ADAPTER_MODULE}:{ADAPTER_CLASS}"
    files = dict(block.files)
    files[MANIFEST] = json.dumps(manifest, sort_keys=True).encode()
    files[f"{ADAPTER_MODULE}.py"] = ADAPTER.encode()
    parsed, digest = check_package(files, source=block.source)
    return PolicyPackage(parsed, files, digest, source=block.source, trusted=block.trusted)


def _top_modules(paths: Iterable[str]) -> set[str]:
    return {p.split("/")[0].removesuffix(".py") for p in paths}


class PythonBlock:
    """A block served here: its package (hash checked), wrapped, bound to its settings."""

    def __init__(
        self,
        block_id: str,
        package: PolicyPackage,
        settings: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> None:
        self.block_id = block_id
        self.package = package  # the block's own: its digest is what announcements name
        self.wrapped = adapt(package)
        self.ref = self.wrapped.bind(
            rule_id=block_id,
            settings={"entry": package.manifest.entry, "settings": dict(settings or {})},
            parameters=dict(parameters or {}),
        )
        self.inflight = 0
        self.calls = 0

    @property
    def digest(self) -> str:
        return self.package.digest


def load_block(
    block_id: str,
    path: str | Path,
    *,
    digest: str | None,
    allowed: Iterable[str],
    settings: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
) -> PythonBlock:
    """The block package at `path` (read, never imported here); PolicyInvalid or
    DependencyRefused when it cannot be served (not the expected hash, a bad manifest, a
    requirement off the allow-list)."""
    package = load_package(path, expected_digest=digest, allowed=allowed)
    return PythonBlock(block_id, package, settings, parameters)
