"""A local network on one machine: N daemons in separate processes, chained bootstrap.

`DaemonProcess` runs one `gridmesh daemon` child with its own home, `Devnet` N of them, each
with only the previous one as its bootstrap; the multi-process tests and benchmarks use them.
`python -m daemon.devnet` (`make devnet`, daemon/devnet/__main__.py) runs the demo on them.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from daemon.api.client import DaemonUnreachable, RPCCallError, RPCClient
from daemon.api.cookie import read_cookie
from daemon.config import REPO_CONFIGS
from daemon.home import DAEMON_FILE

DEVNET_CONFIG = REPO_CONFIGS / "devnet.toml"


class DevnetError(RuntimeError):
    pass


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy, or raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DevnetError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class DaemonProcess:
    """One `gridmesh daemon` child process with its own home."""

    def __init__(
        self,
        home: Path,
        *,
        config: Path = DEVNET_CONFIG,
        bootstrap: list[str] | None = None,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        listen: str = "/ip4/127.0.0.1/tcp/0",
        prefix: list[str] | None = None,
    ) -> None:
        """`prefix`: a command the daemon's command line is run under (e.g. `ip netns exec
        NAME`, which execs it: the child's pid stays the daemon's)."""
        self.home = home
        self.listen = listen
        self.prefix = prefix or []
        self.env = env or {}  # on top of this process's environment
        self.config = config
        self.bootstrap = bootstrap or []
        self.extra_args = extra_args or []
        self.log_path = log_path or home / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 20.0) -> DaemonProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / DAEMON_FILE).unlink(missing_ok=True)
        args = [
            *self.prefix,
            sys.executable,
            "-m",
            "daemon.cli.main",
            "daemon",
            "--home",
            str(self.home),
            "--config",
            str(self.config),
            "--listen",
            self.listen,
            "--rpc-port",
            "0",
            *[arg for addr in self.bootstrap for arg in ("--bootstrap", addr)],
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        try:
            self.info = wait_for(self._read_info, timeout_s, f"daemon in {self.home} to start")
        except BaseException:
            self.stop()  # one that did not come up in time must not be left running
            raise
        return self

    def _read_info(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DevnetError(
                f"daemon in {self.home} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            return json.loads((self.home / DAEMON_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def addr(self) -> str:
        return self.info["listen_addrs"][0]

    def client(self, timeout: float = 30.0) -> RPCClient:
        return RPCClient(self.info["rpc_url"], read_cookie(self.home), timeout=timeout)

    def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        return self.client(timeout).call(method, params)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric's samples whose labels include `labels` (0 if none)."""
        url = self.info["rpc_url"] + "metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            if series.split("{")[0] == name and all(
                f'{k}="{v}"' in series for k, v in labels.items()
            ):
                total += float(value)
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or power loss would leave it."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def found_counts(daemons: list[DaemonProcess]) -> dict[str, int]:
    """For each daemon's peer id: how many daemons (itself included) find it via nodes_find."""
    counts = {d.peer_id: 0 for d in daemons}
    for daemon in daemons:
        try:
            records = daemon.client(timeout=10).call("nodes_find", {})
        except (DaemonUnreachable, RPCCallError):
            continue
        for record in records:
            if record["peer_id"] in counts:
                counts[record["peer_id"]] += 1
    return counts


def all_found(daemons: list[DaemonProcess]) -> bool:
    return all(count == len(daemons) for count in found_counts(daemons).values())


class Devnet:
    """N chained daemons under one temporary directory; a context manager that cleans up."""

    def __init__(
        self,
        size: int = 4,
        root: Path | None = None,
        config: Path = DEVNET_CONFIG,
        env: dict[str, str] | None = None,
        node_configs: dict[int, Path] | None = None,
    ):
        """`node_configs`: the config file of the daemon at that index, instead of `config`."""
        if size < 1:
            raise DevnetError("a devnet needs at least one daemon")
        self.size = size
        self.config = config
        self.env = env or {}
        self.node_configs = node_configs or {}
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="gridmesh-devnet-"))
        self.daemons: list[DaemonProcess] = []

    def start(self) -> Devnet:
        for index in range(self.size):
            bootstrap = [self.daemons[-1].addr] if self.daemons else []
            daemon = DaemonProcess(
                self.root / f"node{index}",
                config=self.node_configs.get(index, self.config),
                bootstrap=bootstrap,
                env=self.env,
            )
            self.daemons.append(daemon)
            daemon.start()
        return self

    def wait_all_found(self, timeout_s: float = 30.0) -> None:
        last: dict[str, int] = {}

        def found() -> bool:
            last.update(found_counts(self.daemons))
            return all(count == self.size for count in last.values())

        try:
            wait_for(found, timeout_s, f"all {self.size} daemons to find each other", poll_s=0.2)
        except DevnetError as exc:  # say who was missing: how many found each daemon last
            seen = ", ".join(f"{peer[-8:]}: {count}" for peer, count in last.items())
            raise DevnetError(f"{exc} (found by, at the end: {seen})") from None

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Devnet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
