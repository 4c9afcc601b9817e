"""Real daemons: a SIGKILLed node of a Devnet leaves the others' `nodes_find` within 10 s,
though its record is valid for 90 s (it stayed listed for ~80 s before p2p.liveness)."""

from __future__ import annotations

import time

import pytest

from daemon.devnet import Devnet, wait_for

pytestmark = pytest.mark.procs


def test_sigkilled_daemon_leaves_nodes_find_within_10_s(tmp_path, fast_config):
    config = tmp_path / "node.toml"
    text = fast_config.read_text()
    config.write_text(
        text.replace("publish_interval_s = 1.0", "publish_interval_s = 30.0").replace(
            "record_validity_s = 4.0", "record_validity_s = 90.0"
        )
    )
    with Devnet(3, root=tmp_path / "net", config=config) as net:
        net.wait_all_found(60)
        time.sleep(3)  # a node up for seconds (liveness rounds see it open)
        victim, others = net.daemons[2], net.daemons[:2]

        def listed_anywhere() -> bool:
            return any(
                victim.peer_id in {r["peer_id"] for r in d.call("nodes_find", {})} for d in others
            )

        assert listed_anywhere()
        victim.kill()
        killed = time.monotonic()
        wait_for(lambda: not listed_anywhere(), 10, "the killed daemon to leave nodes_find")
        took = time.monotonic() - killed
        print(f"SIGKILLed daemon gone from every nodes_find after {took:.2f} s")
        assert took <= 10
