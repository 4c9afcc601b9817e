"""The payment books' sqlite files: readable by their owner only, one connection that trio's
worker threads use one at a time (`run`), so a write never blocks the event loop."""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class PrivateDB:
    """A sqlite file made with mode 0600 before sqlite opens it, holding `schema`.

    `wal`: write-ahead log with `synchronous = NORMAL` (a commit survives the process being
    killed; ~0.2 ms instead of ~19 ms); otherwise a rollback journal with `synchronous = FULL`
    (a commit also survives the machine going down)."""

    def __init__(self, path: Path, schema: str, *, wal: bool) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        if wal:
            self._db.execute("PRAGMA journal_mode = WAL")
            self._db.execute("PRAGMA synchronous = NORMAL")
        else:
            self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(schema)
        self._lock = threading.Lock()
        self._limiter = trio.CapacityLimiter(1)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """Call one of the (synchronous) methods from trio, off the event loop."""
        return await trio.to_thread.run_sync(fn, *args, limiter=self._limiter)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> PrivateDB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
