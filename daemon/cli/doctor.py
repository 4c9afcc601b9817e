"""`gridmesh doctor`: check this node and say how to fix what is wrong (daemon.doctor).

The key files and the config are read here; everything else is asked of the running daemon
(`node_doctor`). Without a daemon those lines fail with "start the daemon". The exit status
is 1 when any line fails, so scripts can use it (`--json` for the lines themselves).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import typer

from daemon import config as configuration
from daemon.cli.common import HomeOption, JsonOption, home_dir

DOCTOR_TIMEOUT_S = 120.0  # the daemon dials bootstrap peers, asks peers and the chain


def ask_daemon(home: Path, info: dict[str, Any] | None) -> list[Any]:
    """The daemon's lines (`node_doctor`), or every daemon line failed with why."""
    from daemon import doctor
    from daemon.api.client import RPCClient, RPCClientError
    from daemon.api.cookie import CookieError, read_cookie

    if info is None or not isinstance(info.get("rpc_url"), str):
        return doctor.daemon_down(f"no daemon is running with home {home}", home)
    try:
        client = RPCClient(info["rpc_url"], read_cookie(home), timeout=DOCTOR_TIMEOUT_S)
        return doctor.parse_checks(client.call("node_doctor"))
    except (CookieError, OSError) as exc:
        return doctor.daemon_down(f"cannot read the RPC cookie: {exc}", home)
    except (RPCClientError, ValueError) as exc:
        return doctor.daemon_down(f"the daemon did not answer node_doctor: {exc}", home)


def doctor(
    home: Path | None = HomeOption,
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Config file (default: HOME/config.toml if present).",
        show_default=False,
    ),
    as_json: bool = JsonOption,
) -> None:
    """Check this node, line by line, each with its fix: key files and their permissions,
    config, listen addresses and reachability, bootstrap peers, clock offset against peers,
    DHT round trip, chain RPC and chain id, payout balance and stake, contracts, GPUs.

    Exits 1 when any line fails (a `warn` line does not fail)."""
    from daemon import doctor as checks
    from daemon.home import running_daemon

    home = home_dir(home)
    config_path = config or home / configuration.CONFIG_FILE
    given = config_path if config is not None or config_path.exists() else None
    info = running_daemon(home)[0] if home.is_dir() else None
    local, _ = checks.local_checks(home, given, os.environ, daemon_running=info is not None)
    lines = [*local, *ask_daemon(home, info)]
    if as_json:
        typer.echo(
            json.dumps(
                {"ok": checks.ok(lines), "checks": [c.as_json() for c in lines]},
                indent=2,
            )
        )
    else:
        typer.echo(checks.render(lines))
    if not checks.ok(lines):
        raise typer.Exit(1)
