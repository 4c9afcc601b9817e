"""configs/gridmesh.service, the systemd unit (README "Running as a service"): its sections,
the hardening keys, a state directory that is the daemon's --home and the only writable
path, restart on failure, and an ExecStart that `gridmesh daemon` accepts as it is (parsed by
the real command line, not started) with JSON log lines."""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer

from daemon.cli.main import app

UNIT = Path(__file__).resolve().parents[2] / "configs" / "gridmesh.service"


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values, in order]}} (keys may repeat)."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        key, sep, value = line.partition("=")
        assert sep and current is not None, f"line {number} is not KEY=VALUE in a section: {raw}"
        assert key.strip() == key and key.isascii() and key.isidentifier(), f"line {number}"
        current.setdefault(key, []).append(value)
    return sections


def test_the_unit_has_its_sections_and_hardening() -> None:
    unit = parse_unit(UNIT.read_text())
    assert list(unit) == ["Unit", "Service", "Install"]
    service = {key: values[-1] for key, values in unit["Service"].items()}
    assert service["User"] not in ("", "root", "0") and service["Group"] == service["User"]
    expected = {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
        "RestrictSUIDSGID": "true",
        "ProtectKernelModules": "true",
        "ProtectKernelTunables": "true",
        "ProtectControlGroups": "true",
        "LockPersonality": "true",
        "UMask": "0077",
        "CapabilityBoundingSet": "",
    }
    assert {key: service.get(key) for key in expected} == expected
    # GPUs and torch's run-time kernels need these left alone
    for key in ("PrivateDevices", "MemoryDenyWriteExecute", "SystemCallFilter"):
        assert key not in service, key
    assert "network-online.target" in unit["Unit"]["After"][-1]
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


def test_execstart_runs_gridmesh_daemon_in_the_state_directory() -> None:
    unit = parse_unit(UNIT.read_text())
    service = {key: values[-1] for key, values in unit["Service"].items()}
    argv = shlex.split(service["ExecStart"])
    assert argv[0].startswith("/") and Path(argv[0]).name == "gridmesh"
    assert argv[1] == "daemon"
    # the real `gridmesh daemon` command takes these arguments as they are
    command = typer.main.get_command(app)
    daemon = command.commands["daemon"]  # type: ignore[attr-defined]
    with daemon.make_context("daemon", argv[2:]) as ctx:
        params = ctx.params
    state = f"/var/lib/{service['StateDirectory']}"
    assert str(params["home"]) == state == service["WorkingDirectory"]
    assert params["log_format"] == "json"
    assert service["ReadWritePaths"] == state  # the one writable place under ProtectSystem
    environment = dict(v.split("=", 1) for v in unit["Service"]["Environment"])
    assert environment["GRIDMESH_HOME"] == state and environment["HOME"] == state
    assert service["StateDirectoryMode"] == "0700"


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    """systemd's own check (where systemd-analyze exists): no unknown key, no key in the
    wrong section, no bad value; ExecStart pointed at this environment's gridmesh."""
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    gridmesh = Path(sys.executable).parent / "gridmesh"
    if not gridmesh.exists():
        pytest.skip(f"no gridmesh script beside {sys.executable}")
    text = UNIT.read_text().replace("/usr/local/bin/gridmesh", str(gridmesh))
    unit = tmp_path / "gridmesh.service"
    unit.write_text(text)
    done = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
