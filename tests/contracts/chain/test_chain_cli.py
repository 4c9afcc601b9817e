"""`gridmesh chain ...` through the real CLI: serve in a process, deploy end to end, info."""

from __future__ import annotations

import signal
import subprocess
import sys

from eth_account import Account

from tests.contracts.chain.rpc_helpers import rpc

GM = [sys.executable, "-m", "daemon.cli.main"]


def _default_sigint() -> None:
    """In the child: Ctrl-C handled as a terminal would. A test suite started in the
    background of a non-interactive shell (`pytest &`) inherits SIGINT ignored, and Python
    then installs no KeyboardInterrupt handler, so the SIGINT below would do nothing."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_serve_prints_its_accounts_serves_and_stops_on_ctrl_c() -> None:
    proc = subprocess.Popen(
        [*GM, "chain", "serve", "--port", "0", "--accounts", "2"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
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


def _cli(*args: str, env: dict[str, str] | None = None):
    from typer.testing import CliRunner

    from daemon.cli.main import app

    return CliRunner().invoke(app, list(args), env=env)


def _one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridmesh: "), result.output
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_deploy_end_to_end_records_and_refuses_what_it_should(tmp_path) -> None:
    import json

    from contracts.chain.devchain import serve_in_thread
    from contracts.chain.records import read_record, record_path
    from tests.contracts.chain.rpc_helpers import rpc

    home = str(tmp_path / "home")
    with serve_in_thread(port=0, accounts=2) as chain:
        flags = ["--network", "devnet", "--rpc-url", chain.url, "--home", home]
        result = _cli("chain", "deploy", *flags, "--json")
        assert result.exit_code == 0, result.output
        printed = json.loads(result.stdout)
        record = read_record(tmp_path / "home", "devnet")
        assert record is not None and record.chain_id == 131277322940537 == printed["chainId"]
        assert record.addresses == printed["addresses"]
        assert sorted(record.addresses) == [
            "JobEscrow",
            "ProviderRegistry",
            "ReputationRegistry",
            "TestUSD",
        ]
        assert record.block == int(rpc(chain.url, "eth_blockNumber"), 16)
        assert record.deployer == chain.accounts[0].address
        for address in record.addresses.values():
            assert rpc(chain.url, "eth_getCode", [address, "latest"]) != "0x"
        # the contracts are alive there: a second deploy is refused, --force deploys anew
        _one_line_error(_cli("chain", "deploy", *flags), "already deployed", "--force")
        assert _cli("chain", "deploy", *flags, "--force").exit_code == 0
        again = read_record(tmp_path / "home", "devnet")
        assert again is not None and again.addresses != record.addresses
        # a record made on another chain id: refused, saying both ids and how to redeploy
        path = record_path(tmp_path / "home", "devnet")
        data = json.loads(path.read_text())
        path.write_text(json.dumps({**data, "chainId": 31337}))
        _one_line_error(
            _cli("chain", "deploy", *flags), "chain id 31337", "131277322940537", "--force"
        )
        assert json.loads(path.read_text())["chainId"] == 31337  # left as it was
        assert _cli("chain", "deploy", *flags, "--force").exit_code == 0
        assert json.loads(path.read_text())["chainId"] == 131277322940537
        # info: the record and what the endpoint says now
        result = _cli("chain", "info", *flags)
        assert result.exit_code == 0, result.output
        assert f"chain id 131277322940537, block {int(rpc(chain.url, 'eth_blockNumber'), 16)}" in (
            result.stdout
        )
        assert json.loads(path.read_text())["addresses"]["JobEscrow"] in result.stdout
        info = json.loads(_cli("chain", "info", *flags, "--json").stdout)
        assert info["endpoint"]["contractsPresent"] is True and info["record"]["block"] > 0
        # the wrong network for this endpoint
        _one_line_error(
            _cli("chain", "deploy", "--network", "anvil", "--rpc-url", chain.url, "--home", home),
            "is chain id 131277322940537, but anvil is chain id 31337",
        )


def test_deploy_mistakes_are_one_clear_line(tmp_path) -> None:
    import socket

    home = str(tmp_path)
    _one_line_error(
        _cli("chain", "deploy", "--network", "base-sepolia", "--home", home),
        "base-sepolia has no default RPC endpoint",
        "--rpc-url",
    )
    _one_line_error(
        _cli("chain", "deploy", "--network", "mainnet", "--home", home),
        "unknown chain network 'mainnet'",
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    _one_line_error(
        _cli("chain", "deploy", "--rpc-url", f"http://127.0.0.1:{port}", "--home", home),
        "cannot reach the chain",
        "gridmesh chain serve",
    )
    # the network and URL come from GRIDMESH_CHAIN__* or [chain] in config.toml without flags
    _one_line_error(
        _cli("chain", "info", "--home", home, env={"GRIDMESH_CHAIN__NETWORK": "base-sepolia"}),
        "base-sepolia has no default RPC endpoint",
    )
    (tmp_path / "config.toml").write_text('[chain]\nnetwork = "base-sepolia"\nrpc_url = ""\n')
    _one_line_error(_cli("chain", "info", "--home", home), "rpc_url")
    (tmp_path / "config.toml").write_text(
        f'[chain]\nnetwork = "anvil"\nrpc_url = "http://127.0.0.1:{port}"\n'
    )
    result = _cli("chain", "info", "--home", home)
    assert result.exit_code == 0, result.output
    assert f"http://127.0.0.1:{port}: not answering" in result.stdout
    assert "nothing recorded" in result.stdout and "anvil.json" in result.stdout
