"""`gridmesh chain ...` through the real CLI: serve in a process, deploy end to end, info."""

from __future__ import annotations

import signal
import subprocess
import sys

from eth_account import Account

from tests.contracts.chain.conftest import rpc

GM = [sys.executable, "-m", "daemon.cli.main"]


def test_serve_prints_its_accounts_serves_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*GM, "chain", "serve", "--port", "0", "--accounts", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        assert "listening on http://127.0.0.1:" in first, first + proc.stderr.read()
        url = first.split("listening on ")[1].strip()
        lines = [proc.stdout.readline() for _ in range(4)]
        keys = [line.split("private key ")[1].strip() for line in lines if "private key" in line]
        assert len(keys) == 2
        accounts = rpc(url, "eth_accounts")
        assert accounts == [Account.from_key(key).address for key in keys]
        assert rpc(url, "eth_getBalance", [accounts[1], "latest"]) == hex(10**24)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "stopped" in err and "Traceback" not in err


def test_serve_on_a_taken_port_is_one_clear_line() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [*GM, "chain", "serve", "--port", str(port)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 1
    assert result.stderr.startswith(f"gridmesh: cannot listen on 127.0.0.1:{port}")
    assert "Traceback" not in result.stderr
