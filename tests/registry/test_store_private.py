"""The registry database is private to the node's user, and a bad stored row or entry is
left out on load and counted, never raised."""

from __future__ import annotations

import os
import sqlite3
import stat

from p2p import codec, identity
from p2p.aio import open_bridge
from registry.blocks import announcement_key, announcements
from registry.entry import sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import Limits, Replica
from registry.store import RegistryStore

IDENT = identity.NodeIdentity.generate()


def mode(path: os.PathLike[str] | str) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


async def test_the_database_and_its_wal_and_shm_files_are_0600(tmp_path):
    old = os.umask(0o022)  # the usual umask: files would be 0644
    try:
        async with open_bridge() as bridge:
            path = tmp_path / "registry.db"
            store = RegistryStore(bridge, path)
            await store.open()
            replica = Replica(IDENT, store=store)
            await replica.put("components", "a", {"name": "a", "version": "1"})
            for suffix in ("", "-wal", "-shm"):
                assert mode(f"{path}{suffix}") == 0o600, (suffix, oct(mode(f"{path}{suffix}")))
            await store.close()
            # a database left 0644 by an older version is narrowed when opened
            os.chmod(path, 0o644)
            again = RegistryStore(bridge, path)
            await again.open()
            assert mode(path) == 0o600
            assert [e.key for e in await again.load_all()] == ["a"]
            await again.close()
    finally:
        os.umask(old)


async def test_bad_stored_rows_and_entries_are_left_out_and_counted(tmp_path):
    """A `blocks` entry stored before the schema typed `parameters` (ms_per_layer a string),
    a damaged row, and a good entry: the replica loads the good one and counts the others."""
    path = tmp_path / "registry.db"
    now = 1_000_000
    ts = Timestamp(now, 0)
    key = announcement_key("m", 0, 4, IDENT.peer_id)
    poisoned = sign_entry(
        IDENT,
        kind="blocks",
        key=key,
        value={
            "blockId": key,
            "blockComponentURI": "m",
            "model": "m",
            "layers": [0, 4],
            "served_by": [IDENT.peer_id],
            "parameters": {"ms_per_layer": "fast"},
        },
        ts=ts,
        created=ts,
        owner=IDENT.peer_id,
    )
    good = sign_entry(
        IDENT,
        kind="components",
        key="ok",
        value={"name": "ok", "version": "1"},
        ts=ts,
        created=ts,
        owner=IDENT.peer_id,
    )
    async with open_bridge() as bridge:
        store = RegistryStore(bridge, path)
        await store.open()
        await store.apply([poisoned, good])  # as an older version stored them
        await store.close()
    with sqlite3.connect(path) as db:  # and a row damaged on disk
        db.execute(
            "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)",
            ("components", "broken", b"\xc1\xc1", 1, 0, "x", 1, 0, "x", b""),
        )
        db.execute(
            "INSERT INTO entries VALUES (?,?,?,?,?,?,?,?,?,?)",
            ("components", "notamap", codec.encode([1, 2]), 1, 0, "x", 1, 0, "x", b""),
        )
    seen: list[tuple[str, str]] = []
    async with open_bridge() as bridge:
        store = RegistryStore(bridge, path)
        await store.open()
        replica = Replica(
            IDENT,
            store=store,
            clock=HybridClock(lambda: now),
            on_reject=lambda source, reason: seen.append((source, reason)),
        )
        await replica.load()
        assert list(replica.entries.values()) == [good]
        assert seen == [("store", "bad_entry")] * 3
        assert replica.rejected["bad_entry"] == 3
        assert announcements(replica.entries.values()) == []
        await store.close()


async def test_stored_entries_over_quota_are_left_out_earliest_kept_and_come_back(tmp_path):
    """What one author flooded into a store before the quotas existed: the replica loads its
    earliest entries up to the quota and counts the rest; raising the quota brings them back."""
    path = tmp_path / "registry.db"
    flood = [
        sign_entry(
            IDENT,
            kind="components",
            key=f"f{n:02d}",
            value={"name": "f", "version": str(n)},
            ts=Timestamp(1_000 + n, 0),
            created=Timestamp(1_000 + n, 0),
            owner=IDENT.peer_id,
        )
        for n in range(12)
    ]
    async with open_bridge() as bridge:
        store = RegistryStore(bridge, path)
        await store.open()
        await store.apply(reversed(flood))  # as an older version stored them
        seen: list[tuple[str, str]] = []
        replica = Replica(
            IDENT,
            store=store,
            clock=HybridClock(lambda: 2_000),
            limits=Limits(author_max_entries=10),
            on_reject=lambda source, reason: seen.append((source, reason)),
        )
        await replica.load()
        assert sorted(replica.entries) == [("components", f"f{n:02d}") for n in range(10)]
        assert seen == [("store", "quota")] * 2
        assert len(await store.load_all()) == 12  # left out, not deleted
        roomy = Replica(IDENT, store=store, clock=HybridClock(lambda: 2_000))
        await roomy.load()
        assert len(roomy.entries) == 12
        await store.close()
