"""The `gridmesh` command line: set up a node, run its daemon, and talk to it over JSON-RPC."""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import typer

from daemon import config as configuration
from daemon.cli import dashboard, doctor, jobs, render, shards
from daemon.cli.chain import chain_app
from daemon.cli.cluster import cluster_app
from daemon.cli.common import (
    LONG_METHODS,
    LONG_TIMEOUT_S,
    HomeOption,
    JsonOption,
    call,
    fail,
    home_dir,
    print_json,
)
from daemon.cli.model import model_app
from daemon.cli.policy import policy_app
from daemon.cli.serve import serve_app
from daemon.cli.vdag import vdag_app

app = typer.Typer(
    help="gridmesh: a peer-to-peer network for AI compute.\n\n"
    "Start with `gridmesh init`, run `gridmesh daemon` (join others with --bootstrap "
    "/ip4/ADDRESS/tcp/PORT/p2p/PEER_ID), then ask it questions with `gridmesh status`, "
    "`gridmesh peers` and `gridmesh nodes`. Serve a model with `gridmesh deploy DIR --model "
    "ID`, use it with `gridmesh generate --model ID TEXT`, stop with `gridmesh undeploy ID`. "
    "Serve it to OpenAI clients with `gridmesh serve --openai` (POST /v1/chat/completions). "
    "Every command takes --home DIR (default $GRIDMESH_HOME or ~/.gridmesh) and --help.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

app.add_typer(model_app, name="model", help="Make and inspect model checkpoints.")
app.add_typer(chain_app, name="chain")
app.add_typer(jobs.job_app, name="job")
app.add_typer(cluster_app, name="cluster")
app.add_typer(policy_app, name="policy")
app.add_typer(vdag_app, name="vdag")


@app.command()
def init(
    home: Path | None = HomeOption,
    network: str | None = typer.Option(
        None,
        "--network",
        help="Write this network's profile (configs/NAME.toml: devnet, testnet) as the config "
        "instead of the single-node template.",
    ),
    rpc_url: str | None = typer.Option(
        None, "--rpc-url", help="With --network: the chain's RPC URL, written as [chain] rpc_url."
    ),
    force: bool = typer.Option(
        False, "--force", help="Replace an existing config.toml (kept as config.toml.bak)."
    ),
) -> None:
    """Create this node's keys and config.toml (never overwrites existing keys)."""
    from p2p import identity

    home = home_dir(home)
    config_path = home / configuration.CONFIG_FILE
    try:
        text = configuration.init_text(network, rpc_url)
    except ValueError as exc:
        fail(str(exc))
    if config_path.exists() and network is not None and not force:
        fail(f"{config_path} exists: pass --force to replace it with the {network} profile")
    try:
        ident, created = identity.init_identity(home)
        if config_path.exists() and force:
            config_path.replace(config_path.with_name(config_path.name + ".bak"))
        if not config_path.exists():
            config_path.write_text(text)
    except identity.IdentityError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"cannot set up {home}: {exc.strerror or exc} ({exc.filename or home})")
    verb = "created" if created else "kept existing"
    typer.echo(f"{verb} identity in {home}")
    typer.echo(f"peer id:        {ident.peer_id}")
    typer.echo(f"payout address: {ident.payout_address}")
    typer.echo(f"config:         {config_path}")
    for line in configuration.profile_notes(text, home) if network is not None else []:
        typer.echo(line)


