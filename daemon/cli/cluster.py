"""`gridmesh cluster ...`: create clusters, join and leave them, admit members, look at them.

Every command asks the running daemon (JSON-RPC `cluster_*`); the registries carry the result
to every node, and every node checks the cluster's admission rule itself.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import typer

from daemon.cli.common import HomeOption, JsonOption, call, fail, print_json

ADMISSIONS = ("open", "approval", "allowlist")
JOIN_ROLES = ("voter", "worker")
DTYPES = ("float32", "float16", "bfloat16")
TERMS = ("memory", "throughput", "rtt", "energy", "carbon")

cluster_app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False
)


HELP = "\n\n".join(
    (
        "Clusters: groups of nodes under one administration that take work together. Each "
        "cluster elects a coordinator among its voters, which places its blocks' shards. A node "
        "may belong to several clusters.",
        "Roles: admin (governs the cluster, also a voter), voter (may vote and coordinate), "
        "worker (takes work; the default).",
        "Who may join by themselves is the cluster's admission rule: open (anyone, as voter or "
        "worker), approval (the default: `join` asks, an admin runs `approve`) or allowlist "
        "(only the peers listed with --allow). Admins may always add (`approve`) and `remove` "
        "members, and any member may `leave`.",
        "--require EXPR adds a condition on the joiner's signed resource record, in the "
        "registry filter syntax, e.g. 'gpus >= 1 AND vram_gb >= 24'. Fields: gpus (count), "
        "vram_gb (the largest GPU, GiB), vram_total_gb, gpu_name, cpu_cores, ram_gb, "
        "disk_free_gb, price_per_unit, accepts_deploys, resources.* (the raw record). A "
        "refused join says which condition failed. Every node checks these rules itself.",
        "1. `gridmesh cluster create lab` (this node becomes its admin).  "
        "2. On another node: `gridmesh cluster join lab --role voter`.  "
        "3. On the admin's node: `gridmesh cluster members lab`, then "
        "`gridmesh cluster approve lab PEER_ID`.  "
        "4. On any node: `gridmesh cluster info lab` (rule, admins, coordinator and term, "
        "members with their role and state).  "
        "`gridmesh cluster plan lab MODEL_DIR` shows how its coordinator would place a model "
        "now, each member's score broken down by term.",
    )
)


@cluster_app.callback(help=HELP)
def _group() -> None:
    pass


def _choice(value: str, allowed: tuple[str, ...], flag: str) -> str:
    if value not in allowed:
        fail(f"{flag} {value!r}: use one of {', '.join(allowed)}")
    return value


@cluster_app.command()
def create(
    name: str = typer.Argument(..., help="The cluster's name (1..64 of A-Z a-z 0-9 . _ : @ -)."),
    admission: str = typer.Option(
        "approval",
        "--admission",
        help="Who may join by themselves: open, approval (an admin approves each request) or "
        "allowlist (only the peers given with --allow).",
    ),
    require: str | None = typer.Option(
        None,
        "--require",
        help="A condition on a joiner's signed resource record, in the registry filter "
        "syntax, e.g. 'gpus >= 1 AND vram_gb >= 24'.",
    ),
    allow: list[str] = typer.Option(
        [], "--allow", help="A peer id an allowlist cluster admits (repeatable)."
    ),
    description: str | None = typer.Option(None, "--description", help="What the cluster is for."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Create a cluster; this node becomes its admin and first member."""
    params: dict[str, Any] = {
        "name": name,
        "admission": _choice(admission, ADMISSIONS, "--admission"),
    }
    if require is not None:
        params["require"] = require
    if allow:
        params["allowlist"] = allow
    if description is not None:
        params["description"] = description
    info = call(home, "cluster_create", params)
    if as_json:
        print_json(info)
        return
    typer.echo(f"created cluster {name} ({info['admission']}); this node is its admin")
    typer.echo(f"others join with: gridmesh cluster join {name}")


