"""The daemon's log lines: text for people (the default), or JSON lines for log collectors
(`gridmesh daemon --log-format json`, e.g. under systemd with journald or Loki).

A JSON line is one object: `ts` (ISO 8601, UTC, milliseconds), `level`, `logger`,
`message` (the formatted message), then every extra field the call passed
(`log.info("...", extra={"peer": peer_id})`), and `exc` / `stack` when there is a traceback.
A value JSON cannot carry is written as its `str()`; a newline in a message stays inside its
line (escaped), so one record is always one line.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import IO, Any

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

# attributes every LogRecord has: what is not among them was passed with `extra=`
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "taskName",
}
_FIRST = ("ts", "level", "logger", "message")


class JsonFormatter(logging.Formatter):
    """One JSON object per record (see the module docstring)."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC)
            .isoformat(timespec="milliseconds")
            .replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and not key.startswith("_"):
                # an extra named like one of ours keeps its value beside them
                doc[f"extra_{key}" if key in _FIRST else key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            doc["exc"] = record.exc_text
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of `log_format` ("text" or "json"); ValueError for another name."""
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r} (use {' or '.join(FORMATS)})")


def setup(level: int, log_format: str = "text", stream: IO[str] | None = None) -> None:
    """Send every log record at `level` and above to `stream` (stderr) in `log_format`,
    replacing handlers set before."""
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(formatter(log_format))
    logging.basicConfig(level=level, handlers=[handler], force=True)
