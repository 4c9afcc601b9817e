"""Addresses: which TCP addresses are ours, free to listen on, and worth telling peers;
and which of the addresses a peer gives are worth dialling.

py-libp2p sets SO_REUSEPORT and carries on when a bind fails, and advertises 0.0.0.0
(DESIGN.md, "Known pitfalls"): these helpers let the host refuse a taken port clearly and
announce only addresses a peer can dial. Where each check is made: see `advertised`'s
section below.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import ipaddress
import math
import re
import socket
import time
from collections.abc import Iterable

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


_INTERFACES_TTL_S = 30.0  # interfaces change rarely; the host's addresses are read often
_interfaces: dict[int, tuple[float, list[str]]] = {}  # IP version -> (when read, addresses)


def interface_ips(version: int) -> list[str]:
    """This host's non-loopback addresses of one IP version (best effort, no extra deps),
    read at most every _INTERFACES_TTL_S: resolving the host name may block, and every
    identify answer and record asks for them."""
    read_at, found = _interfaces.get(version, (-math.inf, []))
    if time.monotonic() - read_at > _INTERFACES_TTL_S:
        found = _read_interface_ips(version)
        _interfaces[version] = (time.monotonic(), found)
    return list(found)


def _read_interface_ips(version: int) -> list[str]:
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


# -- who may be given which address, and what a peer's addresses are worth ---------------
#
# Where the filtering is done, and why both sides:
# - At publication (`advertised`, used for the host's addresses: identify, the signed peer
#   record, the DHT resource record, Kademlia's answers about us, a relay's reservation
#   answer): never 0.0.0.0 or ::, nothing unusable, public addresses first, and loopback or
#   link-local ones only when the node has no other (a peer on the same host dials the
#   others as well). The DHT record is read by everyone and cannot tell a peer on our host
#   from a remote one: it carries them only while every peer known is on this host
#   (`for_everyone`). Identify, Kademlia and AutoNAT messages can tell, and `p2p.addrguard`
#   leaves loopback and link-local addresses (and signed records that hold them) out of
#   those it sends to a peer that is not on this host (AutoNAT, which only dials back at
#   the address it sees us at, private ones too to a peer beyond our LAN).
# - By the reader, before a dial (`check_addrs` when a record is validated, `dial_order` when
#   its addresses are dialled): every address a peer gives is its word, untrusted. The reader
#   knows where it is, so "to a remote peer" is judged there: loopback and link-local
#   addresses name the dialler's own host (or link), and are dialled only when this node is
#   itself reachable on such addresses alone (a single-host network such as the devnet on
#   127.0.0.1: a peer that advertises loopback is then on our host, and one that is not
#   cannot be dialled directly anyway). Private (RFC 1918, fc00::/7, 100.64/10) addresses
#   are dialable within a LAN or behind one NAT and are always kept. What py-libp2p learns
#   of peers (identify, Kademlia, DCUtR) is checked the same way before it is stored, and so
#   before its swarm dials it (`p2p.addrguard`).

MAX_ADDRS = 32  # addresses a peer may give in one record
MAX_ADDR_CHARS = 512  # characters in one of them
# scopes, best first: an address anyone may dial, one within a LAN or site, one on this host
# or link only (loopback, link-local)
PUBLIC, PRIVATE, LOCAL = 0, 1, 2

_IP_PROTOCOLS = {"ip4": 4, "ip6": 6}
_DNS_PROTOCOLS = ("dns", "dns4", "dns6")
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{32,128}")  # base58btc
_DNS_LABEL = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
_PORT = re.compile(r"[0-9]{1,5}")
_MEMORY_ID = re.compile(r"[0-9]{1,19}")


class AddrRefused(ValueError):
    """A peer's address we will not dial; `reason` is what /metrics counts it as."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def ip_scope(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> int:
    """PUBLIC, PRIVATE or LOCAL (loopback, link-local); AddrRefused for an IP nobody can
    dial (unspecified, multicast, the broadcast address)."""
    if ip.is_unspecified:
        raise AddrRefused("unspecified")
    if ip.is_multicast or ip == ipaddress.IPv4Address("255.255.255.255"):
        raise AddrRefused("multicast")
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip_scope(ip.ipv4_mapped)
    if ip.is_loopback or ip.is_link_local:
        return LOCAL
    if ip.is_global:
        return PUBLIC
    return PRIVATE  # RFC 1918, unique-local, 100.64/10 and the rest: dialable nearby


