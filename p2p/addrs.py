"""Addresses of this host: which TCP addresses are ours, dialable, and free to listen on.

py-libp2p sets SO_REUSEPORT and carries on when a bind fails, and advertises 0.0.0.0
(DESIGN.md, "Known pitfalls"): these helpers let the host refuse a taken port clearly and
announce only addresses a peer can dial.
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import socket

import multiaddr

from p2p.network import NetworkError


class ListenError(NetworkError):
    """This node cannot listen where it was told to (the message names the address)."""


def ip_and_port(addr: multiaddr.Multiaddr) -> tuple[str, int]:
    """(ip, tcp port) of an /ip4 or /ip6 TCP multiaddr; ValueError for anything else."""
    protocols = {p.name for p in addr.protocols()}
    if "tcp" not in protocols:
        raise ValueError("not a TCP address")
    for name in ("ip4", "ip6"):
        if name in protocols:
            return addr.value_for_protocol(name), int(addr.value_for_protocol("tcp"))
    raise ValueError("not an IP address")


def is_local_ip(host: str) -> bool:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    return ip.is_loopback or ip.is_unspecified or host in interface_ips(ip.version)


def check_listen_free(listen: list[multiaddr.Multiaddr]) -> None:
    """Fail clearly when a fixed TCP port is taken, or the address is not this host's.

    py-libp2p sets SO_REUSEPORT, so a second daemon would bind the same port silently and the
    two would then dial themselves; and it carries on without listening when a bind fails.
    This probe binds without SO_REUSEPORT: it fails while anyone listens there.
    """
    for addr in listen:
        try:
            host, port = ip_and_port(addr)
        except ValueError:
            continue
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((host, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    why = "is in use (another daemon?); use another port, or tcp/0 for any free one"
                elif exc.errno == errno.EADDRNOTAVAIL:
                    why = "is not an address of this host"
                else:
                    why = f"cannot be bound ({exc.strerror or exc})"
                raise ListenError(f"cannot listen on {addr}: {host}:{port} {why}") from None


def interface_ips(version: int) -> list[str]:
    """This host's non-loopback addresses of one IP version (best effort, no extra deps)."""
    family = socket.AF_INET if version == 4 else socket.AF_INET6
    found: list[str] = []
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, family, socket.SOCK_STREAM):
            found.append(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_DGRAM) as probe:
        # connecting a UDP socket sends nothing; it picks the interface of the default route
        probe.connect(("192.0.2.1", 9) if version == 4 else ("2001:db8::1", 9))
        found.append(str(probe.getsockname()[0]))
    out = []
    for text in found:
        try:
            ip = ipaddress.ip_address(text.split("%")[0])
        except ValueError:
            continue
        if not (ip.is_loopback or ip.is_unspecified or ip.is_link_local) and str(ip) not in out:
            out.append(str(ip))
    return out


def is_own_addr(addr: multiaddr.Multiaddr, own_addrs: list[multiaddr.Multiaddr]) -> bool:
    """True when `addr` is one of the TCP listeners `own_addrs` (dialling it reaches ourselves)."""
    try:
        host, port = ip_and_port(addr)
    except ValueError:
        return False
    for own in own_addrs:
        try:
            own_host, own_port = ip_and_port(own)
        except ValueError:
            continue
        if port != own_port:
            continue
        if own_host == host or (
            ipaddress.ip_address(own_host).is_unspecified and is_local_ip(host)
        ):
            return True
    return False


def dialable_addrs(addrs: list[multiaddr.Multiaddr]) -> list[multiaddr.Multiaddr]:
    """Replace 0.0.0.0 (or ::) by this host's addresses, or loopback when it has no other."""
    out: list[multiaddr.Multiaddr] = []
    for addr in addrs:
        try:
            host, port = ip_and_port(addr)
        except ValueError:
            out.append(addr)
            continue
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified:
            out.append(addr)
            continue
        proto = "ip4" if ip.version == 4 else "ip6"
        loopback = "127.0.0.1" if ip.version == 4 else "::1"
        for local in interface_ips(ip.version) or [loopback]:
            out.append(multiaddr.Multiaddr(f"/{proto}/{local}/tcp/{port}"))
    seen: set[str] = set()
    return [a for a in out if not (str(a) in seen or seen.add(str(a)))]
