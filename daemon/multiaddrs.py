"""What a multiaddr in the settings must look like: where to listen, whom to join.

Checked by text, with the stdlib only (the CLI imports this before anything heavy); libp2p
parses the addresses again when it listens and dials.
"""

from __future__ import annotations

import re

# A libp2p multiaddr this daemon can listen on or dial: /ip4|ip6|dns|dns4|dns6/HOST/tcp/PORT.
TRANSPORT = re.compile(r"/(ip4|ip6|dns|dns4|dns6)/([^/]+)/tcp/(\d{1,5})")
# A base58btc peer id (Ed25519 ids start 12D3KooW, older RSA ids Qm).
_PEER_ID = re.compile(r"[1-9A-HJ-NP-Za-km-z]{40,64}")
# A DNS name: dot-separated labels of 1..63 letters, digits and inner '-', 253 at most.
_DNS_NAME = re.compile(r"(?=.{1,253}\.?$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+")
LISTEN_EXAMPLE = "/ip4/0.0.0.0/tcp/4001 (tcp/0 picks a free port)"
BOOTSTRAP_EXAMPLE = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."


def _check_transport(addr: str) -> str | None:
    """Why `addr`'s /ip4|ip6|dns.../tcp/PORT part is wrong, or None (the rest unchecked)."""
    import ipaddress  # only when an address is checked: every CLI command imports this module

    match = TRANSPORT.match(addr)
    if match is None:
        return "expected /ip4/ADDRESS/tcp/PORT (or /ip6/..., /dns/NAME/...)"
    proto, host, port = match.groups()
    if int(port) > 65535:
        return f"tcp port {port} is not a TCP port (0..65535)"
    try:
        if proto == "ip4":
            ipaddress.IPv4Address(host)
        elif proto == "ip6":
            ipaddress.IPv6Address(host)
    except ValueError:
        return f"{host[:40]!r} is not an {proto} address"
    if proto.startswith("dns") and not _DNS_NAME.fullmatch(host):
        return f"{host[:40]!r} is not a DNS name (labels of letters, digits and '-', dot-separated)"
    return None


def listen_error(addr: str) -> str | None:
    """Why `addr` cannot be a listen multiaddr, or None."""
    problem = _check_transport(addr)
    if problem is None and not addr.startswith(("/ip4/", "/ip6/")):
        # py-libp2p listens on every interface for a /dns address: never what was meant
        problem = "listen on an address, /ip4/ADDRESS/... or /ip6/ADDRESS/... (not /dns)"
    elif problem is None and TRANSPORT.fullmatch(addr) is None:
        problem = "a listen address ends with /tcp/PORT"
    return problem and f"{addr[:80]!r} is not a listen multiaddr: {problem}"


def bootstrap_error(addr: str) -> str | None:
    """Why `addr` cannot be a bootstrap multiaddr (it must name the peer), or None."""
    problem = _check_transport(addr)
    if problem is None:
        rest = addr[TRANSPORT.match(addr).end() :]  # type: ignore[union-attr]
        if not rest.startswith("/p2p/"):
            problem = "it must end with /p2p/<peer id> of the node to join"
        elif not _PEER_ID.fullmatch(rest[5:]):
            problem = f"{rest[5:][:60]!r} is not a peer id (12D3KooW...)"
    return problem and f"{addr[:80]!r} is not a bootstrap multiaddr: {problem}"
