"""Python-block packages and vDAG specs written by the vDAG tests, and the check that the
sandbox can run here (its pool starts a worker; tests that need it skip with the reason)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

# AIOS block SDK blocks, by name: the class body of `Block` (context kept as self.context)
BLOCKS = {
    # text -> TEXT
    "upper": """
        def on_preprocess(self, packet):
            return True, [packet]

        def on_data(self, entry):
            text = entry["text"] if isinstance(entry, dict) else entry
            return True, text.upper()
    """,
    # text -> its reverse
    "rev": """
        def on_data(self, entry):
            return True, entry[::-1]
    """,
    # {"a": x, "b": y} -> "x|y" (with the block's settings' separator)
    "join": """
        def on_data(self, entry):
            sep = self.context["settings"].get("sep", "|")
            parts = [entry[k] if isinstance(entry[k], str) else entry[k]["text"]
                     for k in sorted(entry)]
            return True, sep.join(parts)
    """,
    # one entry per word, each counted: {"words": n, "lengths": [...]}
    "count": """
        def on_preprocess(self, packet):
            return True, packet.split()

        def on_data(self, entry):
            return True, len(entry)
    """,
    # the text with the tag its parameters give (on_update changes them)
    "tag": """
        def on_data(self, entry):
            return True, entry + self.context["parameters"].get("tag", "")
    """,
    # fails as its own code would
    "boom": """
        def on_data(self, entry):
            return False, "cannot handle " + repr(entry)[:20]
    """,
}


def block_package(
    root: Path, name: str, body: str | None = None, manifest: dict[str, Any] | None = None
) -> Path:
    """A block package folder: block.py (class Block with AIOS's contract) and its manifest."""
    folder = root / f"block-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "class Block:\n"
        "    def __init__(self, context):\n"
        "        self.context = context\n\n"
        + textwrap.indent(textwrap.dedent(body or BLOCKS[name]).strip(), "    ")
        + "\n\n    def on_update(self, parameters):\n"
        "        self.context['parameters'] = parameters\n"
        "        return True, parameters\n\n"
        "    def health(self):\n"
        "        return True, 'ok'\n"
    )
    (folder / "block.py").write_text(code)
    document = {"name": name, "entry": "block:Block", **(manifest or {})}
    (folder / "manifest.json").write_text(json.dumps(document))
    return folder


def policy_package(root: Path, name: str, body: str) -> Path:
    """A policy package folder whose eval runs `body` (parameters, input_data, context)."""
    folder = root / f"policy-{name}"
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "class AIOSv1PolicyRule:\n"
        "    def __init__(self, rule_id, settings, parameters):\n"
        "        self.settings = settings\n\n"
        "    def eval(self, parameters, input_data, context):\n"
        + textwrap.indent(textwrap.dedent(body).strip(), " " * 8)
        + "\n\n    def management(self, action, data):\n"
        "        return None\n"
    )
    (folder / "function.py").write_text(code)
    (folder / "manifest.json").write_text(json.dumps({"name": name}))
    return folder


def vdag(
    name: str,
    nodes: list[dict[str, Any]],
    connections: list[dict[str, Any]],
    inputs: list[Any],
    outputs: list[Any],
    version: str = "1",
    controller: dict[str, Any] | None = None,
) -> dict[str, Any]:
    return {
        "vdagName": name,
        "vdagVersion": version,
        "controller": controller or {},
        "nodes": nodes,
        "graph": {"input": inputs, "output": outputs, "connections": connections},
    }


def node(label: str, block_id: str, **extra: Any) -> dict[str, Any]:
    return {"nodeLabel": label, "nodeType": "block", "manualBlockId": block_id, **extra}


def sub(label: str, uri: str) -> dict[str, Any]:
    return {"nodeLabel": label, "nodeType": "vdag", "vdagURI": uri}


def edge(a: str, b: str, **names: list[str]) -> dict[str, Any]:
    return {"from": a, "to": b, **names}


def rule(uri: str, digest: str | None = None, **params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"policyRuleURI": uri, "parameters": params}
    if digest:
        out["policyRuleDigest"] = digest
    return out


async def sandbox_or_skip() -> None:
    """Skip (printing why) where the sandbox cannot start a worker on this machine."""
    from daemon.sandbox import SandboxConfig, SandboxError, SandboxPool

    try:
        async with SandboxPool(SandboxConfig(spare_workers=0)) as pool:
            if not pool.isolated:
                reason = f"no sandbox isolation layer is on here: {pool.layers}"
                print(reason)
                pytest.skip(reason)
    except SandboxError as exc:
        print(f"the sandbox cannot run here: {exc}")
        pytest.skip(f"the sandbox cannot run here: {exc}")
