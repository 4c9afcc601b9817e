"""`gridmesh policy ...`: run a policy locally through the sandbox, as the daemon would, and
print its hash or this machine's isolation layers. Nothing here talks to a daemon."""

from __future__ import annotations

import base64
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import typer

from daemon.cli.common import HomeOption, fail, home_dir, print_json

policy_app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)


@policy_app.callback()
def _group() -> None:
    """Policies: small Python classes (AIOS's `eval(parameters, input_data, context)` and
    `management(action, data)`) packaged as a folder or archive with manifest.json, run
    only inside the sandbox. README: "Policies and the sandbox"."""


def _json_option(text: str | None, what: str) -> Any:
    if text is None:
        return None
    try:
        return json.loads(text)
    except ValueError as exc:
        fail(f"{what} is not valid JSON: {exc}")


def _read_input(source: str) -> Any:
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read input {source}: {getattr(exc, 'strerror', None) or exc}")
    try:
        return json.loads(text)
    except ValueError as exc:
        fail(f"input {source} is not valid JSON: {exc}")


def _jsonable(value: Any) -> Any:
    """A policy's result for JSON: bytes as {"base64": ...}, other keys as strings."""
    if isinstance(value, bytes):
        return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _sandbox_config(home: Path, config: Path | None) -> Any:
    """The node's [sandbox] settings (its config file and GRIDMESH_SANDBOX__* variables),
    or the defaults where the node has no config."""
    from daemon import config as configuration
    from daemon.sandbox import SandboxConfig

    path = config or home / configuration.CONFIG_FILE
    try:
        cfg = configuration.resolve(path if config or path.exists() else None, env=os.environ)
    except configuration.ConfigError as exc:
        fail(str(exc))
    return getattr(cfg, "sandbox", None) or SandboxConfig()


@policy_app.command("test")
def test_policy(
    path: Path = typer.Argument(..., help="The policy: a folder or a .tar/.tar.gz/.zip archive."),
    input_file: str = typer.Option(
        ...,
        "--input",
        help="JSON file with the input (input_data for eval, data for "
        "management); '-' reads stdin.",
    ),
    method: str = typer.Option("eval", "--method", help="eval or management."),
    action: str = typer.Option("", "--action", help="The action, for --method management."),
    parameters: str | None = typer.Option(None, "--parameters", help="eval's parameters (JSON)."),
    context: str | None = typer.Option(None, "--context", help="eval's context (JSON)."),
    settings: str | None = typer.Option(
        None, "--settings", help="The settings the class is made with (JSON)."
    ),
    rule_id: str = typer.Option("", "--rule-id", help="The rule id (default: the name)."),
    digest: str | None = typer.Option(
        None, "--digest", help="Refuse the policy unless its content hash is this."
    ),
    timeout_s: float | None = typer.Option(
        None, "--timeout", min=0.001, help="Deadline in seconds (default: sandbox.call_timeout_s)."
    ),
    show_layers: bool = typer.Option(
        False, "--layers", help="Also print the isolation layers on stderr."
    ),
    config: Path | None = typer.Option(
        None, "--config", help="Config file (default: HOME/config.toml)."
    ),
    home: Path | None = HomeOption,
) -> None:
    """Run a policy on an input in the sandbox and print its result as JSON.

    e.g. `gridmesh policy test ./least_loaded --input request.json --parameters '{"k": 2}'`.
    The sandbox is the daemon's: the node's [sandbox] settings, its allow-list, its layers;
    the node's home is hidden from the policy."""
    import trio

    from daemon.sandbox import PolicyInvalid, SandboxError, SandboxPool, load_package

    if method not in ("eval", "management"):
        fail(f"--method must be eval or management, not {method!r}")
    home = home_dir(home)
    sandbox = _sandbox_config(home, config)
    data = _read_input(input_file)
    if method == "eval":
        args = {
            "parameters": _json_option(parameters, "--parameters"),
            "input_data": data,
            "context": _json_option(context, "--context"),
        }
    else:
        args = {"action": action, "data": data}
    init_settings = _json_option(settings, "--settings")
    try:
        package = load_package(path, expected_digest=digest, allowed=sandbox.allowed_packages)
    except PolicyInvalid as exc:
        fail(exc.message)
    ref = package.bind(rule_id, init_settings if isinstance(init_settings, dict) else None, None)

    async def run() -> Any:
        single = msgspec.structs.replace(sandbox, spare_workers=0)
        async with SandboxPool(single, hidden_paths=[home]) as pool:
            if show_layers:
                for name, state in pool.layers.items():
                    typer.echo(f"{name}: {state}", err=True)
            return await pool.call(ref, method, args, timeout_s=timeout_s)

    try:
        result = trio.run(run)
    except SandboxError as exc:
        fail(f"{exc.kind}: {exc.message}")
    print_json(_jsonable(result))


@policy_app.command("hash")
def hash_policy(
    path: Path = typer.Argument(..., help="The policy: a folder or an archive."),
) -> None:
    """Print a policy's content hash (what a spec's policy reference names)."""
    from daemon.sandbox import PolicyInvalid
    from daemon.sandbox.package import MANIFEST, check_package, parse_manifest, read_files

    try:
        files = read_files(path)
        # the allow-list is the running node's business, not the hash's
        wanted = parse_manifest(files[MANIFEST]).requirements if MANIFEST in files else ()
        _, digest = check_package(files, allowed=wanted, source=str(path))
    except PolicyInvalid as exc:
        fail(exc.message)
    typer.echo(digest)


@policy_app.command("layers")
def layers(
    home: Path | None = HomeOption, config: Path | None = typer.Option(None, "--config")
) -> None:
    """Start one sandbox worker and print which isolation layers are on on this machine."""
    import trio

    from daemon.sandbox import SandboxError, SandboxPool

    home = home_dir(home)
    sandbox = _sandbox_config(home, config)

    async def run() -> dict[str, str]:
        async with SandboxPool(sandbox, hidden_paths=[home]) as pool:
            return dict(pool.layers)

    try:
        report = trio.run(run)
    except SandboxError as exc:
        fail(f"{exc.kind}: {exc.message}")
    for name, state in report.items():
        typer.echo(f"{name:13} {state}")
