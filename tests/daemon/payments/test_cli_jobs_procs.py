"""The paid-work CLI against real `gridmesh daemon` processes over HTTP JSON-RPC and a dev chain:
a daemon whose home holds a deployment stakes, deposits, lists, shows and refunds a job with
its payout key; a daemon without one answers every paid command "no chain configured"."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from daemon.cli.main import app
from daemon.devnet import DaemonProcess
from daemon.payments import devnet_chain as dc

pytestmark = pytest.mark.procs


@pytest.fixture
def chain() -> Iterator[dc.DevnetChain]:
    with dc.DevnetChain() as running:
        yield running


def _cli(home: Path, *args: str) -> Result:
    return CliRunner().invoke(app, [*args, "--home", str(home)])


def _ok(result: Result) -> str:
    assert result.exit_code == 0, result.output
    return result.output


def test_a_daemon_stakes_deposits_and_refunds_from_the_cli(
    tmp_path: Path, chain: dc.DevnetChain
) -> None:
    home, bare_home = tmp_path / "node", tmp_path / "bare"
    party = chain.prepare_home(home, "node")
    env = {"GRIDMESH_CHAIN__RPC_URL": chain.url}
    node = DaemonProcess(home, env=env).start()
    bare = DaemonProcess(bare_home, env=env).start()
    try:
        _ok(_cli(home, "fund", "--tusd", "300tUSD", "--eth", "1", "--rpc-url", chain.url))
        wallet = json.loads(_ok(_cli(home, "wallet", "--json")))
        assert wallet["address"] == party.address and wallet["balance"] == 300 * dc.TUSD
        assert "stake now 100 tUSD: active" in _ok(_cli(home, "stake", "100tUSD"))
        out = _ok(
            _cli(
                home,
                "job",
                "create",
                "--deposit",
                "7tUSD",
                "--deadline",
                "60",
                "--max-price",
                "5",
                "--name",
                "cli",
            )
        )
        job = out.splitlines()[0]
        listed = json.loads(_ok(_cli(home, "job", "list", "--json")))
        assert [(j["job_id"], j["deposit"], j["state"]) for j in listed] == [
            (job, 7 * dc.TUSD, "deposited")
        ]
        status = json.loads(_ok(_cli(home, "job", "status", job, "--json")))
        assert status["chain"]["payer"] == party.address
        assert status["chain"]["deposit"] == 7 * dc.TUSD and not status["chain"]["refunded"]
        early = _cli(home, "job", "refund", job)
        assert early.exit_code == 1 and "DeadlineNotReached" in early.output
        assert "Traceback" not in early.output
        chain.advance(61)
        assert "refunded 7 tUSD" in _ok(_cli(home, "job", "refund", job))
        wallet = json.loads(_ok(_cli(home, "earnings", "--json")))
        assert wallet["balance"] == 200 * dc.TUSD and wallet["stake"]["active"]
        for args in (("wallet",), ("stake", "1tUSD"), ("job", "refund", job)):
            refused = _cli(bare_home, *args)
            assert refused.exit_code == 1 and "no chain configured" in refused.output, args
    finally:
        node.stop()
        bare.stop()
