"""`gridmesh daemon --log-format text|json` (daemon.logs): a JSON line per record with ts,
level, logger, message and the extra fields; tracebacks and odd values inside the line; an
unknown format refused before anything starts; and a real daemon process whose every stderr
line, from start to SIGTERM, is one JSON object."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon import logs
from daemon.cli.main import app


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _capture(log_format: str, level: int = logging.INFO) -> io.StringIO:
    out = io.StringIO()
    logs.setup(level, log_format, out)
    return out


def test_json_lines_carry_the_fields_and_extras(restore_logging: None) -> None:
    out = _capture("json")
    log = logging.getLogger("daemon.test")
    log.info("peer %s joined\nsecond line", "p1", extra={"peer": "p1", "n": 3, "raw": b"\x00"})
    log.debug("not shown at info")
    log.warning("plain", extra={"logger": "clash", "ts": 1})
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    first = json.loads(lines[0])
    assert list(first)[:4] == ["ts", "level", "logger", "message"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"]), first
    assert first["level"] == "INFO" and first["logger"] == "daemon.test"
    assert first["message"] == "peer p1 joined\nsecond line"
    assert first["peer"] == "p1" and first["n"] == 3 and first["raw"] == "b'\\x00'"
    second = json.loads(lines[1])
    assert second["level"] == "WARNING" and second["message"] == "plain"
    assert second["logger"] == "daemon.test" and second["extra_logger"] == "clash"
    assert second["extra_ts"] == 1


def test_json_lines_hold_tracebacks(restore_logging: None) -> None:
    out = _capture("json")
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger("x").exception("failed")
    logging.getLogger("x").info("where", stack_info=True)
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["message"] == "failed" and first["level"] == "ERROR"
    assert "ValueError: boom" in first["exc"] and "Traceback" in first["exc"]
    assert "Stack (most recent call last)" in second["stack"]


def test_text_is_the_usual_line(restore_logging: None) -> None:
    out = _capture("text")
    logging.getLogger("daemon.node").info("up", extra={"peer": "p"})
    line = out.getvalue().rstrip("\n")
    assert re.fullmatch(r"\S+ \S+ INFO daemon\.node: up", line), line


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logs.formatter("xml")
    result = CliRunner().invoke(app, ["daemon", "--home", str(tmp_path), "--log-format", "xml"])
    assert result.exit_code == 1
    assert "unknown log format 'xml' (use text or json)" in result.output
    assert not (tmp_path / "daemon.json").exists()


@pytest.mark.procs
def test_a_daemon_process_logs_json_lines_until_sigterm(tmp_path: Path) -> None:
    home = tmp_path / "node"
    args = ["daemon", "--home", str(home), "--log-format", "json"]
    args += ["--listen", "/ip4/127.0.0.1/tcp/0", "--rpc-port", "0"]
    env = {**os.environ, "GRIDMESH_GRPC__ENABLED": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "daemon.cli.main", *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    lines: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if " up; rpc " in line:
                proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(lines)
    assert code == 0, text
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    assert all({"ts", "level", "logger", "message"} <= set(r) for r in records), text
    assert any(r["logger"] == "daemon.node" and " up; rpc " in r["message"] for r in records)
    assert any("SIGTERM" in r["message"] for r in records), text