@app.command()
def daemon(
    home: Path | None = HomeOption,
    config: Path | None = typer.Option(
        None,
        "--config",
        help="Config file (default: HOME/config.toml if present). GRIDMESH_<SECTION>__<KEY> "
        "environment variables override it (e.g. GRIDMESH_RPC__PORT=0), flags override both.",
    ),
    listen: list[str] = typer.Option(
        [],
        "--listen",
        help="libp2p multiaddr to listen on, /ip4/ADDRESS/tcp/PORT (repeatable); tcp/0 picks "
        "a free port, e.g. /ip4/127.0.0.1/tcp/0 for a second daemon on this host.",
    ),
    bootstrap: list[str] = typer.Option(
        [],
        "--bootstrap",
        help="Full multiaddr of a node to join through, ending in /p2p/<its peer id> "
        "(`gridmesh status` on that node shows it; repeatable).",
    ),
    rpc_port: int | None = typer.Option(
        None, "--rpc-port", help="JSON-RPC port on 127.0.0.1 (default 8645); 0 picks a free one."
    ),
    grpc_port: int | None = typer.Option(
        None,
        "--grpc-port",
        help="gRPC inference port on 127.0.0.1 (default 0: a free one, shown by `status`).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning or error."),
    log_format: str = typer.Option(
        "text",
        "--log-format",
        help="text, or json: one JSON object per line (ts, level, logger, message, extra "
        "fields) for log collectors.",
    ),
) -> None:
    """Run the daemon in the foreground until Ctrl-C or SIGTERM.

    Several daemons on one host each need their own --home and free ports, e.g.
    `gridmesh daemon --home ~/.gridmesh2 --listen /ip4/127.0.0.1/tcp/0 --rpc-port 0`."""
    from daemon.home import running_daemon

    home = home_dir(home)
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        fail(f"unknown log level {log_level!r} (use debug, info, warning or error)")
    from daemon import logs

    if log_format not in logs.FORMATS:
        fail(f"unknown log format {log_format!r} (use text or json)")
    config_path = config or home / configuration.CONFIG_FILE
    flags = {"--listen": listen, "--bootstrap": bootstrap, "--rpc-port": rpc_port}
    try:
        # defaults < the file < GRIDMESH_<SECTION>__<KEY> variables < flags (daemon.settings)
        cfg = configuration.resolve(
            config_path if config or config_path.exists() else None,
            env=os.environ,
            flags={**flags, "--grpc-port": grpc_port},
        )
    except configuration.ConfigError as exc:
        fail(str(exc))
    running, stale = running_daemon(home) if home.is_dir() else (None, None)
    if running is not None:
        fail(f"another daemon is already running with home {home} (pid {running.get('pid')})")
    from daemon.cli.ports import port_problems

    for problem in port_problems(cfg):
        fail(problem)
    logs.setup(level, log_format)
    if stale is not None:
        logging.getLogger("daemon.home").warning(
            "removed stale daemon.json and rpc.cookie of pid %s (killed?)", stale
        )

    import trio

    from daemon.node import SHUTDOWN_GRACE_S, Daemon, DaemonError
    from p2p.host import quiet_libp2p_logs
    from p2p.identity import IdentityError
    from p2p.network import NetworkError

    quiet_libp2p_logs(logging.DEBUG if level <= logging.DEBUG else logging.ERROR)
    try:
        node = Daemon(home, cfg, exit_watchdog_s=SHUTDOWN_GRACE_S)
        trio.run(node.run)
    except BaseException as exc:
        # trio wraps a failed start in (nested) exception groups: a port taken between the
        # check above and the bind, a listen address libp2p refuses, a bad identity file.
        leaves = _leaves(exc)
        clear = (DaemonError, IdentityError, NetworkError, OSError)
        if not leaves or not all(isinstance(leaf, clear) for leaf in leaves):
            raise
        for message in dict.fromkeys(str(leaf) or type(leaf).__name__ for leaf in leaves):
            typer.echo(f"gridmesh: {message}", err=True)
        raise typer.Exit(1) from None


def _leaves(exc: BaseException) -> list[BaseException]:
    """The exceptions inside (nested) exception groups, without the groups themselves."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    if isinstance(exc, KeyboardInterrupt | SystemExit | typer.Exit):
        return []
    return [exc]


@app.command()
def status(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """Show this node's identity, addresses (libp2p, JSON-RPC, gRPC) and resources."""
    from daemon.home import read_daemon_file

    info = call(home, "node_info")
    grpc_addr = (read_daemon_file(home_dir(home)) or {}).get("grpc_addr")
    if grpc_addr and "grpc_addr" not in info:
        info["grpc_addr"] = grpc_addr
    if as_json:
        print_json(info)
    else:
        render.node_info(info)


@app.command()
def peers(home: Path | None = HomeOption, as_json: bool = JsonOption) -> None:
    """List the peers this node knows, with connection state and RTT."""
    result = call(home, "node_peers")
    if as_json:
        print_json(result)
    else:
        render.peers(result)


@app.command()
def nodes(
    home: Path | None = HomeOption,
    min_gpus: int | None = typer.Option(None, "--min-gpus", min=0, help="At least N GPUs."),
    min_vram_gb: float | None = typer.Option(
        None, "--min-vram-gb", min=0, help="Each counted GPU has at least this much memory."
    ),
    gpu_name: str | None = typer.Option(
        None, "--gpu-name", help="GPU name contains this text (case-insensitive), e.g. H100."
    ),
    min_cpu_cores: int | None = typer.Option(None, "--min-cpu-cores", min=0),
    as_json: bool = JsonOption,
) -> None:
    """Find nodes in the network (through the DHT) and their resources."""
    node_filter = {
        key: value
        for key, value in {
            "min_gpus": min_gpus,
            "min_vram_gb": min_vram_gb,
            "gpu_name": gpu_name,
            "min_cpu_cores": min_cpu_cores,
        }.items()
        if value is not None
    }
    result = call(home, "nodes_find", {"filter": node_filter})
    if as_json:
        print_json(result)
    else:
        render.nodes(result)


