"""Before a daemon starts: is every fixed port it will bind free? One clear line if not.

libp2p's TCP transport sets SO_REUSEPORT, so two daemons can both bind one fixed port (and
one then dials itself); the RPC and gRPC servers fail deep inside their start. Checking first
names the port, the setting and the flag that changes it.
"""

from __future__ import annotations

import errno
import socket

from daemon.config import TRANSPORT, Config


def _in_use(host: str, port: int, family: socket.AddressFamily) -> OSError | None:
    """The error binding host:port gives (EADDRINUSE, EADDRNOTAVAIL, ...), or None if free."""
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as servers do
        try:
            sock.bind((host, port))
        except OSError as exc:
            return exc
    return None


def _reason(exc: OSError) -> str:
    if exc.errno == errno.EADDRINUSE:
        return "is already in use (by another daemon?)"
    if exc.errno == errno.EADDRNOTAVAIL:
        return "is not an address of this machine"
    if exc.errno == errno.EACCES:
        return "needs privileges (ports below 1024)"
    return f"cannot be bound ({exc.strerror or exc})"


def port_problems(config: Config) -> list[str]:
    """One line per address of `config` this process could not bind now (ports 0 included
    for libp2p: an address that is not this machine's)."""
    problems = []
    checks: list[tuple[str, str, int, socket.AddressFamily, str]] = [
        ("rpc.port", "127.0.0.1", config.rpc.port, socket.AF_INET, "--rpc-port"),
    ]
    if config.grpc.enabled:
        checks.append(("grpc.port", "127.0.0.1", config.grpc.port, socket.AF_INET, "--grpc-port"))
    for setting, host, port, family, flag in checks:
        if port and (exc := _in_use(host, port, family)):
            problems.append(
                f"{setting} {port} on {host} {_reason(exc)}: choose another with {flag} N, "
                f"or {flag} 0 for a free one"
            )
    for addr in config.p2p.listen:
        match = TRANSPORT.match(addr)
        if match is None or match.group(1) not in ("ip4", "ip6"):
            continue
        proto, host, port = match.group(1), match.group(2), int(match.group(3))
        family = socket.AF_INET if proto == "ip4" else socket.AF_INET6
        if exc := _in_use(host, port, family):
            if exc.errno != errno.EADDRINUSE:
                problems.append(f"p2p.listen {addr}: {host} {_reason(exc)}")
                continue
            free = addr[: match.start(3)] + "0"
            problems.append(
                f"p2p.listen {addr}: port {port} {_reason(exc)}: choose another with "
                f"--listen, e.g. --listen {free} for a free one"
            )
    return problems
