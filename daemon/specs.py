"""Registry documents as people write them: YAML or JSON files of {kind, key, value}."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

SELF = "$SELF"
# where a document may leave out `key`: the field of its value that names it
KEY_FIELDS = {"blocks": "blockId", "vdags": "vdagName", "components": "name", "policies": "name"}


class SpecError(ValueError):
    pass


def load_documents(path: str) -> list[dict[str, Any]]:
    """Documents from a YAML (multi-document, `---`) or JSON file, or '-' for stdin.

    A document is {kind, key, value}; a list of them counts as many documents."""
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text()
    except OSError as exc:
        raise SpecError(f"cannot read {path}: {exc.strerror}") from None
    try:
        loaded = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise SpecError(f"{path} is not valid YAML or JSON: {exc}") from None
    docs: list[Any] = []
    for item in loaded:
        docs.extend(item if isinstance(item, list) else [item])
    out = []
    for index, doc in enumerate(docs, 1):
        if not isinstance(doc, dict) or "kind" not in doc or not isinstance(doc.get("value"), dict):
            raise SpecError(f"document {index} of {path} needs `kind` and a `value` map")
        key = doc.get("key") or doc["value"].get(KEY_FIELDS.get(doc["kind"], ""))
        if not isinstance(key, str):
            raise SpecError(f"document {index} of {path} has no `key`")
        out.append({"kind": doc["kind"], "key": key, "value": doc["value"]})
    if not out:
        raise SpecError(f"{path} holds no documents")
    return out


def substitute_self(value: Any, peer_id: str) -> Any:
    """Replace every string "$SELF" in a document with the applying node's peer id."""
    if value == SELF:
        return peer_id
    if isinstance(value, dict):
        return {k: substitute_self(v, peer_id) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_self(v, peer_id) for v in value]
    return value
