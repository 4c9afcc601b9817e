"""Login codes and sessions: a code works once and only before it expires, sessions expire,
both tables are capped (the oldest goes), and the cookie parser takes only ours."""

from __future__ import annotations

from daemon.dashboard import auth


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_code_works_once_and_expires():
    clock = Clock()
    logins = auth.Logins(clock)
    code = logins.new_code()
    session = logins.redeem(code)
    assert session and logins.valid(session) and auth.well_formed(session)
    assert logins.redeem(code) is None  # spent
    late = logins.new_code()
    clock.now += auth.CODE_TTL_S + 1
    assert logins.redeem(late) is None
    clock.now += auth.SESSION_TTL_S
    assert not logins.valid(session)


def test_caps_drop_the_oldest_and_malformed_tokens_are_refused():
    logins = auth.Logins(Clock())
    codes = [logins.new_code() for _ in range(auth.MAX_CODES + 1)]
    assert len(logins.codes.tokens) == auth.MAX_CODES
    assert logins.redeem(codes[0]) is None and logins.redeem(codes[-1])
    sessions = [logins.sessions.issue() for _ in range(auth.MAX_SESSIONS + 1)]
    assert not logins.valid(sessions[0]) and logins.valid(sessions[-1])
    for bad in ["", "x" * 42, "x" * 44, "a" * 42 + "!", sessions[-1][:-1] + "\u00e9"]:
        assert not logins.valid(bad) and logins.redeem(bad) is None


def test_the_cookie_header_yields_only_our_session():
    name = auth.COOKIE_NAME
    assert auth.session_of(f"a=1; {name}=abc; b=2".encode()) == "abc"
    assert auth.session_of(b"other=abc") == ""
    assert auth.session_of(None) == "" and auth.session_of(b"\xff=") == ""
    header = auth.Logins().set_cookie("s")
    assert b"HttpOnly" in header and b"SameSite=Strict" in header and b"Path=/dashboard" in header
