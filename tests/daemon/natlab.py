"""A small internet in network namespaces (iproute2 + iptables; root): one "public" host and
two private hosts, each behind its own NAT router that masquerades (Linux conntrack: port
preserving where it can, or random ports with `symmetric`; no inbound without a mapping).

    pub  203.0.113.1 ─┐
    natA 203.0.113.2 ─┼─ bridge (namespace `wan`)      natA ── 10.1.0.1/24 ── privA 10.1.0.2
    natB 203.0.113.3 ─┘                                natB ── 10.2.0.1/24 ── privB 10.2.0.2

The public side has no route to 10.x: private hosts are reached only through their NAT's
mappings (and new inbound connections are dropped at each NAT, as a home router does).
Nothing is joined to the host's own interfaces. Every name carries a random tag; `close`
deletes every namespace made (their links, bridges and rules go with them), on failure too.
`unavailable()` says why this cannot run here (not root, no `ip` or `iptables`).
"""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess

from tests.daemon.netns import ip
from tests.daemon.netns import unavailable as netns_unavailable

WAN = "203.0.113"
PUBLIC_ADDR = f"{WAN}.1"


def unavailable() -> str | None:
    why = netns_unavailable()
    if why is None and shutil.which("iptables") is None:
        why = "no `iptables` binary (apt-get install iptables)"
    return why


def run_in(netns: str, *args: str) -> None:
    done = subprocess.run(
        ["ip", "netns", "exec", netns, *args], capture_output=True, text=True, timeout=20
    )
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, args, done.stdout, done.stderr)


class NatLab:
    """`symmetric`: the NATs pick a random public port for every new flow (MASQUERADE
    --random-fully), so no address a peer observed predicts the next mapping; otherwise they
    keep the source port where they can (a port-preserving cone NAT, as most home routers)."""

    def __init__(self, symmetric: bool = False) -> None:
        self.symmetric = symmetric
        tag = secrets.token_hex(3)
        self.tag = tag
        self.wan, self.pub = f"gm{tag}w", f"gm{tag}p"
        self.nats = [f"gm{tag}na", f"gm{tag}nb"]
        self.privs = [f"gm{tag}a", f"gm{tag}b"]
        self.made: list[str] = []

    def private_addr(self, index: int) -> str:
        return f"10.{index + 1}.0.2"

    def nat_addr(self, index: int) -> str:
        return f"{WAN}.{index + 2}"

    def _veth(self, a: str, a_if: str, b: str, b_if: str) -> None:
        """A veth pair between namespaces `a` and `b`, named `a_if` and `b_if` there."""
        tmp_a, tmp_b = f"gm{self.tag}{secrets.token_hex(2)}", f"gm{self.tag}{secrets.token_hex(2)}"
        ip("-n", a, "link", "add", tmp_a, "type", "veth", "peer", "name", tmp_b)
        ip("-n", a, "link", "set", tmp_b, "netns", b)
        ip("-n", a, "link", "set", tmp_a, "name", a_if)
        ip("-n", b, "link", "set", tmp_b, "name", b_if)
        ip("-n", a, "link", "set", a_if, "up")
        ip("-n", b, "link", "set", b_if, "up")

    def open(self) -> NatLab:
        try:
            for name in (self.wan, self.pub, *self.nats, *self.privs):
                ip("netns", "add", name)
                self.made.append(name)
                ip("-n", name, "link", "set", "lo", "up")
            ip("-n", self.wan, "link", "add", "br0", "type", "bridge")
            ip("-n", self.wan, "link", "set", "br0", "up")
            self._veth(self.wan, "p0", self.pub, "eth0")
            ip("-n", self.wan, "link", "set", "p0", "master", "br0")
            ip("-n", self.pub, "addr", "add", f"{PUBLIC_ADDR}/24", "dev", "eth0")
            for index, (nat, priv) in enumerate(zip(self.nats, self.privs, strict=True)):
                self._veth(self.wan, f"n{index}", nat, "wan0")
                ip("-n", self.wan, "link", "set", f"n{index}", "master", "br0")
                ip("-n", nat, "addr", "add", f"{self.nat_addr(index)}/24", "dev", "wan0")
                self._veth(nat, "lan0", priv, "eth0")
                ip("-n", nat, "addr", "add", f"10.{index + 1}.0.1/24", "dev", "lan0")
                ip("-n", priv, "addr", "add", f"{self.private_addr(index)}/24", "dev", "eth0")
                ip("-n", priv, "route", "add", "default", "via", f"10.{index + 1}.0.1")
                run_in(nat, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
                run_in(
                    nat,
                    "iptables",
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-o",
                    "wan0",
                    "-j",
                    "MASQUERADE",
                    *(["--random-fully"] if self.symmetric else []),
                )
                # a home router: replies and mapped flows come in; new connections are
                # dropped silently, to the router itself too (no RST that would end a punch)
                for chain in ("FORWARD", "INPUT"):
                    run_in(
                        nat,
                        "iptables",
                        "-A",
                        chain,
                        "-i",
                        "wan0",
                        "-m",
                        "conntrack",
                        "--ctstate",
                        "NEW,INVALID",
                        "-j",
                        "DROP",
                    )
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for name in reversed(self.made):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", name)
        self.made.clear()

    def __enter__(self) -> NatLab:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
