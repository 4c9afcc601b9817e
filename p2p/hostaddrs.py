"""Addresses of the libp2p host (split out of `p2p.host`): what it announces (identify,
resource records), and `/dns4|dns6|dns/NAME/...` addresses resolved when they are dialled."""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import multiaddr
import trio

from p2p.addrs import dialable_addrs, ip_and_port


def on_listen_ports(
    candidates: list[multiaddr.Multiaddr], transport_addrs: list[multiaddr.Multiaddr]
) -> list[multiaddr.Multiaddr]:
    """Dialable `candidates` on the ports we listen on (`transport_addrs`): observed addresses
    on other ports (the ephemeral ports of our own dials) are left out."""
    ports = set()
    for own in transport_addrs:
        with contextlib.suppress(ValueError):
            ports.add(ip_and_port(own)[1])
    kept = []
    for addr in dialable_addrs(candidates):
        try:
            port = ip_and_port(addr)[1]
        except ValueError:
            kept.append(addr)
            continue
        if port in ports:
            kept.append(addr)
    return kept


DNS_PROTOCOLS = {"dns": socket.AF_UNSPEC, "dns4": socket.AF_INET, "dns6": socket.AF_INET6}
DNS_TIMEOUT_S = 5.0


async def resolve(addr: multiaddr.Multiaddr) -> list[multiaddr.Multiaddr]:
    """`addr` with a DNS name replaced by each address it resolves to now (the system's
    resolver: /etc/hosts included, which py-libp2p's own resolver skips); other addresses as
    they are. OSError when the name resolves to nothing in time."""
    text = str(addr)
    proto, _, rest = text[1:].partition("/")
    if proto not in DNS_PROTOCOLS:
        return [addr]
    name, _, tail = rest.partition("/")
    with trio.move_on_after(DNS_TIMEOUT_S):
        infos = await trio.socket.getaddrinfo(name, None, DNS_PROTOCOLS[proto], socket.SOCK_STREAM)
        found = dict.fromkeys(  # in the resolver's order, once each
            f"/{'ip6' if family == socket.AF_INET6 else 'ip4'}/{sockaddr[0]}/{tail}"
            for family, _, _, _, sockaddr in infos
        )
        if found:
            return [multiaddr.Multiaddr(a) for a in found]
    raise OSError(f"{name!r} did not resolve to an address within {DNS_TIMEOUT_S} s")


async def dial_resolved(
    dial: Callable[[multiaddr.Multiaddr, Any], Awaitable[Any]], addr: multiaddr.Multiaddr, peer: Any
) -> None:
    """Dial `addr` (each address its DNS name resolves to, until one answers)."""
    error: Exception | None = None
    for target in await resolve(addr):
        try:
            await dial(target, peer)
            return
        except Exception as exc:  # the next address may answer
            error = exc
    assert error is not None
    raise error
