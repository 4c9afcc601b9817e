"""The compiled contracts: ABI and bytecode, read from the committed `contracts/artifacts/*.json`.

`contracts/compile.mjs` writes them (solc-js, pinned in contracts/package-lock.json) and
tests/contracts/test_artifacts.py checks they equal a fresh compile, so the daemon never needs
Node: it only reads these files, which the wheel ships as package data.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass(frozen=True)
class Artifact:
    """One compiled contract. `abi` is shared between callers of `load`: do not mutate it."""

    name: str
    abi: list[dict[str, Any]]
    bytecode: str  # 0x-prefixed creation code
    deployed_bytecode: str  # 0x-prefixed runtime code
    compiler: dict[str, Any]


def _directory() -> Any:
    return resources.files(__package__) / "artifacts"


def names() -> list[str]:
    """The names of every committed artifact, sorted (test-only contracts included)."""
    return sorted(
        entry.name[: -len(".json")]
        for entry in _directory().iterdir()
        if entry.name.endswith(".json") and _NAME.match(entry.name[: -len(".json")])
    )


@cache
def load(name: str) -> Artifact:
    """The artifact of contract `name` (e.g. "JobEscrow"); KeyError names the known ones."""
    if not _NAME.match(name):
        raise KeyError(f"not a contract name: {name!r}")
    entry = _directory() / f"{name}.json"
    if not entry.is_file():
        raise KeyError(f"no artifact {name!r}; known: {', '.join(names())}")
    data = json.loads(entry.read_text(encoding="utf-8"))
    return Artifact(
        name=data["contractName"],
        abi=data["abi"],
        bytecode=data["bytecode"],
        deployed_bytecode=data["deployedBytecode"],
        compiler=data["compiler"],
    )


def all_abis() -> dict[str, list[dict[str, Any]]]:
    """Every committed contract's ABI by name (to decode custom errors and events)."""
    return {name: load(name).abi for name in names()}
