"""The node's home directory while a daemon runs: its lock, daemon.json and stale leftovers.

Stdlib only: the CLI imports this to find its daemon, and a command that only talks to the
daemon must start fast (no libp2p, torch, grpc or web3).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DAEMON_FILE = "daemon.json"
LOCK_FILE = "daemon.lock"
COOKIE_FILE = "rpc.cookie"  # the same name as daemon.api.cookie.COOKIE_FILE


class DaemonError(RuntimeError):
    pass


def read_daemon_file(home: Path) -> dict[str, Any] | None:
    """HOME/daemon.json as written by the running daemon, or None (absent or unreadable)."""
    try:
        info = json.loads((home / DAEMON_FILE).read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None


def _remove_leftovers(home: Path) -> int | None:
    """Delete daemon.json and rpc.cookie; the pid daemon.json named, if any (caller holds the
    lock, so no daemon is between taking it and writing these files)."""
    info = read_daemon_file(home)
    existed = (home / DAEMON_FILE).exists() or (home / COOKIE_FILE).exists()
    (home / DAEMON_FILE).unlink(missing_ok=True)
    (home / COOKIE_FILE).unlink(missing_ok=True)
    if not existed:
        return None
    pid = info.get("pid") if info else None
    return pid if isinstance(pid, int) else -1


@contextmanager
def home_lock(home: Path) -> Iterator[None]:
    """Hold an exclusive lock on the home for the daemon's lifetime (released on any exit).

    Files left by a daemon that was killed (daemon.json, rpc.cookie) are removed first."""
    fd = os.open(home / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = read_daemon_file(home)
            pid = f" (pid {info['pid']})" if info else ""
            raise DaemonError(f"another daemon is already running with home {home}{pid}") from None
        stale = _remove_leftovers(home)
        if stale is not None:
            log.warning("removed stale daemon.json and rpc.cookie of pid %s (killed?)", stale)
        yield
    finally:
        os.close(fd)


def running_daemon(home: Path) -> tuple[dict[str, Any] | None, int | None]:
    """(daemon.json of the daemon running with this home or None, pid of stale files removed).

    A daemon is running exactly while it holds HOME/daemon.lock; a daemon.json without the
    lock held was left by a crash (SIGKILL, power loss), and is removed here with the cookie.
    """
    try:
        fd = os.open(home / LOCK_FILE, os.O_RDWR)
    except FileNotFoundError:
        return None, None
    except OSError:  # cannot open the lock (another user's home?): trust daemon.json
        return read_daemon_file(home), None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return read_daemon_file(home), None
        try:
            return None, _remove_leftovers(home)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
