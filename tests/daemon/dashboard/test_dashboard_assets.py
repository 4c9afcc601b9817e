"""The page's files as committed: everything they load is one of them (nothing from the
internet, so the page works offline), and live numbers come from the event feed, never from
a timer that polls."""

from __future__ import annotations

import re

from daemon.dashboard.routes import SECURITY_HEADERS, load_static

SVG_NS = "http://www.w3.org/2000/svg"  # a name, not a fetch
URL = re.compile(r"""(?:https?:)?//[^\s"'`)<>]+""")
LOADS = re.compile(r"""(?:src|href)="([^"#][^"]*)\"""")


def texts() -> dict[str, str]:
    return {name: body.decode("utf-8") for name, (_, body) in load_static().items()}


def test_every_file_the_pages_load_is_served_from_static():
    files = texts()
    assert {"index.html", "login.html", "app.js", "style.css"} <= set(files)
    for page in ("index.html", "login.html"):
        for target in LOADS.findall(files[page]):
            assert target.startswith("/dashboard/static/"), (page, target)
            assert target.removeprefix("/dashboard/static/") in files, (page, target)
    for name, text in files.items():
        # comments aside, no address elsewhere than this daemon
        code = re.sub(r"^\s*//.*$", "", text, flags=re.M)
        found = [u for u in URL.findall(code) if u != SVG_NS]
        assert found == [], (name, found)
        assert "@import" not in text and "url(" not in text, name
    # and the browser is told the same: nothing from anywhere else
    csp = dict(SECURITY_HEADERS)[b"content-security-policy"]
    assert b"default-src 'none'" in csp and b"connect-src 'self'" in csp
    assert b"http" not in csp and b"*" not in csp


def test_live_numbers_come_from_server_sent_events_not_polling():
    app = texts()["app.js"]
    assert 'new EventSource("/dashboard/events")' in app
    for timer in ("setInterval", "setTimeout", "requestAnimationFrame", "XMLHttpRequest"):
        assert timer not in app, timer
    # fetch only loads a view once when it is opened (or a feed event says it changed)
    calls = re.findall(r"\bfetch\(", app)
    assert len(calls) == 1, calls
