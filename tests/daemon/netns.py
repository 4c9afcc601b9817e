"""Network namespaces (iproute2) for tests that cut real daemons off from each other.

`Lan` makes one namespace per node, each joined by a veth pair to a bridge in a hub namespace
(10.77.0.0/24; nothing reaches the host's own interfaces). `partition(indices)` moves those
nodes' hub-side ports to a second bridge: they still reach each other, and nothing else
(a minority partition); `heal` moves them back. Every name carries a random tag, so runs
never collide, and `close` deletes every namespace made (the veths and the bridges go with
them); it runs on failure too. `NetnsDaemon` is a `gridmesh daemon` process inside a node's
namespace: its JSON-RPC answers on that namespace's 127.0.0.1 only, so its calls and `metric`
run in a thread that has entered the namespace (setns(2) moves only the calling thread).

`unavailable()` says why namespaces cannot be used here (not root, no `ip`, or making one
fails), for a test to skip with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import secrets
import shutil
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from daemon.devnet import DaemonProcess

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = Path("/run/netns")
SUBNET = "10.77.0"


def ip(*args: str) -> None:
    """Run `ip ARGS`; CalledProcessError with ip's message if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(
            done.returncode, ["ip", *args], done.stdout, done.stderr
        )


def unavailable() -> str | None:
    """Why network namespaces cannot be used here; None if they can."""
    if os.geteuid() != 0:
        return "network namespaces need root (iproute2 `ip netns add`)"
    if shutil.which("ip") is None:
        return "no `ip` binary (iproute2)"
    name = f"gmprobe{secrets.token_hex(3)}"
    try:
        ip("netns", "add", name)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"`ip netns add` fails here: {getattr(exc, 'stderr', '') or exc}"
    with contextlib.suppress(subprocess.CalledProcessError):
        ip("netns", "del", name)
    return None


def in_netns(name: str, fn: Callable[[], T]) -> T:
    """`fn()` in a new thread that has entered network namespace `name` (its sockets are
    that namespace's for good; the thread ends with the call)."""
    libc = ctypes.CDLL(None, use_errno=True)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            fd = os.open(NETNS_DIR / name, os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({name}): {os.strerror(err)}")
            finally:
                os.close(fd)
            out["value"] = fn()
        except BaseException as exc:  # handed to the caller's thread
            out["error"] = exc

    thread = threading.Thread(target=run, name=f"netns-{name}", daemon=True)
    thread.start()
    thread.join()
    if "error" in out:
        raise out["error"]
    return out["value"]  # type: ignore[no-any-return]


class Lan:
    """`size` namespaces on one bridge (in a hub namespace), with addresses 10.77.0.1.."""

    def __init__(self, size: int) -> None:
        self.tag = secrets.token_hex(3)
        self.hub = f"gm{self.tag}h"
        self.nodes = [f"gm{self.tag}n{i}" for i in range(size)]
        self.made: list[str] = []

    def addr(self, index: int) -> str:
        return f"{SUBNET}.{index + 1}"

    def _hub_side(self, index: int) -> str:
        return f"gm{self.tag}h{index}"  # at most 15 characters (IFNAMSIZ)

    def open(self) -> Lan:
        try:
            for name in (self.hub, *self.nodes):
                ip("netns", "add", name)
                self.made.append(name)
                ip("-n", name, "link", "set", "lo", "up")
            for bridge in ("br0", "br1"):
                ip("-n", self.hub, "link", "add", bridge, "type", "bridge")
                ip("-n", self.hub, "link", "set", bridge, "up")
            for index, node in enumerate(self.nodes):
                hub_side, node_side = self._hub_side(index), f"gm{self.tag}e{index}"
                ip(
                    "-n",
                    self.hub,
                    "link",
                    "add",
                    hub_side,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    node_side,
                )
                ip("-n", self.hub, "link", "set", node_side, "netns", node)
                ip("-n", self.hub, "link", "set", hub_side, "master", "br0")
                ip("-n", self.hub, "link", "set", hub_side, "up")
                ip("-n", node, "link", "set", node_side, "name", "eth0")
                ip("-n", node, "addr", "add", f"{self.addr(index)}/24", "dev", "eth0")
                ip("-n", node, "link", "set", "eth0", "up")
        except BaseException:
            self.close()
            raise
        return self

    def partition(self, indices: list[int]) -> None:
        """Put nodes `indices` on a segment of their own: they reach each other only."""
        for index in indices:
            ip("-n", self.hub, "link", "set", self._hub_side(index), "master", "br1")

    def heal(self) -> None:
        """Every node on the one segment again."""
        for index in range(len(self.nodes)):
            ip("-n", self.hub, "link", "set", self._hub_side(index), "master", "br0")

    def close(self) -> None:
        """Delete every namespace made (their links go with them)."""
        for name in reversed(self.made):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", name)
        self.made.clear()

    def __enter__(self) -> Lan:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()


class NetnsDaemon(DaemonProcess):
    """A daemon process in namespace `netns`, listening on `address` there."""

    def __init__(self, home: Path, netns: str, address: str, **kwargs: Any) -> None:
        super().__init__(
            home,
            listen=f"/ip4/{address}/tcp/0",
            prefix=["ip", "netns", "exec", netns],
            **kwargs,
        )
        self.netns = netns

    def client(self, timeout: float = 30.0) -> Any:
        return _NetnsClient(self.netns, super().client(timeout))

    def metric(self, name: str, **labels: str) -> float:
        parent = super().metric
        return in_netns(self.netns, lambda: parent(name, **labels))


class _NetnsClient:
    """An RPCClient whose calls are made from inside a namespace."""

    def __init__(self, netns: str, client: Any) -> None:
        self.netns = netns
        self.inner = client

    def call(self, method: str, params: Any = None) -> Any:
        return in_netns(self.netns, lambda: self.inner.call(method, params))
