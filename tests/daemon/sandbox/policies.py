"""Policy packages written by tests: `make_policy(dir, body)` writes function.py with an
AIOSv1PolicyRule whose eval runs `body` (indented into the method) and a manifest."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

ECHO = "return {'echo': input_data, 'rule': self.rule_id, 'settings': self.settings}"


def make_policy(
    folder: Path,
    body: str = ECHO,
    *,
    name: str = "test-policy",
    requirements: tuple[str, ...] = (),
    extra: dict[str, str] | None = None,
    manifest: dict[str, Any] | None = None,
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    code = (
        "class AIOSv1PolicyRule:\n"
        "    def __init__(self, rule_id, settings, parameters):\n"
        "        self.rule_id, self.settings, self.parameters = rule_id, settings, parameters\n"
        "        self.count = 0\n\n"
        "    def eval(self, parameters, input_data, context):\n"
        + textwrap.indent(textwrap.dedent(body).strip(), " " * 8)
        + "\n\n    def management(self, action, data):\n"
        "        self.count += 1\n"
        "        return {'action': action, 'data': data, 'count': self.count}\n"
    )
    (folder / "function.py").write_text(code)
    document = {"name": name, "requirements": list(requirements), **(manifest or {})}
    (folder / "manifest.json").write_text(json.dumps(document))
    for path, text in (extra or {}).items():
        (folder / path).parent.mkdir(parents=True, exist_ok=True)
        (folder / path).write_text(text)
    return folder
