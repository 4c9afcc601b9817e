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


@pytest.mark.parametrize("found", [True, False])
def test_open_hands_the_link_to_the_browser(monkeypatch, tmp_path, found):
    from types import SimpleNamespace

    from typer.testing import CliRunner

    from daemon.cli import dashboard as command

    path = "/dashboard/login?code=" + "c" * 43
    opened: list[str] = []
    monkeypatch.setattr(
        command, "rpc_client", lambda home: SimpleNamespace(url="http://127.0.0.1:4242/")
    )
    monkeypatch.setattr(command, "call", lambda home, method: {"path": path})
    monkeypatch.setattr(command.webbrowser, "open", lambda url: opened.append(url) or found)
    result = CliRunner().invoke(app, ["dashboard", "--open", "--home", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == "http://127.0.0.1:4242" + path == opened[0]
    assert ("no web browser found" in result.stderr) is not found
    # without --open only the link is printed; a link the daemon should never give is refused
    opened.clear()
    assert CliRunner().invoke(app, ["dashboard", "--home", str(tmp_path)]).exit_code == 0
    assert opened == []
    monkeypatch.setattr(command, "call", lambda home, method: {"path": "/elsewhere"})
    refused = CliRunner().invoke(app, ["dashboard", "--open", "--home", str(tmp_path)])
    assert refused.exit_code == 1 and "unusable login link" in refused.stderr and opened == []
