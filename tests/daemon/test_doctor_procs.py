"""`gridmesh doctor` as a command against real daemon processes over libp2p on loopback:
the doctor protocol and the DHT round trip work through the real host, the report is JSON,
and the exit status follows the lines (0 with only warnings; 1 once the bootstrap peer is
gone)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from daemon.devnet import DEVNET_CONFIG, Devnet

pytestmark = pytest.mark.procs


def _doctor(home: Path) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [sys.executable, "-m", "daemon.cli.main", "doctor", "--home", str(home)]
        + ["--config", str(DEVNET_CONFIG), "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    report = json.loads(done.stdout)
    return done.returncode, report


def test_doctor_command_against_two_daemon_processes(tmp_path: Path) -> None:
    with Devnet(2, root=tmp_path) as net:
        net.wait_all_found(30)
        first, second = net.daemons
        code, report = _doctor(second.home)
        lines = {c["name"]: c for c in report["checks"]}
        statuses = {name: c["status"] for name, c in lines.items()}
        logs = first.log_tail(10) + second.log_tail(10)
        assert statuses == {
            "keys": "pass",  # rpc.cookie included: a daemon runs
            "config": "pass",
            "listen": "warn",  # loopback only
            "reachability": "warn",  # unknown until AutoNAT
            "bootstrap": "pass",
            "clock": "pass",
            "dht": "pass",
            "chain": "warn",  # no deployment recorded: unpaid work
            "payout": "warn",
            "contracts": "warn",
            "gpus": lines["gpus"]["status"],  # whatever this machine has
        }, (report, logs)
        assert "rpc.cookie" in lines["keys"]["detail"]
        assert "median of 1 peers" in lines["clock"]["detail"]
        assert "read back by 1 of 1 peers" in lines["dht"]["detail"]
        assert (code == 0) == report["ok"] == (lines["gpus"]["status"] != "fail")

        first.stop()
        code, report = _doctor(second.home)
        lines = {c["name"]: c for c in report["checks"]}
        assert code == 1 and report["ok"] is False
        assert lines["bootstrap"]["status"] == "fail", lines["bootstrap"]
        assert first.peer_id in lines["bootstrap"]["detail"]
