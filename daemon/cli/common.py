"""What the `gridmesh` commands share: the common options, errors, and calls to the daemon."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from daemon import config as configuration

HomeOption = typer.Option(
    None,
    "--home",
    help="Node home directory (default: $GRIDMESH_HOME or ~/.gridmesh).",
    show_default=False,
)
JsonOption = typer.Option(False, "--json", help="Print machine-readable JSON instead of a table.")


def home_dir(home: Path | None) -> Path:
    return (home or configuration.default_home()).expanduser()


def fail(message: str, code: int = 1) -> None:
    typer.echo(f"gridmesh: {message}", err=True)
    raise typer.Exit(code)


def rpc_client(home: Path | None, timeout: float = 30) -> Any:
    from daemon.api.client import RPCClient
    from daemon.api.cookie import read_cookie
    from daemon.home import running_daemon

    home = home_dir(home)
    info, stale_pid = running_daemon(home)
    if info is None:
        stale = {None: "", -1: " (stale files removed)"}.get(
            stale_pid, f" (stale files from pid {stale_pid} removed)"
        )
        fail(f"no daemon is running with home {home}{stale}; start one with `gridmesh daemon`")
    try:
        token = read_cookie(home)
    except OSError:
        fail(f"cannot read {home}/rpc.cookie: is the daemon running as this user?")
    return RPCClient(info["rpc_url"], token, timeout=timeout)


# Methods that load or unload model weights: minutes on a large model, not 30 s.
LONG_METHODS = {"block_deploy", "block_load", "block_undeploy", "shard_plan"}
LONG_TIMEOUT_S = 3600.0


def call(home: Path | None, method: str, params: Any = None, *, timeout: float = 30) -> Any:
    from daemon.api.client import DaemonUnreachable, RPCCallError

    client = rpc_client(home, timeout)
    try:
        return client.call(method, params)
    except DaemonUnreachable as exc:
        fail(f"the daemon is not answering: {exc}")
    except RPCCallError as exc:
        fail(f"{method} failed ({exc.code}): {exc.message}{hint(exc)}")


def hint(exc: Any) -> str:
    """What to do next, for refusals a new user meets first."""
    reason = exc.data.get("reason") if isinstance(exc.data, dict) else None
    if reason == "unknown_cluster":
        return (
            "; apply the cluster's document first (it can be in the same `gridmesh apply`, "
            "e.g. -f configs/samples/), or wait until it has replicated to this node"
        )
    return ""


def long_call(home: Path | None, method: str, params: Any, what: str) -> Any:
    """`call` without the 30 s cap, with a spinner and the elapsed time on stderr."""
    from rich.console import Console
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    with Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        progress.add_task(what, total=None)
        return call(home, method, params, timeout=LONG_TIMEOUT_S)


def print_json(value: Any) -> None:
    typer.echo(json.dumps(value, indent=2, sort_keys=True))