def _direct(parts: list[str]) -> tuple[str, int]:
    """`[proto, host, "tcp", port]` as (canonical text, scope); AddrRefused otherwise."""
    proto, host, transport, port_text = parts
    if transport != "tcp":
        raise AddrRefused("unsupported")
    if not _PORT.fullmatch(port_text) or int(port_text) > 65535:
        raise AddrRefused("malformed")
    port = int(port_text)
    if port == 0:
        raise AddrRefused("port_zero")
    if proto in _DNS_PROTOCOLS:
        name = host.lower()
        labels = (name[:-1] if name.endswith(".") else name).split(".")
        if len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
            raise AddrRefused("malformed")
        # a name's scope shows only once resolved; "localhost" is known beforehand
        scope = LOCAL if labels[-1] == "localhost" else PUBLIC
        return f"/{proto}/{name}/tcp/{port}", scope
    if proto not in _IP_PROTOCOLS or "%" in host:
        raise AddrRefused("unsupported" if proto not in _IP_PROTOCOLS else "malformed")
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise AddrRefused("malformed") from None
    if ip.version != _IP_PROTOCOLS[proto]:
        raise AddrRefused("malformed")
    return f"/{proto}/{ip}/tcp/{port}", ip_scope(ip)


def check_addr(text: str, peer_id: str) -> tuple[str, int]:
    """One address `peer_id` gave for itself, as (canonical text ending in /p2p/<peer_id>,
    scope), or AddrRefused with the reason (see `_check_addr`). Answers are remembered for
    the last 4096 addresses: the same records are read again at every refresh."""
    answer = _checked(text, peer_id)
    if isinstance(answer, str):
        raise AddrRefused(answer)
    return answer


@functools.lru_cache(maxsize=4096)
def _checked(text: str, peer_id: str) -> tuple[str, int] | str:
    try:
        return _check_addr(text, peer_id)
    except AddrRefused as exc:
        return exc.reason


def _check_addr(text: str, peer_id: str) -> tuple[str, int]:
    """`check_addr` itself.

    Only the shapes a gridmesh node dials are accepted (a whitelist, parsed as text: cheaper
    than py-multiaddr's parser, and nothing it does not know gets through):
    `/ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT[/p2p/PEER]`, the same through a relay
    (`.../p2p/RELAY/p2p-circuit[/p2p/PEER]`: its scope is the relay's), and the in-process
    `/memory/N[/p2p/PEER]` and bare `/p2p/PEER` (the in-memory network's). The last /p2p/
    part, where given, must be `peer_id`: an address naming another peer would have every
    reader dial that one.
    """
    if len(text) > MAX_ADDR_CHARS:
        raise AddrRefused("too_long")
    if not text.startswith("/") or "//" in text:
        raise AddrRefused("malformed")
    parts = text[1:].rstrip("/").split("/")
    if len(parts) >= 2 and parts[-2] == "p2p":
        if parts[-1] != peer_id:
            raise AddrRefused("wrong_peer" if _PEER_ID.fullmatch(parts[-1]) else "malformed")
        parts = parts[:-2]
    suffix = f"/p2p/{peer_id}"
    if not parts:
        return suffix, PUBLIC  # no place: the dialler's transport finds the peer
    if parts[0] == "memory":  # an in-process transport: this host only
        if len(parts) != 2 or not _MEMORY_ID.fullmatch(parts[1]):
            raise AddrRefused("malformed")
        return f"/memory/{int(parts[1])}{suffix}", LOCAL
    if parts[-1] == "p2p-circuit":
        if len(parts) != 7 or parts[4] != "p2p":
            raise AddrRefused("malformed" if len(parts) < 7 else "unsupported")
        relay = parts[5]
        if not _PEER_ID.fullmatch(relay):
            raise AddrRefused("malformed")
        if relay == peer_id:
            raise AddrRefused("wrong_peer")
        place, scope = _direct(parts[:4])
        return f"{place}/p2p/{relay}/p2p-circuit{suffix}", scope
    if len(parts) != 4:
        raise AddrRefused("malformed" if len(parts) < 4 else "unsupported")
    place, scope = _direct(parts)
    return place + suffix, scope


