"""Named networks at the daemon (issue 19): the profiles in configs/, `gridmesh init --network
NAME`, /dns4 bootstrap addresses, and whole daemons of two networks on one in-memory network
seeing none of each other's records, registry entries or nodes."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trio
from typer.testing import CliRunner

from contracts.chain.networks import ChainError, endpoint
from contracts.chain.networks import get as chain_network
from daemon import config as configuration
from daemon.api.client import RPCCallError
from daemon.cli.main import app
from daemon.metrics import Metrics
from daemon.settings import Config, ConfigError, load, parse
from p2p.identity import NodeIdentity
from p2p.network import DHTValidator
from p2p.testing.memnet import MemoryNode
from tests.daemon.harness import MemoryCluster, inline_threads

runner = CliRunner()
PEER = "12D3KooWRAhUjze1webMveCs2Y5nAhVrJE1uFqEbA9jxPxtPM2sA"
COMPONENT = {"name": "llama", "version": "1"}


# -- profiles and init ----------------------------------------------------------------------


def test_the_profiles_are_devnet_and_testnet_and_each_loads():
    assert configuration.network_profiles() == ["devnet", "testnet"]
    for name in configuration.network_profiles():
        config = parse(tomllib.loads(configuration.profile_text(name)), f"{name}.toml")
        assert config.network == name and config.network_id == f"gridmesh-{name}"
    testnet = parse(tomllib.loads(configuration.profile_text("testnet")))
    assert testnet.chain.network == "base-sepolia"
    assert chain_network(testnet.chain.network).chain_id == 84532
    assert testnet.chain.rpc_url == ""  # the user's own: refused clearly until set
    with pytest.raises(ChainError, match="no default RPC endpoint.*rpc_url"):
        endpoint(testnet.chain.network, testnet.chain.rpc_url or None)


def test_the_network_id_is_derived_from_the_name_or_set():
    assert Config().network == "local" and Config().network_id == "gridmesh-local"
    assert parse({"network": "testnet"}).network_id == "gridmesh-testnet"
    assert parse({"network": "testnet", "network_id": "mine"}).network_id == "mine"
    with pytest.raises(ConfigError, match="x.toml: network 'Test Net' is not a network name"):
        parse({"network": "Test Net"}, "x.toml")
    with pytest.raises(ConfigError, match="x.toml: network_id 'a/b' is not a network id"):
        parse({"network_id": "a/b"}, "x.toml")


def _init(home: Path, *args: str) -> Any:
    return runner.invoke(app, ["init", "--home", str(home), *args])


def test_init_network_writes_the_profile_as_a_config_that_loads(tmp_path):
    result = _init(tmp_path, "--network", "testnet")
    assert result.exit_code == 0, result.output
    assert "network:        testnet (id gridmesh-testnet)" in result.output
    assert "base-sepolia needs an RPC URL" in result.output
    assert "contracts:      none recorded for base-sepolia" in result.output  # works unpaid
    config = load(tmp_path / "config.toml")
    assert (config.network, config.network_id) == ("testnet", "gridmesh-testnet")
    assert config.chain.network == "base-sepolia" and config.p2p.listen == (
        "/ip4/0.0.0.0/tcp/4001",
    )
    assert (tmp_path / "config.toml").read_text() == configuration.profile_text("testnet")


def test_init_network_unknown_is_refused_listing_the_known_ones(tmp_path):
    result = _init(tmp_path, "--network", "mainnet")
    assert result.exit_code == 1
    assert "unknown network 'mainnet' (known: devnet, testnet)" in result.output
    assert not (tmp_path / "config.toml").exists()


def test_init_network_replaces_a_config_only_with_force(tmp_path):
    assert _init(tmp_path).exit_code == 0  # the single-node template
    before = (tmp_path / "config.toml").read_text()
    refused = _init(tmp_path, "--network", "devnet")
    assert refused.exit_code == 1 and "pass --force" in refused.output
    assert (tmp_path / "config.toml").read_text() == before
    assert _init(tmp_path, "--network", "devnet", "--force").exit_code == 0
    assert load(tmp_path / "config.toml").network_id == "gridmesh-devnet"
    assert (tmp_path / "config.toml.bak").read_text() == before


def test_init_network_writes_the_rpc_url_given_and_checks_it(tmp_path):
    url = "https://base-sepolia.example.org/v2/KEY"
    result = _init(tmp_path, "--network", "testnet", "--rpc-url", url)
    assert result.exit_code == 0, result.output
    config = load(tmp_path / "config.toml")
    assert config.chain.rpc_url == url
    assert endpoint(config.chain.network, config.chain.rpc_url)[1] == url
    bad = _init(tmp_path / "other", "--network", "testnet", "--rpc-url", "ftp://x")
    assert bad.exit_code == 1 and "--rpc-url 'ftp://x' is not an RPC URL" in bad.output
    assert not (tmp_path / "other").exists()  # refused before anything was written
    alone = _init(tmp_path / "other", "--rpc-url", url)
    assert alone.exit_code == 1 and "--rpc-url needs --network NAME" in alone.output


# -- /dns4 bootstrap addresses ----------------------------------------------------------------


@pytest.mark.parametrize(
    "addr",
    [
        f"/dns4/boot0.testnet.example.org/tcp/4001/p2p/{PEER}",
        f"/dns6/boot1.example.org./tcp/4001/p2p/{PEER}",
        f"/dns/localhost/tcp/4001/p2p/{PEER}",
    ],
)
def test_a_dns_bootstrap_address_is_accepted_as_written(addr):
    config = parse({"network": "testnet", "p2p": {"bootstrap": [addr]}})
    assert config.p2p.bootstrap == (addr,)  # resolved when dialled, not here


@pytest.mark.parametrize(
    ("addr", "why"),
    [
        (f"/dns4/bad_name!/tcp/4001/p2p/{PEER}", "'bad_name!' is not a DNS name"),
        (f"/dns4/-boot.example.org/tcp/4001/p2p/{PEER}", "is not a DNS name"),
        (f"/dns4/a..b/tcp/4001/p2p/{PEER}", "'a..b' is not a DNS name"),
        ("/dns4/boot.example.org/tcp/4001", "it must end with /p2p/<peer id>"),
        (f"/dns4/boot.example.org/tcp/70000/p2p/{PEER}", "70000 is not a TCP port"),
        ("/dns4/boot.example.org/tcp/4001/p2p/nope", "'nope' is not a peer id"),
    ],
)
def test_a_malformed_bootstrap_address_is_refused_naming_the_field(tmp_path, addr, why):
    path = tmp_path / "config.toml"
    path.write_text(f"network = 'testnet'\n[p2p]\nbootstrap = [{json.dumps(addr)}]\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert str(err.value).startswith(f"{path}: p2p.bootstrap[0] ")
    assert why in str(err.value)


# -- whole daemons of two networks ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


class TwoNetworks(MemoryCluster):
    """Whole daemons on one hub, each on the network `self.network` names at its launch."""

    network = "devnet"

    def config(self, bootstrap: list[str]) -> Config:
        raw = json.loads(json.dumps(self.settings))
        raw.pop("network_id", None)
        raw["network"] = self.network
        raw.setdefault("p2p", {})["bootstrap"] = bootstrap
        return parse(raw)

    def _network(
        self, ident: NodeIdentity, config: Config, validator: DHTValidator, metrics: Metrics
    ) -> MemoryNode:
        return self.hub.add_node(ident.peer_id, validator, network_id=config.network_id)


async def _keys(daemon, kind: str = "components") -> set[str]:
    page = await daemon.call("registry_list", {"kind": kind, "limit": 1000})
    return {item["key"] for item in page["items"]}


async def _found(daemon) -> set[str]:
    return {r["peer_id"] for r in await daemon.call("nodes_find", {})}


async def test_daemons_of_two_networks_see_none_of_each_others_records(autojump_clock, tmp_path):
    async with trio.open_nursery() as nursery:
        net = TwoNetworks(tmp_path, nursery)
        dev0, dev1 = await net.start(2)
        net.network = "testnet"
        # the first testnet daemon is told to join through a devnet one: refused, with why
        test0 = await net.add(tmp_path / "test0", [dev1.addr])
        test1 = await net.add(tmp_path / "test1", [test0.addr])
        devnet, testnet = {dev0.peer_id, dev1.peer_id}, {test0.peer_id, test1.peer_id}
        assert (await test0.call("node_info"))["network_id"] == "gridmesh-testnet"

        async def each_finds_its_own() -> bool:
            return all([await _found(d) == devnet for d in (dev0, dev1)]) and all(
                [await _found(t) == testnet for t in (test0, test1)]
            )

        await net.wait_for(each_finds_its_own, 60, "each network to find its own nodes")
        with pytest.raises(
            RPCCallError, match="is on network 'gridmesh-devnet', not 'gridmesh-testnet'"
        ):
            await test0.call("node_connect", {"multiaddr": dev1.addr})
        assert "gridmesh-testnet" in dev1.node.refused_peers()[test0.peer_id]
        # registry entries (components, blocks) stay in their network
        for running, key in ((dev0, "dev"), (test0, "test")):
            await running.call(
                "registry_put", {"kind": "components", "key": key, "value": COMPONENT}
            )
            block = {"blockId": key, "blockComponentURI": "detector:1"}
            await running.call("registry_put", {"kind": "blocks", "key": key, "value": block})

        async def replicated() -> bool:
            return (await _keys(dev1)) == (await _keys(dev1, "blocks")) == {"dev"} and (
                await _keys(test1)
            ) == (await _keys(test1, "blocks")) == {"test"}

        await net.wait_for(replicated, 10, "each write within its network")
        await trio.sleep(10)  # ten anti-entropy rounds later: still nothing crossed
        for kind in ("components", "blocks"):
            assert await _keys(dev0, kind) == await _keys(dev1, kind) == {"dev"}
            assert await _keys(test0, kind) == await _keys(test1, kind) == {"test"}
        assert await _found(dev0) == devnet and await _found(test1) == testnet
        for running in (dev0, dev1):
            peers = await running.call("node_peers")
            assert not {p["peer_id"] for p in peers if "refused" not in p} & testnet
        refused = [p for p in await dev1.call("node_peers") if "refused" in p]
        assert [p["peer_id"] for p in refused] == [test0.peer_id] and not refused[0]["connected"]
        assert "is on network 'gridmesh-testnet', not 'gridmesh-devnet'" in refused[0]["refused"]
        nursery.cancel_scope.cancel()


def test_gridmesh_peers_shows_a_refused_peer_and_why(capsys, monkeypatch):
    from daemon.cli import render

    monkeypatch.setattr(render.console, "width", 200)
    render.peers(
        [
            {"peer_id": "12D3KooWgood", "addrs": ["/ip4/1.2.3.4/tcp/1"], "connected": True},
            {
                "peer_id": "12D3KooWother",
                "addrs": [],
                "connected": False,
                "rtt_ms": None,
                "refused": "peer 12D3KooWother is on network 'gridmesh-testnet'",
            },
        ]
    )
    out = capsys.readouterr().out
    assert "refused: peer 12D3KooWother is on network 'gridmesh-testnet'" in out
    assert "yes" in out
