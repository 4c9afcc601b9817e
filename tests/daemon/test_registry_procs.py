"""Registries across real daemon processes: attacks from a libp2p peer, SIGKILL during writes
(sqlite), the CLI. Replication and catch-up run on whole in-memory daemons
(test_whole_daemons.py)."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from daemon.api.client import DaemonUnreachable, RPCCallError
from daemon.devnet import DaemonProcess, Devnet, wait_for

pytestmark = pytest.mark.procs

COMPONENT = {"name": "llama", "version": "1"}


def keys_on(daemon: DaemonProcess, kind: str = "components") -> set[str]:
    page = daemon.call("registry_list", {"kind": kind, "limit": 1000})
    return {item["key"] for item in page["items"]}


def test_forged_and_malformed_registry_messages_rejected_everywhere(tmp_path, fast_config):
    with Devnet(3, root=tmp_path, config=fast_config) as net:
        net.wait_all_found(30)
        owner = net.daemons[0]
        owner.call("registry_put", {"kind": "components", "key": "llama", "value": COMPONENT})
        wait_for(lambda: all("llama" in keys_on(d) for d in net.daemons), 5, "replication")
        attack = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemon.tools.hostile_peer",
                "registry",
                ",".join(d.addr for d in net.daemons[1:]),
                "proctest",
                "components",
                "llama",
            ],
            timeout=60,
            capture_output=True,
            text=True,
        )
        assert attack.returncode == 0, attack.stdout[-2000:] + attack.stderr[-3000:]

        def counted(daemon: DaemonProcess, **labels: str) -> bool:
            return daemon.metric("gridmesh_rejected_messages_total", **labels) >= 1

        # every node it attacked refuses each forgery (and so forwards none: node0, not
        # attacked, holds the original), and no node holds a forged value
        for target in net.daemons[1:]:
            wait_for(
                lambda target=target: counted(target, source="gossip", reason="unauthorized"),
                10,
                f"the forged update to be refused by {target.peer_id}",
            )
            assert counted(target, source="gossip", reason="bad_signature")
            assert counted(target, source="gossip", reason="malformed")
            assert counted(target, source="sync")
        for daemon in net.daemons:
            entry = daemon.call("registry_get", {"kind": "components", "key": "llama"})
            assert entry["value"] == COMPONENT and entry["author"] == owner.peer_id
        target = net.daemons[1]
        assert target.alive() and len(target.call("nodes_find", {})) == 3


def test_sigkill_during_writes_loses_nothing_acknowledged(tmp_path, fast_config):
    daemon = DaemonProcess(tmp_path / "home", config=fast_config).start()
    acknowledged: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        client = daemon.client(timeout=5)
        i = 0
        while not stop.is_set():
            key = f"w{i}"
            try:
                client.call("registry_put", {"kind": "components", "key": key, "value": COMPONENT})
            except (DaemonUnreachable, RPCCallError, OSError):
                return
            acknowledged.append(key)
            i += 1

    thread = threading.Thread(target=writer)
    thread.start()
    try:
        wait_for(lambda: len(acknowledged) >= 50, 30, "50 acknowledged writes")
        daemon.kill()
    finally:
        stop.set()
        thread.join(10)
    restarted = DaemonProcess(daemon.home, config=fast_config).start()
    try:
        stats = restarted.call("registry_stats")
        stored = keys_on(restarted)
        assert set(acknowledged) <= stored
        assert stats["live"] == len(stored) == stats["by_kind"]["components"]["live"]
        assert len(stored) - len(acknowledged) <= 1  # at most the write in flight
        with sqlite3.connect(daemon.home / "registry.db") as db:
            assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        restarted.stop()


def test_cli_apply_get_delete(tmp_path, fast_config):
    daemon = DaemonProcess(tmp_path / "home", config=fast_config).start()
    gm = [sys.executable, "-m", "daemon.cli.main"]
    home = ["--home", str(daemon.home)]
    samples = Path(__file__).resolve().parents[2] / "configs" / "samples"
    try:
        for name in ("cluster.yaml", "component.yaml", "block.yaml"):
            done = subprocess.run(
                [*gm, "apply", "-f", str(samples / name), *home],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stderr
            assert "applied" in done.stdout
        listed = subprocess.run(
            [*gm, "get", "blocks", *home, "--json", "--filter", "minInstances >= 1"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert listed.returncode == 0, listed.stderr
        assert '"kind": "blocks"' in listed.stdout
        bad = subprocess.run(
            [*gm, "get", "blocks", *home, "--filter", "minInstances >="],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 1 and "position" in bad.stderr
        key = daemon.call("registry_list", {"kind": "components"})["items"][0]["key"]
        gone = subprocess.run(
            [*gm, "delete", "components", key, *home], capture_output=True, text=True, timeout=60
        )
        assert gone.returncode == 0 and "deleted" in gone.stdout
        missing = subprocess.run(
            [*gm, "get", "components", key, *home], capture_output=True, text=True, timeout=60
        )
        assert missing.returncode == 1 and "does not exist" in missing.stderr
    finally:
        daemon.stop()
