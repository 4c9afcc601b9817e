"""`gridmesh dashboard`: print (and, with --open, open) a one-time link to the node's web
page (daemon.dashboard). The link is asked of the running daemon over JSON-RPC, so only
whoever can read HOME/rpc.cookie gets one; it works once, for two minutes."""

from __future__ import annotations

import webbrowser
from pathlib import Path
from urllib.parse import urlsplit

import typer

from daemon.cli.common import HomeOption, call, fail, home_dir, rpc_client


def login_url(rpc_url: str, path: str) -> str:
    """The link: the daemon's RPC address with the login path the daemon gave."""
    parts = urlsplit(rpc_url)
    if parts.scheme != "http" or not parts.netloc or not path.startswith("/dashboard/login?"):
        raise ValueError(f"unexpected rpc_url {rpc_url!r} or login path {path!r}")
    return f"http://{parts.netloc}{path}"


def dashboard(
    home: Path | None = HomeOption,
    open_browser: bool = typer.Option(
        False, "--open", help="Also open the link in this machine's web browser."
    ),
) -> None:
    """Print a one-time login link to this node's dashboard (works once, for two minutes)."""
    home = home_dir(home)
    rpc_url = rpc_client(home).url
    link = call(home, "dashboard_login")
    try:
        url = login_url(rpc_url, link["path"])
    except (ValueError, KeyError, TypeError) as exc:
        fail(f"the daemon gave an unusable login link: {exc}")
    typer.echo(url)
    if open_browser and not webbrowser.open(url):
        typer.echo("gridmesh: no web browser found here: open the link yourself", err=True)
