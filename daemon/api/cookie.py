"""The RPC cookie: a bearer token in HOME/rpc.cookie, readable only by the node's user.

The daemon writes a fresh token at every start (as bitcoind does); local tools read it to
authenticate. Whoever can read the file can control the node, hence mode 0600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

COOKIE_FILE = "rpc.cookie"


class CookieError(Exception):
    """The cookie file exists but is unusable."""


class CookieNotFound(CookieError, FileNotFoundError):
    """No cookie file: the daemon is not running, or uses another home directory."""


def cookie_path(home: Path) -> Path:
    return Path(home) / COOKIE_FILE


def create_cookie(home: Path) -> str:
    """Write a fresh random token to HOME/rpc.cookie (mode 0600) and return it."""
    path = cookie_path(home)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    # O_NOFOLLOW: never write the token through a symlink planted in the home directory.
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags, 0o600)
    try:
        # An existing file keeps its old mode under O_TRUNC; tighten it before writing.
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o600)
        else:  # pragma: no cover - Windows
            os.chmod(path, 0o600)
        os.write(fd, token.encode("ascii"))
    finally:
        os.close(fd)
    return token


def read_cookie(home: Path) -> str:
    """The token in HOME/rpc.cookie; raises CookieNotFound or CookieError with a hint."""
    path = cookie_path(home)
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise CookieNotFound(
            f"no RPC cookie at {path}: is the daemon running with this home directory?"
        ) from None
    except (UnicodeDecodeError, OSError) as e:
        raise CookieError(f"cannot read RPC cookie at {path}: {e}") from None
    if not token:
        raise CookieError(f"RPC cookie at {path} is empty")
    return token


def remove_cookie(home: Path, token: str | None = None) -> None:
    """Delete the cookie; with `token`, only if it still holds that token.

    The check keeps a stopping daemon from deleting the cookie of a newer one that took over
    the same home directory.
    """
    path = cookie_path(home)
    if token is not None:
        try:
            if path.read_text(encoding="ascii").strip() != token:
                return
        except (OSError, UnicodeDecodeError):
            return
    path.unlink(missing_ok=True)
