"""`gridmesh serve`: run the daemon with the OpenAI-compatible endpoint on, and print where
to point the official `openai` client; `gridmesh serve keygen` makes an API key.

`serve` is `gridmesh daemon` with [serving] openai on: it takes every option of `daemon` (the
function is passed in and its options are reused, not copied), and --port/--host set
[serving] port and host over the config file and the environment.
"""

from __future__ import annotations

import errno
import hashlib
import inspect
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from daemon import config as configuration
from daemon.cli.common import fail, home_dir

KEY_PREFIX = "gm-"
ANNOUNCE_TIMEOUT_S = 120.0
EXAMPLE_MODEL = "MODEL"

SERVE_HELP = """Run the daemon with the OpenAI-compatible endpoint on, and print its URL.

It is `gridmesh daemon` (same options) with \\[serving] openai on; --port and --host
set \\[serving] port and host for this run.

  gridmesh serve --openai                   # 127.0.0.1, a free port
  gridmesh serve --openai --port 8000       # http://127.0.0.1:8000/v1
  gridmesh serve --openai --host 0.0.0.0 --port 8000   # needs API keys
  gridmesh serve keygen --name alice        # a key for config.toml

Then, in Python (pip install openai):

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="KEY")
  client.chat.completions.create(model="MODEL",
      messages=[{"role": "user", "content": "Hello"}])

MODEL is any model deployed on the network that this daemon can route to
(client.models.list()). On 127.0.0.1 no key is needed (any api_key text
does) unless \\[serving] require_keys is set; any other --host needs
\\[serving] api_keys in config.toml, each with its own requests_per_minute,
tokens_per_day and max_concurrent. config.toml documents every \\[serving]
key; README: "Serving (OpenAI-compatible endpoint)"."""


def serve_app(daemon: Callable[..., None]) -> typer.Typer:
    """The `serve` command group, running `daemon` (the `gridmesh daemon` command)."""
    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
    app.callback(invoke_without_command=True, help=SERVE_HELP)(_serve_command(daemon))
    app.command("keygen")(keygen)
    return app


def _serve_command(daemon: Callable[..., None]) -> Callable[..., None]:
    """A command taking --openai, --port, --host and every option of `daemon`."""

    def serve(
        ctx: typer.Context, openai: bool, port: int | None, host: str | None, **options: Any
    ) -> None:
        if ctx.invoked_subcommand is not None:
            return
        home = home_dir(options.get("home"))
        serving = _check_serving(home, options.get("config"), openai, port, host)
        if not openai and (serving is None or not serving.openai):
            fail(
                "say what to serve: `gridmesh serve --openai` runs the daemon with the "
                "OpenAI-compatible endpoint on (see `gridmesh serve --help`)"
            )
        overrides = {"GRIDMESH_SERVING__OPENAI": "true"}  # a layer over config.toml
        if port is not None:
            overrides["GRIDMESH_SERVING__PORT"] = str(port)
        if host is not None:
            overrides["GRIDMESH_SERVING__HOST"] = host
        stop = threading.Event()
        if serving is not None:
            threading.Thread(
                target=announce_when_up,
                args=(home, serving),
                kwargs={"stop": stop},
                name="serve-announce",
                daemon=True,
            ).start()
        saved = {name: os.environ.get(name) for name in overrides}
        os.environ.update(overrides)
        try:
            daemon(**options)
        finally:  # as it was (for a caller in the same process: tests)
            stop.set()
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    own = [
        inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context),
        _option(
            "openai",
            bool,
            typer.Option(
                False,
                "--openai",
                help="Serve the OpenAI-compatible endpoint (/v1/chat/completions, "
                "/v1/completions, /v1/models); without it, \\[serving] openai in the config "
                "must be true.",
            ),
        ),
        _option(
            "port",
            int | None,
            typer.Option(
                None,
                "--port",
                help="Its TCP port (default: \\[serving] port; 0 picks a free one).",
            ),
        ),
        _option(
            "host",
            str | None,
            typer.Option(
                None,
                "--host",
                help="Its address (default: \\[serving] host, 127.0.0.1); any other, e.g. "
                "0.0.0.0, needs \\[serving] api_keys.",
            ),
        ),
    ]
    reused = list(inspect.signature(daemon, eval_str=True).parameters.values())
    serve.__signature__ = inspect.Signature([*own, *reused])  # type: ignore[attr-defined]
    serve.__annotations__ = {p.name: p.annotation for p in [*own, *reused]}
    serve.__doc__ = SERVE_HELP
    return serve


