"""Who may see the dashboard: one-time login codes exchanged for session cookies.

`gridmesh dashboard` asks the daemon (JSON-RPC `dashboard_login`, behind the RPC cookie)
for a login code; the link `/dashboard/login?code=...` trades it, once, for an HttpOnly,
SameSite=Strict session cookie. Whoever can read HOME/rpc.cookie can log in; nobody else
can. Both tables are bounded: at the cap the oldest entry goes.
"""

from __future__ import annotations

import hmac
import secrets
import string
import time
from collections import OrderedDict
from collections.abc import Callable

CODE_TTL_S = 120.0  # a login link works this long, once
SESSION_TTL_S = 12 * 3600.0
MAX_CODES = 16
MAX_SESSIONS = 32
COOKIE_NAME = "gridmesh_dashboard"
TOKEN_CHARS = 43  # secrets.token_urlsafe(32)
ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


def well_formed(token: str) -> bool:
    """A code or session id as we issue them: 43 URL-safe base64 characters."""
    return len(token) == TOKEN_CHARS and all(c in ALPHABET for c in token)


class _Expiring:
    """Tokens with a deadline each, at most `cap` (the oldest is dropped at the cap)."""

    def __init__(self, ttl_s: float, cap: int, clock: Callable[[], float]) -> None:
        self.ttl_s, self.cap, self.clock = ttl_s, cap, clock
        self.tokens: OrderedDict[str, float] = OrderedDict()

    def issue(self) -> str:
        self.reap()
        while len(self.tokens) >= self.cap:
            self.tokens.popitem(last=False)
        token = secrets.token_urlsafe(32)
        self.tokens[token] = self.clock() + self.ttl_s
        return token

    def find(self, given: str) -> str | None:
        """The stored token equal to `given` (compared in constant time), if live."""
        self.reap()
        if not well_formed(given):
            return None
        for token in self.tokens:
            if hmac.compare_digest(token, given):
                return token
        return None

    def reap(self) -> None:
        now = self.clock()
        for token in [t for t, until in self.tokens.items() if until <= now]:
            del self.tokens[token]


class Logins:
    """One-time codes and the sessions they open."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.codes = _Expiring(CODE_TTL_S, MAX_CODES, clock)
        self.sessions = _Expiring(SESSION_TTL_S, MAX_SESSIONS, clock)

    def new_code(self) -> str:
        return self.codes.issue()

    def redeem(self, code: str) -> str | None:
        """A new session id for a valid unused code (which is then spent), else None."""
        found = self.codes.find(code)
        if found is None:
            return None
        del self.codes.tokens[found]
        return self.sessions.issue()

    def valid(self, session: str) -> bool:
        return self.sessions.find(session) is not None

    def set_cookie(self, session: str) -> bytes:
        return (
            f"{COOKIE_NAME}={session}; Path=/dashboard; HttpOnly; SameSite=Strict; "
            f"Max-Age={int(SESSION_TTL_S)}"
        ).encode("ascii")


def session_of(cookie_header: bytes | None) -> str:
    """Our session id from a Cookie header ("" when absent)."""
    if not cookie_header:
        return ""
    try:
        text = cookie_header.decode("ascii")
    except UnicodeDecodeError:
        return ""
    for part in text.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE_NAME:
            return value.strip()
    return ""
