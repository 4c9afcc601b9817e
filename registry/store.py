"""Durable registry storage: sqlite in WAL mode through aiosqlite, behind the asyncio bridge.

One transaction per applied batch, committed with synchronous=FULL before the batch is
acknowledged, so a daemon killed at any moment restarts with every acknowledged entry and
never with half a batch.

The database and its -wal and -shm files are private to the node's user (mode 0600, as the
node key and the RPC cookie are): the file is created so before sqlite opens it (sqlite gives
the -wal and -shm files the database's mode), and an older, wider file is narrowed.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import aiosqlite
import trio

from p2p import codec
from p2p.aio import AsyncioBridge
from registry.entry import Entry
from registry.hlc import Timestamp

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    value BLOB,
    ts_wall INTEGER NOT NULL,
    ts_counter INTEGER NOT NULL,
    author TEXT NOT NULL,
    created_wall INTEGER NOT NULL,
    created_counter INTEGER NOT NULL,
    owner TEXT NOT NULL,
    sig BLOB NOT NULL,
    PRIMARY KEY (kind, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
"""

COLUMNS = "kind, key, value, ts_wall, ts_counter, author, created_wall, created_counter, owner, sig"


def _row(entry: Entry) -> tuple[Any, ...]:
    value = None if entry.value is None else codec.encode(entry.value)
    return (
        entry.kind,
        entry.key,
        value,
        entry.ts.wall_ms,
        entry.ts.counter,
        entry.author,
        entry.created.wall_ms,
        entry.created.counter,
        entry.owner,
        entry.signature,
    )


def _entry(row: tuple[Any, ...]) -> Entry:
    """A stored row as an Entry; ValueError (or codec.CodecError) when it cannot be one."""
    kind, key, value, ts_wall, ts_counter, author, c_wall, c_counter, owner, sig = row
    if not (
        isinstance(kind, str)
        and isinstance(key, str)
        and isinstance(author, str)
        and isinstance(owner, str)
        and isinstance(sig, bytes)
        and all(isinstance(n, int) and n >= 0 for n in (ts_wall, ts_counter, c_wall, c_counter))
        and (value is None or isinstance(value, bytes))
    ):
        raise ValueError("a stored row has the wrong column types")
    decoded = None if value is None else codec.decode(value)
    if decoded is not None and not isinstance(decoded, dict):
        raise ValueError("a stored value is not a map")
    return Entry(
        kind=kind,
        key=key,
        value=decoded,
        ts=Timestamp(ts_wall, ts_counter),
        author=author,
        created=Timestamp(c_wall, c_counter),
        owner=owner,
        signature=sig,
    )


def make_private(path: Path) -> None:
    """Create the database file with mode 0600 if it is missing, and narrow it and its
    -wal and -shm files to 0600 if they exist with a wider mode."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    os.close(fd)
    for suffix in ("", "-wal", "-shm", "-journal"):
        name = Path(f"{path}{suffix}")
        try:
            if name.stat().st_mode & 0o077:
                name.chmod(0o600)
        except FileNotFoundError:
            continue


class RegistryStore:
    def __init__(self, bridge: AsyncioBridge, path: Path) -> None:
        self._bridge = bridge
        self._path = path
        self._db: aiosqlite.Connection | None = None
        self._write_lock = trio.Lock()
        self.bad_rows = 0  # rows the last load_all could not read (left out)

    async def open(self) -> None:
        self._db = await self._bridge.run(self._open)

    async def _open(self) -> aiosqlite.Connection:
        make_private(self._path)
        db = await aiosqlite.connect(self._path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.executescript(SCHEMA)
        make_private(self._path)  # the -wal and -shm files exist now
        return db

    async def close(self) -> None:
        if self._db is not None:
            db, self._db = self._db, None
            await self._bridge.run(db.close)

    def _conn(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("registry store is not open")
        return self._db

    async def load_all(self) -> list[Entry]:
        async def load() -> list[Entry]:
            out = []
            self.bad_rows = 0
            async with self._conn().execute(f"SELECT {COLUMNS} FROM entries") as cursor:
                for row in await cursor.fetchall():
                    try:
                        out.append(_entry(tuple(row)))
                    except (ValueError, TypeError):  # codec.CodecError is a ValueError
                        self.bad_rows += 1
            return out

        return await self._bridge.run(load)

    async def apply(self, entries: Iterable[Entry]) -> None:
        """Write a batch in one transaction; returns once it is durable."""
        rows = [_row(e) for e in entries]
        if not rows:
            return

        async def write() -> None:
            db = self._conn()
            await db.execute("BEGIN IMMEDIATE")
            try:
                await db.executemany(
                    f"INSERT OR REPLACE INTO entries ({COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
                    rows,
                )
            except BaseException:
                await db.execute("ROLLBACK")
                raise
            await db.execute("COMMIT")

        async with self._write_lock:  # one transaction at a time on the one connection
            await self._bridge.run(write)

    async def purge_tombstones(self, before_wall_ms: int) -> int:
        async def purge() -> int:
            db = self._conn()
            cursor = await db.execute(
                "DELETE FROM entries WHERE value IS NULL AND ts_wall < ?", (before_wall_ms,)
            )
            return cursor.rowcount

        async with self._write_lock:
            return await self._bridge.run(purge)

    async def integrity_check(self) -> str:
        async def check() -> str:
            async with self._conn().execute("PRAGMA integrity_check") as cursor:
                row = await cursor.fetchone()
                return str(row[0]) if row else "no answer"

        return await self._bridge.run(check)