def check_addrs(texts: list[str], peer_id: str) -> tuple[list[str], list[str]]:
    """The addresses `peer_id` gave that are worth dialling, as it wrote them (what it
    signed), once each, in its order (at most MAX_ADDRS read); and the reason for each one
    dropped."""
    kept: list[str] = []
    seen: set[str] = set()
    dropped: list[str] = []
    for index, text in enumerate(texts):
        if index >= MAX_ADDRS:
            dropped.append("too_many")
            continue
        try:
            addr, _ = check_addr(text, peer_id)
        except AddrRefused as exc:
            dropped.append(exc.reason)
            continue
        if addr not in seen:
            seen.add(addr)
            kept.append(text)
    return kept, dropped


def local_only(own: list[str]) -> bool:
    """Whether this node, advertising `own`, can be dialled directly only from its own host:
    it has direct addresses and all are loopback or link-local (a devnet on 127.0.0.1)."""
    scopes = []
    for text in own:
        place = text.split("/p2p/")[0]  # bare /p2p/ addresses name no place
        if place and "/p2p-circuit" not in text:  # relayed ones: the relay's place, not ours
            with contextlib.suppress(AddrRefused):
                scopes.append(check_addr(place, "")[1])
    return bool(scopes) and all(scope == LOCAL for scope in scopes)


def _place_scope(text: str) -> int | None:
    """The scope of the place an address names (a relay's, for a relayed one); None where
    it names none (a bare /p2p/ address) or is unusable."""
    place = text.split("/p2p/")[0]
    if not place:
        return None
    try:
        return check_addr(place, "")[1]
    except AddrRefused:
        return None


def for_everyone(own: list[str], peers: Iterable[list[str]]) -> list[str]:
    """Our addresses `own` as a record every peer of the network may read carries them
    (the DHT resource record: its holders serve it to anyone, so it cannot be tailored per
    reader as identify and Kademlia are, `p2p.addrguard`): loopback and link-local ones only
    while no peer known (`peers`: each one's addresses) is placed beyond a host, so all are
    on ours (a devnet on 127.0.0.1); the others as they are. A reader elsewhere could not
    dial a local address, and would only learn of this host from it."""
    local = [text for text in own if _place_scope(text) == LOCAL]
    if not local:
        return own
    for addrs in peers:
        if any(_place_scope(text) not in (None, LOCAL) for text in addrs[:MAX_ADDRS]):
            return [text for text in own if text not in local]
    return own


def dial_order(texts: list[str], peer_id: str, *, local: bool) -> list[str]:
    """The addresses of `peer_id` this node may dial, in the order given: well-formed and
    usable (`check_addr`), and loopback or link-local ones only when `local` (this node is
    on a single host's network, see `local_only`). At most MAX_ADDRS are read."""
    out: list[str] = []
    for text in texts[:MAX_ADDRS]:
        try:
            addr, scope = check_addr(text, peer_id)
        except AddrRefused:
            continue
        if (scope != LOCAL or local) and addr not in out:
            out.append(addr)
    return out


def advertised(
    direct: list[multiaddr.Multiaddr], relayed: list[multiaddr.Multiaddr]
) -> list[multiaddr.Multiaddr]:
    """What this node tells every peer it can be dialled at (`direct`: listen and confirmed
    observed addresses; `relayed`: .../p2p/RELAY/p2p-circuit), without any /p2p/ of its own:
    never 0.0.0.0 or :: (replaced by this host's addresses), nothing unusable, loopback and
    link-local ones only when there is no other direct address; public ones first (direct,
    then relayed), then private ones, then local ones; once each, at most MAX_ADDRS."""
    ranked: list[tuple[int, int, multiaddr.Multiaddr]] = []
    for kind, addrs in ((0, dialable_addrs(direct)), (1, relayed)):
        for addr in addrs:
            text = str(addr)
            if kind == 0 and "/p2p/" in text:
                text = text.split("/p2p/")[0]
            try:
                _, scope = check_addr(text, "")  # "": no /p2p/ of ours in it
            except AddrRefused:
                continue
            ranked.append((scope, kind, multiaddr.Multiaddr(text)))
    if any(scope != LOCAL and kind == 0 for scope, kind, _ in ranked):
        ranked = [r for r in ranked if r[0] != LOCAL]
    ranked.sort(key=lambda r: (r[0], r[1]))  # stable: the given order within a rank
    out: list[multiaddr.Multiaddr] = []
    seen: set[str] = set()
    for _, _, addr in ranked:
        if str(addr) not in seen and len(out) < MAX_ADDRS:
            seen.add(str(addr))
            out.append(addr)
    return out