def _option(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
    return inspect.Parameter(name, kind, default=default, annotation=annotation)


def _check_serving(
    home: Path, config: Path | None, openai: bool, port: int | None, host: str | None
) -> Any | None:
    """[serving] as the daemon will see it, --port and --host over the config file and the
    environment; a mistake in them is refused naming the flag, and a fixed port that is
    taken naming --port. None when the rest of the config has a mistake: the daemon
    command reports it."""
    from daemon import settings

    path = config or home / configuration.CONFIG_FILE
    try:
        base = settings.resolve(path if config or path.exists() else None, env=os.environ)
    except settings.ConfigError:
        return None
    import msgspec

    layers = settings.Layers()
    layers.add_table(msgspec.to_builtins(base), "")
    if openai:
        layers.set(("serving", "openai"), True, "--openai")
    if port is not None:
        layers.set(("serving", "port"), port, "--port")
    if host is not None:
        layers.set(("serving", "host"), host, "--host")
    try:
        serving = layers.build().serving
    except settings.ConfigError as exc:
        fail(str(exc))
    if serving.port and (problem := _port_taken(serving.host, serving.port)):
        fail(
            f"serving.port {serving.port} on {serving.host} {problem}: choose another with "
            "--port N, or --port 0 for a free one"
        )
    return serving


def _port_taken(host: str, port: int) -> str | None:
    """Why host:port cannot be bound now, or None."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return "is already in use"
            return f"cannot be bound ({exc.strerror or exc})"
    return None


# -- once it is up ---------------------------------------------------------------------------


def endpoint_url(info: dict[str, Any] | None, serving: Any) -> str | None:
    """The base URL a client uses (ending in /v1): the node's `openai_url` from node_info
    when it reports one, else from [serving] (None when the port is 0: unknown here)."""
    reported = (info or {}).get("openai_url")
    if isinstance(reported, str) and reported.startswith("http"):
        url = reported.rstrip("/")
        for anywhere, here in (("//0.0.0.0:", "//127.0.0.1:"), ("//[::]:", "//[::1]:")):
            url = url.replace(anywhere, here)  # every interface: this machine's is one
        return url if url.endswith("/v1") else f"{url}/v1"
    if not serving.port:
        return None
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(serving.host, serving.host)
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{serving.port}/v1"


def example_lines(url: str, serving: Any) -> list[str]:
    """What `serve` prints once the endpoint is up."""
    if serving.keys_required:
        key, why = '"YOUR_KEY"', "a key from [serving] api_keys (gridmesh serve keygen)"
    else:
        key, why = '"none"', "no key needed from this machine"
    lines = [f"OpenAI-compatible endpoint: {url}  ({why})"]
    if serving.host in ("0.0.0.0", "::"):
        port = url.rsplit(":", 1)[1].split("/")[0]
        lines.append(f"  from other machines: http://THIS-MACHINE:{port}/v1")
    lines += [
        "Point the official openai client at it (pip install openai):",
        "  from openai import OpenAI",
        f'  client = OpenAI(base_url="{url}", api_key={key})',
        f'  print(client.chat.completions.create(model="{EXAMPLE_MODEL}", messages=[{{"role": '
        '"user", "content": "Hello"}]).choices[0].message.content)',
        f"Models ({EXAMPLE_MODEL} above): client.models.list(), or GET {url}/models",
    ]
    return lines


def announce_when_up(
    home: Path,
    serving: Any,
    *,
    pid: int | None = None,
    timeout_s: float = ANNOUNCE_TIMEOUT_S,
    echo: Callable[[str], None] = typer.echo,
    stop: threading.Event | None = None,
) -> bool:
    """Wait until this process's daemon runs in `home` (its daemon.json), then print the
    endpoint: the URL node_info reports (`openai_url`), or [serving]'s. False if the daemon
    did not come up within `timeout_s`, or `stop` was set first (the daemon ended)."""
    from daemon.home import read_daemon_file

    pid = os.getpid() if pid is None else pid
    stop = stop or threading.Event()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and not stop.is_set():
        running = read_daemon_file(home)
        if running and running.get("pid") == pid:
            info = _node_info(home, running)
            if info is not None and "openai_url" in info and not info["openai_url"]:
                stop.wait(0.2)  # it reports one, once its endpoint listens
                continue
            url = endpoint_url(info, serving)
            if url is None:
                echo(
                    "OpenAI-compatible endpoint: on a free port that this daemon does not "
                    "report; set a fixed one with --port 8000"
                )
            else:
                for line in example_lines(url, serving):
                    echo(line)
            return True
        stop.wait(0.2)
    return False


def _node_info(home: Path, running: dict[str, Any]) -> dict[str, Any] | None:
    from daemon.api.client import DaemonUnreachable, RPCCallError, RPCClient
    from daemon.api.cookie import read_cookie

    try:
        client = RPCClient(running["rpc_url"], read_cookie(home), timeout=10)
        info = client.call("node_info")
    except (OSError, KeyError, DaemonUnreachable, RPCCallError):
        return None
    return info if isinstance(info, dict) else None


# -- keys --------------------------------------------------------------------------------------


def new_key() -> str:
    """A random API key: 32 bytes of the OS's randomness, URL-safe."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_table(name: str, key: str) -> str:
    """The `[[serving.api_keys]]` TOML table of `key` (its digest, not the key)."""
    digest = hashlib.sha256(key.encode()).hexdigest()
    return (
        "[[serving.api_keys]]\n"
        f'name = "{name}"\n'
        f'key_sha256 = "{digest}"\n'
        "# requests_per_minute = 60\n"
        "# tokens_per_day = 1000000\n"
        "# max_concurrent = 4\n"
    )


def keygen(
    name: str = typer.Option(
        "default",
        "--name",
        help="The key's name (1..64 letters, digits, _ . @ -): shown in refusals and limits.",
    ),
) -> None:
    """Make a new random API key for the OpenAI-compatible endpoint.

    Prints the key (once: give it to its user) and the \\[\\[serving.api_keys]]
    table to append to config.toml. The table holds only the key's sha256, so a
    config file that is copied or shown gives no one access. Uncomment the
    limits you want, and restart the daemon to apply."""
    from daemon.serving.settings import Name

    pattern = Name.__metadata__[0].pattern
    if not re.fullmatch(pattern, name):
        fail(f"--name {name!r} is not a key name (1..64 letters, digits, _ . @ -)")
    key = new_key()
    typer.echo(f"API key {name!r} (shown once; the client's api_key):")
    typer.echo(f"  {key}")
    typer.echo("")
    typer.echo("Append to config.toml (HOME/config.toml) and restart the daemon:")
    typer.echo("")
    typer.echo(key_table(name, key), nl=False)
