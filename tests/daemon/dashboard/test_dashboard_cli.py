"""`gridmesh dashboard`'s link: the daemon's RPC address plus the login path it gave (the
whole command runs against real daemons in test_dashboard_browser)."""

from __future__ import annotations

import pytest

from daemon.cli.dashboard import login_url
from daemon.cli.main import app


def test_the_link_is_the_rpc_address_and_the_login_path():
    path = "/dashboard/login?code=" + "c" * 43
    assert login_url("http://127.0.0.1:4242/", path) == "http://127.0.0.1:4242" + path
    for rpc_url, bad in [
        ("http://127.0.0.1:4242/", "/elsewhere?code=x"),
        ("https://127.0.0.1:4242/", path),
        ("127.0.0.1:4242", path),
    ]:
        with pytest.raises(ValueError):
            login_url(rpc_url, bad)


def test_the_command_is_registered():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert "dashboard" in names
