"""node_info and node_peers show reachability, observed and relayed addresses, and whether each
connection is direct or relayed (p2p.reach). On the in-memory network nothing is known of NAT:
`unknown`, no addresses, no kind. The values on real hosts behind NAT are checked by
tests/daemon/test_nat_procs.py; the CLI's rendering of them here."""

from pathlib import Path
from typing import Any

from daemon.cli import render
from tests.daemon.harness import memory_cluster


async def test_node_info_and_peers_carry_the_reachability_fields(
    tmp_path: Path, autojump_clock: Any
) -> None:
    async with memory_cluster(tmp_path, 2) as net:
        first, second = net.daemons
        info = await first.call("node_info")
        assert info["reachability"] == "unknown"
        assert info["observed_addrs"] == [] and info["relayed_addrs"] == []
        assert info["connections"] == {second.peer_id: None}
        peers = await first.call("node_peers")
        assert [(p["peer_id"], p["connection"]) for p in peers] == [(second.peer_id, None)]


def test_status_renders_reachability_and_each_connection(capsys: Any) -> None:
    render.node_info(
        {
            "peer_id": "12D3KooWSelf",
            "listen_addrs": [],
            "reachability": "private",
            "observed_addrs": ["/ip4/198.51.100.2/tcp/40000"],
            "connections": {"12D3KooWRelayPeer": "direct", "12D3KooWOtherPeer": "relayed"},
        }
    )
    out = capsys.readouterr().out
    assert "reachability" in out and "private" in out
    assert "/ip4/198.51.100.2/tcp/40000" in out
    assert "direct" in out and "relayed" in out
    render.peers([{"peer_id": "12D3KooWOtherPeer", "connected": True, "connection": "relayed"}])
    assert "yes (relayed)" in capsys.readouterr().out