@app.command()
def rpc(
    method: str = typer.Argument(..., help="Method name; `gridmesh rpc rpc_methods` lists them."),
    params: str | None = typer.Argument(
        None, help="Parameters as JSON, an object or an array, e.g. '{\"filter\": {}}'."
    ),
    home: Path | None = HomeOption,
) -> None:
    """Call any JSON-RPC method and print the result as JSON."""
    parsed: Any = None
    if params is not None:
        try:
            parsed = json.loads(params)
        except ValueError as exc:
            fail(f"JSON-PARAMS is not valid JSON: {exc}")
        if not isinstance(parsed, dict | list):
            fail("JSON-PARAMS must be a JSON object or array")
    timeout = LONG_TIMEOUT_S if method in LONG_METHODS else 30
    print_json(call(home, method, parsed, timeout=timeout))


# Kinds others refer to go first, so one apply of a directory works in any file order.
APPLY_ORDER = {"clusters": 0, "members": 1, "components": 2, "policies": 3, "blocks": 4}


def _spec_files(sources: list[str]) -> list[str]:
    """Files named, with each directory's *.yaml, *.yml and *.json (sorted, not recursive)."""
    out: list[str] = []
    for source in sources:
        path = Path(source)
        if source != "-" and path.is_dir():
            found = sorted(str(p) for p in path.iterdir() if p.suffix in (".yaml", ".yml", ".json"))
            if not found:
                fail(f"{source} is a directory without .yaml, .yml or .json files")
            out.extend(found)
        else:
            out.append(source)
    return out


@app.command()
def apply(
    files: list[str] = typer.Argument(None, help="More files or directories.", show_default=False),
    file: list[str] = typer.Option(
        [],
        "-f",
        "--file",
        help="YAML or JSON file, a directory of them, or '-' for stdin (repeatable).",
    ),
    home: Path | None = HomeOption,
) -> None:
    """Write registry entries from files: documents of {kind, key, value}.

    `gridmesh apply -f configs/samples/` applies a directory; clusters and members are
    written before the entries that name them. The string "$SELF" anywhere in a value stands
    for this node's peer id."""
    from daemon.specs import SpecError, load_documents, substitute_self

    sources = _spec_files([*file, *(files or [])])
    if not sources:
        fail("nothing to apply: give files or directories, e.g. -f configs/samples/")
    documents: list[dict[str, Any]] = []
    for source in sources:
        try:
            documents.extend(load_documents(source))
        except SpecError as exc:
            fail(str(exc))
    documents.sort(key=lambda doc: APPLY_ORDER.get(doc["kind"], len(APPLY_ORDER)))
    peer_id = call(home, "node_info")["peer_id"]
    for doc in documents:
        entry = call(home, "registry_put", substitute_self(doc, peer_id))
        version = render.version(entry["version"])
        typer.echo(f"{entry['kind']}/{entry['key']} applied (version {version})")


@app.command()
def get(
    kind: str = typer.Argument(..., help="clusters, members, components, blocks, vdags, ..."),
    key: str | None = typer.Argument(None, help="One entry; without it, list the kind."),
    filter: str | None = typer.Option(
        None, "--filter", help="e.g. \"minInstances >= 1 AND blockId LIKE 'llama%'\""
    ),
    limit: int = typer.Option(1000, "--limit", min=1, help="At most this many entries."),
    home: Path | None = HomeOption,
    as_json: bool = JsonOption,
) -> None:
    """Show registry entries (from this node's replica)."""
    if key is not None:
        entries = [call(home, "registry_get", {"kind": kind, "key": key})]
    else:
        entries, cursor = [], None
        while len(entries) < limit:
            params: dict[str, Any] = {"kind": kind, "limit": min(1000, limit - len(entries))}
            if filter:
                params["filter"] = filter
            if cursor:
                params["cursor"] = cursor
            page = call(home, "registry_list", params)
            entries.extend(page["items"])
            cursor = page["next_cursor"]
            if not cursor:
                break
    if as_json:
        print_json(entries if key is None else entries[0])
    else:
        render.entries(entries)


@app.command()
def delete(
    kind: str = typer.Argument(...), key: str = typer.Argument(...), home: Path | None = HomeOption
) -> None:
    """Delete a registry entry (only its owner or the cluster's admins may)."""
    entry = call(home, "registry_delete", {"kind": kind, "key": key})
    version = render.version(entry["version"])
    typer.echo(f"{entry['kind']}/{entry['key']} deleted (version {version})")


for command in shards.COMMANDS:
    app.command()(command)
for command in jobs.COMMANDS:
    app.command()(command)
app.command()(doctor.doctor)
app.command()(dashboard.dashboard)
app.add_typer(serve_app(daemon), name="serve")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
