"""A real daemon whose registry.db holds entries an older version accepted: a `blocks`
announcement with `ms_per_layer` a string (every streamed `generate` used to raise inside the
daemon's nursery and kill it, again after every restart) and one naming another peer as the
server. The daemon starts, leaves both out and counts them, and keeps serving."""

from __future__ import annotations

import os
import sqlite3
import stat
import time

import pytest

from daemon.devnet import DaemonProcess, wait_for
from p2p.identity import NodeIdentity
from registry.blocks import announcement_key
from registry.entry import sign_entry
from registry.hlc import Timestamp
from registry.store import COLUMNS, _row

pytestmark = pytest.mark.procs


def test_poisoned_registry_entries_on_disk_do_not_kill_the_daemon(tmp_path, fast_config):
    home = tmp_path / "home"
    daemon = DaemonProcess(home, config=fast_config).start()
    me = daemon.peer_id
    assert daemon.stop() == 0

    mallory = NodeIdentity.generate()
    now = Timestamp(int(time.time() * 1000), 0)

    def block(key: str, served_by: str, ms: object) -> dict[str, object]:
        return {
            "blockId": key,
            "blockComponentURI": "m",
            "model": "m",
            "layers": [0, 2],
            "served_by": [served_by],
            "parameters": {"ms_per_layer": ms},
        }

    own = announcement_key("m", 0, 2, mallory.peer_id)
    poisoned = [
        sign_entry(
            mallory,
            kind="blocks",
            key=own,
            value=block(own, mallory.peer_id, "fast"),
            ts=now,
            created=now,
            owner=mallory.peer_id,
        ),
        sign_entry(
            mallory,
            kind="blocks",
            key="m-0-2",
            value=block("m-0-2", me, 1.0),
            ts=now,
            created=now,
            owner=mallory.peer_id,
        ),
    ]
    with sqlite3.connect(home / "registry.db") as db:
        db.executemany(
            f"INSERT INTO entries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            [_row(e) for e in poisoned],
        )

    daemon = DaemonProcess(home, config=fast_config).start()
    try:
        assert daemon.metric(
            "gridmesh_rejected_messages_total", source="store", reason="bad_entry"
        ) == len(poisoned)
        assert daemon.call("block_list")["announced"] == {}
        job = daemon.call("generate", {"model": "m", "token_ids": [1, 2], "stream": True})["job"]
        result = wait_for(
            lambda: (r := daemon.call("generate_poll", {"job": job}))["done"] and r,
            60,
            "the generation to finish",
        )
        assert "no server announces" in result["error"]
        assert daemon.alive()
        assert daemon.call("registry_stats")["rejected"] == {"bad_entry": len(poisoned)}
        for suffix in ("", "-wal", "-shm"):
            assert stat.S_IMODE(os.stat(f"{home / 'registry.db'}{suffix}").st_mode) == 0o600
    finally:
        daemon.stop()
