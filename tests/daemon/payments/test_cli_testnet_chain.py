"""The chain commands a testnet newcomer runs, on the embedded dev chain: `gridmesh chain use
--escrow` records a deployment someone else made, and `gridmesh fund` on a chain that is not a
development chain mints tUSD with the node's own key and never hands out ETH. (The whole
sequence on anvil as Base Sepolia: tests/daemon/test_testnet_rehearsal_procs.py.)"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from contracts.chain.records import DeploymentRecord, read_record, write_record
from daemon.cli.main import app
from daemon.payments import devnet_chain as dc
from p2p import identity


@pytest.fixture(scope="module")
def chain() -> Iterator[dc.DevnetChain]:
    with dc.DevnetChain(accounts=2) as running:
        yield running


def _cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args), env={"GRIDMESH_CHAIN_KEY": ""})


def _refused(result: Any, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridmesh: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_chain_use_records_a_published_deployment_from_its_escrow(
    tmp_path: Path, chain: dc.DevnetChain
) -> None:
    home = tmp_path / "home"
    flags = ["--network", "devnet", "--rpc-url", chain.url, "--home", str(home)]
    escrow = chain.record.addresses["JobEscrow"]
    result = _cli("chain", "use", "--escrow", escrow.lower(), *flags, "--json")
    assert result.exit_code == 0, result.output
    record = read_record(home, "devnet")
    assert record is not None and record.addresses == chain.record.addresses
    assert record.chain_id == chain.record.chain_id == json.loads(result.stdout)["chainId"]
    assert record.block >= chain.record.block
    assert _cli("chain", "use", "--escrow", escrow, *flags).exit_code == 0  # the same: kept
    # another deployment's record is replaced only with --force
    other = dict(chain.record.addresses, JobEscrow="0x" + "ab" * 20)
    write_record(home, DeploymentRecord("devnet", chain.record.chain_id, other, 1))
    _refused(_cli("chain", "use", "--escrow", escrow, *flags), "another deployment", "--force")
    assert read_record(home, "devnet").addresses == other  # type: ignore[union-attr]
    assert _cli("chain", "use", "--escrow", escrow, *flags, "--force").exit_code == 0
    assert read_record(home, "devnet").addresses == chain.record.addresses  # type: ignore[union-attr]


def test_chain_use_refuses_what_is_not_a_gridmesh_escrow(
    tmp_path: Path, chain: dc.DevnetChain
) -> None:
    flags = ["--network", "devnet", "--rpc-url", chain.url, "--home", str(tmp_path)]
    token = chain.record.addresses["TestUSD"]
    _refused(
        _cli("chain", "use", "--escrow", token, *flags), f"{token} is not a gridmesh JobEscrow"
    )
    _refused(_cli("chain", "use", "--escrow", "0x12", *flags), "is not an address")
    nothing = "0x" + "00" * 19 + "07"
    _refused(_cli("chain", "use", "--escrow", nothing, *flags), f"no contract at {nothing}")
    # the endpoint must be the named network's chain: Base Sepolia is chain id 84532
    _refused(
        _cli(
            "chain", "use", "--escrow", chain.record.addresses["JobEscrow"],
            "--network", "base-sepolia", "--rpc-url", chain.url, "--home", str(tmp_path),
        ),
        "is chain id 131277322940537, but base-sepolia is chain id 84532",
    )  # fmt: skip
    assert not (tmp_path / "chain").exists()  # nothing recorded by a refusal


def test_fund_on_a_public_chain_mints_with_the_node_key_and_hands_out_no_eth(
    tmp_path: Path, chain: dc.DevnetChain
) -> None:
    """base-sepolia's record here names the dev chain (fund checks the record's chain id, not
    the network's): what differs is that nobody's key but the node's is used."""
    home = tmp_path / "home"
    ident, _ = identity.init_identity(home)
    record = DeploymentRecord(
        "base-sepolia", chain.record.chain_id, chain.record.addresses, chain.record.block
    )
    write_record(home, record)
    flags = ["--network", "base-sepolia", "--rpc-url", chain.url, "--home", str(home)]
    _refused(_cli("fund", "--eth", "1", *flags), "not a development chain", "faucet")
    _refused(_cli("fund", "--tusd", "5tUSD", *flags), ident.payout_address, "no ETH", "faucet")
    me = dc.Party("me", ident.payout_address)
    before = chain.balances([me])["me"]
    chain.run(chain.dev_key, lambda escrow: escrow.send_gas(me.address, 10**18))  # faucet
    result = _cli("fund", "--tusd", "5tUSD", *flags)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"{ident.payout_address}: {before // dc.TUSD + 5} tUSD")
    assert chain.balances([me])["me"] == before + 5 * dc.TUSD
    other = dc.Party("other", "0x" + "cd" * 20)
    assert _cli("fund", "--tusd", "2tUSD", "--to", other.address, *flags).exit_code == 0
    assert chain.balances([other])["other"] == 2 * dc.TUSD  # minted by the node, for another
    # a record of another chain than the endpoint's is refused before anything is sent
    write_record(home, DeploymentRecord("base-sepolia", 84532, chain.record.addresses, 1))
    _refused(_cli("fund", "--tusd", "1tUSD", *flags), "chain id 84532")