@cluster_app.command()
def join(
    name: str = typer.Argument(..., help="The cluster to join."),
    role: str = typer.Option(
        "worker", "--role", help="voter (may vote and coordinate) or worker (takes work)."
    ),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Join a cluster (or, in an approval cluster, ask an admin to let this node in)."""
    result = call(home, "cluster_join", {"name": name, "role": _choice(role, JOIN_ROLES, "--role")})
    if as_json:
        print_json(result)
    elif result["status"] == "requested":
        typer.echo(
            f"asked to join {name} as {', '.join(result['roles'])}; an admin approves with: "
            f"gridmesh cluster approve {name} {result['peer_id']}"
        )
    else:
        roles = ", ".join(result["roles"])
        verb = "already a member" if result.get("note") == "already a member" else "joined"
        typer.echo(f"{verb} {name} as {roles}")


@cluster_app.command()
def approve(
    name: str = typer.Argument(..., help="The cluster."),
    peer: str = typer.Argument(..., help="The peer id to admit (see `cluster members`)."),
    role: str | None = typer.Option(
        None, "--role", help="voter or worker (default: the role the peer asked for)."
    ),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Admit a peer (an admin only): approve its join request, or add it directly."""
    params: dict[str, Any] = {"name": name, "peer": peer}
    if role is not None:
        params["role"] = _choice(role, JOIN_ROLES, "--role")
    result = call(home, "cluster_approve", params)
    if as_json:
        print_json(result)
    else:
        typer.echo(f"{peer} is a member of {name} as {', '.join(result['roles'])}")


@cluster_app.command()
def remove(
    name: str = typer.Argument(..., help="The cluster."),
    peer: str = typer.Argument(..., help="The member (or requester) to remove."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Remove a member or turn down a join request (an admin only)."""
    result = call(home, "cluster_remove", {"name": name, "peer": peer})
    if as_json:
        print_json(result)
    else:
        typer.echo(f"removed {peer} from {name}")


@cluster_app.command()
def leave(
    name: str = typer.Argument(..., help="The cluster to leave."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Leave a cluster (or withdraw this node's join request)."""
    result = call(home, "cluster_leave", {"name": name})
    if as_json:
        print_json(result)
    else:
        typer.echo(f"left {name}")


@cluster_app.command()
def members(
    name: str = typer.Argument(..., help="The cluster."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """The cluster's members and its pending join requests."""
    rows = call(home, "cluster_members", {"name": name})
    if as_json:
        print_json(rows)
    else:
        _members_table(name, rows, {}, None)


@cluster_app.command()
def info(
    name: str = typer.Argument(..., help="The cluster."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """The cluster as this node knows it: rule, coordinator, members, placements.

    Admission rule and admins from the registry; the coordinator, its term and each member's
    state (alive, suspect, dead) from this node's cluster runtime when it is a member; the
    coordinator's placements when it reports them."""
    result = call(home, "cluster_info", {"name": name})
    if as_json:
        print_json(result)
        return
    _info_table(result)


@cluster_app.command()
def plan(
    name: str = typer.Argument(..., help="The cluster."),
    model_dir: str = typer.Argument(
        ..., help="The HF Llama checkpoint's directory (the same path on every member)."
    ),
    model: str | None = typer.Option(None, "--model", help="Model id (default: MODEL_DIR)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32, float16 or bfloat16."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Copies of the chain."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Dry run: how the cluster's coordinator would place MODEL_DIR now, and why.

    Every member's score broken down by term (free memory, throughput, RTT between hops,
    energy and carbon; costs count negative), the inputs it read, which ones were assumed
    because the member did not declare them, and the members left out with the reason."""
    from daemon.cli.common import LONG_TIMEOUT_S

    params: dict[str, Any] = {
        "name": name,
        "model_dir": model_dir,
        "dtype": _choice(dtype, DTYPES, "--dtype"),
        "replicas": replicas,
    }
    if model is not None:
        params["model"] = model
    result = call(home, "cluster_plan", params, timeout=LONG_TIMEOUT_S)
    if as_json:
        print_json(result)
    else:
        _plan_tables(result)


# --------------------------------------------------------------------------- tables


def _when(unix: Any) -> str:
    if not isinstance(unix, int | float):
        return "-"
    return datetime.datetime.fromtimestamp(unix, tz=datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _members_table(
    name: str, rows: list[dict[str, Any]], states: dict[str, Any], coordinator: str | None
) -> None:
    from rich.table import Table

    from daemon.cli.render import console

    active = sum(1 for r in rows if r["status"] == "active")
    requests = len(rows) - active
    table = Table(
        title=f"{name}: {active} member{'s' * (active != 1)}, "
        f"{requests} request{'s' * (requests != 1)}"
    )
    columns = ["peer id", "roles", "status"]
    if states:
        columns.append("state")
    columns.append("since (UTC)")
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        peer = row["peer_id"]
        roles = ", ".join(row["roles"])
        if peer == coordinator:
            roles += " (coordinator)"
        cells = [peer, roles, row["status"]]
        if states:
            cells.append(str(states.get(peer, "-")))
        cells.append(_when(row.get("since")))
        table.add_row(*cells)
    console.print(table)


def _info_table(info: dict[str, Any]) -> None:
    from rich.table import Table

    from daemon.cli.render import console

    runtime = info.get("runtime") if isinstance(info.get("runtime"), dict) else None
    table = Table(show_header=False, box=None)
    table.add_row("cluster", info["name"])
    if info.get("description"):
        table.add_row("description", info["description"])
    table.add_row("admission", info["admission"])
    if info.get("require"):
        table.add_row("require", info["require"])
    if info["admission"] == "allowlist":
        table.add_row("allowlist", ", ".join(info.get("allowlist") or []) or "(empty)")
    table.add_row("admins", ", ".join(info["admins"]))
    table.add_row("voters", str(len(info.get("voters") or [])))
    coordinator = None
    if runtime is not None and "error" in runtime:
        table.add_row("coordinator", f"unknown ({runtime['error']})")
        runtime = None
    elif runtime is not None:
        coordinator = runtime.get("coordinator")
        table.add_row("coordinator", str(coordinator or "none known"))
        table.add_row("term", str(runtime.get("term", "-")))
    this = info.get("this_node") or {}
    table.add_row(
        "this node", f"{this.get('status', '?')}{' (admin)' if this.get('admin') else ''}"
    )
    console.print(table)
    states = runtime.get("members") if runtime is not None else None
    _members_table(
        info["name"],
        info.get("members") or [],
        states if isinstance(states, dict) else {},
        coordinator,
    )
    placements = info.get("placements")
    if isinstance(placements, list) and placements:
        _placements_table(placements)
    elif isinstance(placements, dict) and "error" in placements:
        typer.echo(f"placements: unknown ({placements['error']})")


def _placements_table(rows: list[Any]) -> None:
    """Placements as the coordinator reports them: one row per item, a column per key."""
    from rich.table import Table

    from daemon.cli.render import console

    dicts = [r for r in rows if isinstance(r, dict)]
    columns: list[str] = []
    for row in dicts:
        columns.extend(k for k in row if k not in columns)
    table = Table(title=f"{len(rows)} placement{'s' * (len(rows) != 1)}")
    for column in columns or ["placement"]:
        table.add_column(column, overflow="fold")
    for row in rows:
        if isinstance(row, dict):
            table.add_row(*(_cell(row.get(c)) for c in columns))
        else:
            table.add_row(_cell(row))
    console.print(table)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return "\n".join(value) or "-"
    return json.dumps(value, sort_keys=True)


def _number(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return "-"
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _plan_tables(result: dict[str, Any]) -> None:
    from rich.table import Table

    from daemon.cli.render import console

    typer.echo(
        f"{result.get('model')}: {result.get('num_layers')} layers, "
        f"{result.get('replicas')} replica(s) on cluster {result.get('cluster')}, planned by "
        f"{result.get('coordinator')} (term {result.get('term')})"
    )
    assignments = result.get("assignments") or []
    table = Table(title=f"{len(assignments)} assignments")
    for column in ("replica", "layers", "peer id"):
        table.add_column(column, overflow="fold")
    for row in assignments:
        table.add_row(
            str(row.get("replica", "-")),
            f"[{row.get('start')}, {row.get('end')})",
            str(row.get("peer_id")),
        )
    console.print(table)
    scores = result.get("scores") or []
    table = Table(title="scores (best first; each term weighted, costs negative)")
    for column in ("peer id", "chosen", "total", *TERMS, "assumed"):
        table.add_column(column, overflow="fold")
    for row in scores:
        terms = row.get("terms") if isinstance(row.get("terms"), dict) else {}
        table.add_row(
            str(row.get("peer_id")),
            "yes" if row.get("chosen") else "",
            _number(row.get("total")),
            *(_number(terms.get(term)) for term in TERMS),
            ", ".join(row.get("assumed") or []) or "-",
        )
    console.print(table)
    for peer, why in sorted((result.get("excluded") or {}).items()):
        typer.echo(f"left out {peer}: {why}")
