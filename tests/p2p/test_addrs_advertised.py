"""A node advertises only addresses others can dial, and dials only usable addresses of what
its peers advertise (issue 19, item 4; p2p.addrs).

- Publication (`advertised`, the host's `get_addrs`): never 0.0.0.0 or ::, loopback and
  link-local only when there is no other address, observed addresses only once confirmed
  (AutoNAT, or a second observer), relayed ones where held, public ones first.
- Reading (`check_addrs` in every record's validation, `dial_order` before a dial): a peer's
  addresses are bounded, parsed, the unusable ones dropped and counted; loopback is dialled
  only by a node that is itself on loopback alone (a single host's network: the devnet).
- A hostile peer on the in-memory network publishes a signed record full of bad addresses:
  they are counted, none is dialled, and the good ones are.
"""

from __future__ import annotations

import collections
import ipaddress
from contextlib import AsyncExitStack
from types import SimpleNamespace

import multiaddr
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID

from p2p import addrs as addrs_module
from p2p import identity, records
from p2p.addrs import (
    LOCAL,
    MAX_ADDRS,
    PRIVATE,
    PUBLIC,
    AddrRefused,
    advertised,
    check_addr,
    check_addrs,
    dial_order,
    local_only,
)
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.host import Libp2pNetwork
from p2p.reach import ReachSettings
from p2p.testing.memnet import MemoryNetwork

# fixed identities: they name parametrized tests, which every xdist worker must collect alike
PEER = identity.NodeIdentity(bytes([1]) * 32, bytes([11]) * 32).peer_id
OTHER = identity.NodeIdentity(bytes([2]) * 32, bytes([12]) * 32).peer_id
RELAY = identity.NodeIdentity(bytes([3]) * 32, bytes([13]) * 32).peer_id
NET = "addrtest"

# (address, why it is dropped)
BAD = [
    ("/ip4/0.0.0.0/tcp/4001", "unspecified"),
    (f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}", "unspecified"),
    ("/ip6/::/tcp/4001", "unspecified"),
    ("/ip6/::ffff:0.0.0.0/tcp/4001", "unspecified"),
    ("/ip4/224.0.0.251/tcp/4001", "multicast"),
    ("/ip4/255.255.255.255/tcp/4001", "multicast"),
    ("/ip6/ff02::1/tcp/4001", "multicast"),
    ("/ip4/1.2.3.4/tcp/0", "port_zero"),
    (f"/ip4/1.2.3.4/tcp/0/p2p/{PEER}", "port_zero"),
    ("/dns4/node.example.org/tcp/0", "port_zero"),
    ("/ip4/300.1.2.3/tcp/4001", "malformed"),
    ("/ip4/1.2.3.4/tcp/65536", "malformed"),
    ("/ip4/1.2.3.4/tcp/-1", "malformed"),
    ("/ip4/1.2.3.4/tcp/\u00b2", "malformed"),  # a digit to str.isdigit, not to int()
    ("/ip4/::1/tcp/4001", "malformed"),
    ("/ip6/fe80::1%eth0/tcp/4001", "malformed"),
    ("/dns4/exa mple.org/tcp/4001", "malformed"),
    ("/dns4/" + "a" * 64 + ".org/tcp/4001", "malformed"),
    ("garbage", "malformed"),
    ("", "malformed"),
    ("/ip4//tcp/4001", "malformed"),
    ("/p2p/not-a-peer-id", "malformed"),
    ("/memory/x", "malformed"),
    ("/ip4/1.2.3.4/udp/4001", "unsupported"),
    ("/ip4/1.2.3.4/udp/4001/quic-v1", "unsupported"),
    ("/ip4/1.2.3.4/tcp/4001/ws", "unsupported"),
    ("/unix/run/gridmesh.sock/x", "unsupported"),
    (f"/ip4/1.2.3.4/tcp/4001/p2p/{OTHER}", "wrong_peer"),
    (f"/p2p/{OTHER}", "wrong_peer"),
    (f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER}/p2p-circuit/p2p/{PEER}", "wrong_peer"),
    (f"/ip4/1.2.3.4/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{OTHER}", "wrong_peer"),
    ("/ip4/1.2.3.4/tcp/4001/" + "x" * 600, "too_long"),
]

# (address, its scope, the form it is dialled at)
GOOD = [
    ("/ip4/1.2.3.4/tcp/4001", PUBLIC, f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER}"),
    (f"/ip4/1.2.3.4/tcp/4002/p2p/{PEER}", PUBLIC, f"/ip4/1.2.3.4/tcp/4002/p2p/{PEER}"),
    ("/ip6/2001:4860:0:0::8888/tcp/4001", PUBLIC, f"/ip6/2001:4860::8888/tcp/4001/p2p/{PEER}"),
    ("/dns4/Node.Example.org/tcp/4001", PUBLIC, f"/dns4/node.example.org/tcp/4001/p2p/{PEER}"),
    ("/ip4/10.1.2.3/tcp/4001", PRIVATE, f"/ip4/10.1.2.3/tcp/4001/p2p/{PEER}"),
    ("/ip4/192.168.1.5/tcp/4001", PRIVATE, f"/ip4/192.168.1.5/tcp/4001/p2p/{PEER}"),
    ("/ip4/172.16.0.9/tcp/4001", PRIVATE, f"/ip4/172.16.0.9/tcp/4001/p2p/{PEER}"),
    ("/ip4/100.64.0.1/tcp/4001", PRIVATE, f"/ip4/100.64.0.1/tcp/4001/p2p/{PEER}"),
    ("/ip6/fd00::1/tcp/4001", PRIVATE, f"/ip6/fd00::1/tcp/4001/p2p/{PEER}"),
    (
        f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit",
        PUBLIC,
        f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
    ),
    (
        f"/ip4/10.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
        PRIVATE,
        f"/ip4/10.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
    ),
    (f"/p2p/{PEER}", PUBLIC, f"/p2p/{PEER}"),
    ("/ip4/127.0.0.1/tcp/4001", LOCAL, f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}"),
    ("/ip6/::1/tcp/4001", LOCAL, f"/ip6/::1/tcp/4001/p2p/{PEER}"),
    (
        "/ip6/::ffff:127.0.0.1/tcp/4001",
        LOCAL,
        f"/ip6/{ipaddress.ip_address('::ffff:127.0.0.1')}/tcp/4001/p2p/{PEER}",
    ),
    ("/ip4/169.254.10.1/tcp/4001", LOCAL, f"/ip4/169.254.10.1/tcp/4001/p2p/{PEER}"),
    ("/ip6/fe80::1/tcp/4001", LOCAL, f"/ip6/fe80::1/tcp/4001/p2p/{PEER}"),
    ("/dns4/localhost/tcp/4001", LOCAL, f"/dns4/localhost/tcp/4001/p2p/{PEER}"),
    ("/memory/3", LOCAL, f"/memory/3/p2p/{PEER}"),
]


# -- reading a peer's addresses -------------------------------------------------------


@pytest.mark.parametrize(("text", "reason"), BAD)
def test_unusable_addresses_are_refused_with_their_reason(text: str, reason: str) -> None:
    with pytest.raises(AddrRefused) as refused:
        check_addr(text, PEER)
    assert refused.value.reason == reason


@pytest.mark.parametrize(("text", "scope", "dialled"), GOOD)
def test_usable_addresses_are_kept_with_their_scope(text: str, scope: int, dialled: str) -> None:
    assert check_addr(text, PEER) == (dialled, scope)
    multiaddr.Multiaddr(dialled)  # what is dialled parses as the transport will parse it


_PARTS = ["", "ip4", "ip6", "tcp", "udp", "p2p", "p2p-circuit", "dns4", "memory", "1.2.3.4",
          "::1", "0", "4001", PEER, OTHER, RELAY, "%", "\u00b2", "a.b"]  # fmt: skip


@given(st.text(max_size=80) | st.lists(st.sampled_from(_PARTS), max_size=9).map(
    lambda parts: "/" + "/".join(parts)))  # fmt: skip
def test_any_text_is_refused_or_kept_as_a_dialable_address_of_the_peer(text: str) -> None:
    try:
        dialled, scope = check_addr(text, PEER)
    except AddrRefused as refused:
        assert refused.reason in {
            "unspecified", "multicast", "port_zero", "malformed", "unsupported",
            "wrong_peer", "too_long",
        }  # fmt: skip
        return
    assert scope in (PUBLIC, PRIVATE, LOCAL)
    assert dialled.endswith(f"/p2p/{PEER}")
    parsed = multiaddr.Multiaddr(dialled)
    assert parsed.value_for_protocol("p2p") in (PEER, RELAY, OTHER)


def test_a_record_keeps_its_usable_addresses_and_says_why_it_dropped_the_others() -> None:
    ident = identity.NodeIdentity.generate()
    good = [f"/ip4/1.2.3.4/tcp/4001/p2p/{ident.peer_id}", "/ip4/10.1.2.3/tcp/4001"]
    bad = [
        "/ip4/0.0.0.0/tcp/4001",
        "/ip4/224.0.0.1/tcp/4001",
        "/ip4/1.2.3.4/tcp/0",
        "/ip4/1.2.3/tcp/1",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{OTHER}",
    ]
    value = records.make_record(
        ident,
        network_id=NET,
        now=1000.0,
        valid_for=90.0,
        addrs=[bad[0], good[0], *bad[1:], good[1], good[0]],  # a duplicate too
        resources={},
    )
    record = records.validate_record(
        records.record_key(NET, ident.peer_id), value, now=1001.0, network_id=NET
    )
    assert record.addrs == good  # as signed, once each, in its order
    assert sorted(record.dropped_addrs) == sorted(
        ["unspecified", "multicast", "port_zero", "malformed", "wrong_peer"]
    )


def test_the_reader_counts_past_the_bound_and_dials_the_given_order() -> None:
    many = [f"/ip4/1.2.3.{i}/tcp/4001" for i in range(1, MAX_ADDRS + 6)]
    kept, dropped = check_addrs(many, PEER)
    assert kept == many[:MAX_ADDRS] and dropped == ["too_many"] * 5
    given_order = ["/ip4/10.0.0.1/tcp/1", "/ip4/1.2.3.4/tcp/1", "/ip4/127.0.0.1/tcp/1"]
    assert dial_order(given_order, PEER, local=False) == [
        f"/ip4/10.0.0.1/tcp/1/p2p/{PEER}",
        f"/ip4/1.2.3.4/tcp/1/p2p/{PEER}",
    ]
    assert dial_order(given_order, PEER, local=True)[-1] == f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}"
    assert dial_order([t for t, _ in BAD], PEER, local=True) == []


def test_loopback_is_dialled_only_by_a_node_on_loopback_alone() -> None:
    # the devnet: every node listens on 127.0.0.1, so a peer on loopback is on our host
    assert local_only([f"/ip4/127.0.0.1/tcp/4001/p2p/{PEER}", f"/ip6/::1/tcp/4001/p2p/{PEER}"])
    # loopback and a relayed address: still only directly reachable from this host
    assert local_only(
        [f"/ip4/127.0.0.1/tcp/1/p2p/{PEER}", f"/ip4/5.6.7.8/tcp/1/p2p/{RELAY}/p2p-circuit"]
    )
    # a node others can dial (private or public), or one with no address (in memory): no
    assert not local_only([f"/ip4/192.168.1.5/tcp/4001/p2p/{PEER}"])
    assert not local_only(["/ip4/127.0.0.1/tcp/1", "/ip4/1.2.3.4/tcp/1"])
    assert not local_only([f"/p2p/{PEER}"]) and not local_only([])


# -- what a node advertises -----------------------------------------------------------


def _texts(addrs: list[multiaddr.Multiaddr]) -> list[str]:
    return [str(a) for a in addrs]


def test_advertised_never_unspecified_public_first_loopback_only_alone(monkeypatch) -> None:
    monkeypatch.setattr(addrs_module, "interface_ips", lambda v: ["192.168.1.5"] if v == 4 else [])
    listen = [
        multiaddr.Multiaddr(f"/ip4/0.0.0.0/tcp/4001/p2p/{PEER}"),
        multiaddr.Multiaddr("/ip6/::/tcp/4001"),
        multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4002"),
    ]
    observed = [
        multiaddr.Multiaddr("/ip4/1.2.3.4/tcp/4001"),
        multiaddr.Multiaddr("/ip4/224.0.0.1/tcp/4001"),  # what a hostile peer might report
        multiaddr.Multiaddr("/ip4/1.2.3.4/tcp/0"),
    ]
    relayed = [
        multiaddr.Multiaddr(f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit"),
        multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/4003/p2p/{RELAY}/p2p-circuit"),
    ]
    assert _texts(advertised(listen + observed, relayed)) == [
        "/ip4/1.2.3.4/tcp/4001",
        f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit",
        "/ip4/192.168.1.5/tcp/4001",
    ]
    # a host with no other address (a devnet machine): loopback, and never 0.0.0.0
    monkeypatch.setattr(addrs_module, "interface_ips", lambda v: [])
    assert _texts(advertised(listen[:1], [])) == ["/ip4/127.0.0.1/tcp/4001"]
    assert _texts(advertised(listen[1:2], [])) == ["/ip6/::1/tcp/4001"]
    # (a relay others can reach makes this node reachable by others: that address first)
    assert _texts(advertised(listen[2:], relayed)) == [
        f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit",
        "/ip4/127.0.0.1/tcp/4002",
        f"/ip4/127.0.0.1/tcp/4003/p2p/{RELAY}/p2p-circuit",
    ]
    many = [multiaddr.Multiaddr(f"/ip4/1.2.3.{i}/tcp/4001") for i in range(1, 50)]
    assert len(advertised(many, [])) == MAX_ADDRS  # a record with more would be refused


# -- on real libp2p hosts (loopback) ---------------------------------------------------


class _AnyValue:
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def _host(
    listen: str = "/ip4/127.0.0.1/tcp/0",
    ident: identity.NodeIdentity | None = None,
    **reach: object,
) -> Libp2pNetwork:
    return Libp2pNetwork(
        ident or identity.NodeIdentity.generate(),
        network_id=NET,
        listen=[listen],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AnyValue(),
        reach=ReachSettings(**{"confirmations": 1, "check_s": 0.2, **reach}),  # type: ignore[arg-type]
    )


async def _wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll the state
            await trio.sleep(0.05)


class _Conn:
    """What py-libp2p's observed-address manager reads of a connection."""

    is_closed = False

    def __init__(self, muxed_conn: object) -> None:
        self.muxed_conn = muxed_conn


_CONNS: list[_Conn] = []  # the manager holds weak references to them


def _observe(net: Libp2pNetwork, seen_at: str, observer_ip: str) -> None:
    """What identify does when a peer at `observer_ip` tells `net` it sees it at `seen_at`
    (over a connection of its own: each call is another connection)."""
    conn = _Conn(SimpleNamespace(get_remote_address=lambda: (observer_ip, 40000)))
    _CONNS.append(conn)
    manager = net.host._observed_addr_manager  # type: ignore[attr-defined]
    manager.record_observation(conn, multiaddr.Multiaddr(seen_at), net.host.get_transport_addrs())


def _identified(net: Libp2pNetwork, peer_id: str) -> bool:
    """Whether `net` has had identify's answer from `peer_id` (its protocols are known)."""
    try:
        return bool(net.host.get_peerstore().get_protocols(ID.from_base58(peer_id)))
    except Exception:
        return False


async def test_a_host_on_0_0_0_0_never_tells_a_peer_or_the_dht_0_0_0_0(monkeypatch) -> None:
    monkeypatch.setattr(addrs_module, "interface_ips", lambda version: [])
    ident = identity.NodeIdentity.generate()
    a, b = _host("/ip4/0.0.0.0/tcp/0", ident), _host()
    async with AsyncExitStack() as stack:
        for net in (a, b):
            await stack.enter_async_context(net.run())
        port = a.host.get_transport_addrs()[0].value_for_protocol("tcp")
        assert a.listen_addrs() == [f"/ip4/127.0.0.1/tcp/{port}/p2p/{a.peer_id}"]
        await b.connect(a.listen_addrs()[0])
        await _wait_for(lambda: a.peer_id in b.connected_peers())
        # identify's listen addresses (and its signed peer record), as b stored them
        await _wait_for(lambda: _identified(b, a.peer_id))
        assert any(f"/tcp/{port}" in x for x in b.peer_addrs(a.peer_id))
        assert not any("0.0.0.0" in x for x in b.peer_addrs(a.peer_id))
        directory = ResourceDirectory(
            a, ident, DiscoverySettings(network_id=NET), lambda: (a.listen_addrs(), {})
        )
        value = directory.make_own_record()
        record = records.validate_record(
            records.record_key(NET, a.peer_id), value, now=a.now(), network_id=NET
        )
        assert record.addrs == a.listen_addrs() and record.dropped_addrs == ()


async def test_observed_addresses_are_advertised_once_confirmed_public_first() -> None:
    a, b = _host(hole_punch=False), _host(hole_punch=False)
    async with AsyncExitStack() as stack:
        for net in (a, b):
            await stack.enter_async_context(net.run())
        port = a.host.get_transport_addrs()[0].value_for_protocol("tcp")
        loopback = f"/ip4/127.0.0.1/tcp/{port}/p2p/{a.peer_id}"
        public = f"/ip4/1.2.3.4/tcp/{port}"
        _observe(a, public, "198.51.100.1")
        assert public in a.reach.info()["observed_addrs"]  # shown in node_info ...
        assert a.listen_addrs() == [loopback]  # ... not advertised: one peer's word
        _observe(a, public, "198.51.100.1")  # the same observer again: still one
        assert a.listen_addrs() == [loopback]
        _observe(a, public, "203.0.113.50")  # a second peer confirms it
        # public first; loopback no longer, now that an address others can dial exists
        assert a.listen_addrs() == [f"{public}/p2p/{a.peer_id}"]

        # AutoNAT: a NAT mapping (observed IP, our listen port) seen by one peer only is
        # advertised once a server dialled us back there, and only an address we asked for
        await b.connect(loopback)
        _observe(b, "/ip4/8.8.4.4/tcp/1", "198.51.100.1")  # its NAT mapped another port
        b_port = b.host.get_transport_addrs()[0].value_for_protocol("tcp")
        predicted = multiaddr.Multiaddr(f"/ip4/8.8.4.4/tcp/{b_port}")
        assert f"/ip4/8.8.4.4/tcp/{b_port}/p2p/{b.peer_id}" not in b.listen_addrs()
        # a server (faked: on loopback no real one sees 8.8.4.4) first names an address we
        # never asked to be tried, then the predicted one; b's own AutoNAT loop asks it too
        answer = [multiaddr.Multiaddr("/ip4/9.9.9.9/tcp/1").to_bytes()]
        asked: list[list[bytes]] = []

        async def server(peer, candidates, _deadline):  # type: ignore[no-untyped-def]
            asked.append(list(candidates))
            return AutoNATMessage.OK, answer[0]

        b.reach.autonat.query_server = server  # type: ignore[method-assign]
        await b.reach.check()
        assert asked and predicted.to_bytes() in asked[-1]
        assert not any("9.9.9.9" in x for x in b.listen_addrs())
        answer[0] = predicted.to_bytes()
        await b.reach.check()
        assert b.listen_addrs()[0] == f"{predicted}/p2p/{b.peer_id}"
        assert str(predicted) in b.reach.info()["confirmed_addrs"]


async def test_relayed_addresses_a_peer_gave_are_checked_before_the_swarm_dials_them() -> None:
    """A peer whose direct addresses fail is dialled through the relays its identify named
    (p2p.reach): unusable ones, and ones naming another peer, are never dialled."""
    net = _host()
    peer = ID.from_base58(PEER)
    given = [
        f"/ip4/0.0.0.0/tcp/4001/p2p/{RELAY}/p2p-circuit",
        f"/ip4/1.2.3.4/tcp/0/p2p/{RELAY}/p2p-circuit",
        f"/ip4/224.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{PEER}/p2p-circuit",  # through itself
        f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit",
        f"/ip4/127.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit",  # we are on loopback too
    ]
    # (not started: py-libp2p's auto-connector would dial the peer too; as if listening)
    listening = [multiaddr.Multiaddr("/ip4/127.0.0.1/tcp/4000")]
    net.host.get_transport_addrs = lambda: listening  # type: ignore[method-assign]
    # what identify stored (p2p.addrguard drops the unusable ones as they come, and counts
    # them; py-libp2p's own add_addrs here: the dial is what this test is about)
    net.addr_guard.trusted_add(peer, [multiaddr.Multiaddr(a) for a in given], 60)
    dialled: list[str] = []

    async def direct(peer_id: ID) -> list[object]:
        raise OSError("no direct address answers")

    async def through_relay(addr: multiaddr.Multiaddr) -> object:
        dialled.append(str(addr))
        raise OSError("the relay is gone")

    net.reach._swarm_dial_peer = direct  # type: ignore[assignment]
    net.reach.transport.dial = through_relay  # type: ignore[method-assign]
    with pytest.raises(OSError, match="no direct"):
        await net.reach._dial_peer(peer)
    assert dialled == [
        f"/ip4/127.0.0.1/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
        f"/ip4/5.6.7.8/tcp/4001/p2p/{RELAY}/p2p-circuit/p2p/{PEER}",
    ]


# -- a hostile peer's record on the in-memory network ----------------------------------


async def test_a_signed_record_full_of_bad_addresses_is_counted_and_only_good_ones_dialled(
    autojump_clock,
) -> None:
    hub = MemoryNetwork(seed=7)
    settings = DiscoverySettings(network_id=NET, record_validity_s=90, publish_interval_s=30)
    hostile_ident, honest_ident, victim_ident = (identity.NodeIdentity.generate() for _ in "abc")
    hostile = hostile_ident.peer_id
    good = ["/ip4/1.2.3.4/tcp/4001", f"/ip4/10.1.2.3/tcp/4001/p2p/{hostile}"]
    bad = [
        f"/ip4/0.0.0.0/tcp/4001/p2p/{hostile}",
        f"/ip6/::/tcp/4001/p2p/{hostile}",
        f"/ip4/224.0.0.251/tcp/5353/p2p/{hostile}",
        f"/ip4/1.2.3.4/tcp/0/p2p/{hostile}",
        f"/ip4/1.2.3.4/tcp/4001/p2p/{victim_ident.peer_id}",  # every reader dials the victim
        "/ip4/999.1.1.1/tcp/1",
        "/ip4/1.2.3.4/udp/4001/quic-v1",
        "not an address",
    ] * 3 + [f"/ip4/127.0.0.1/tcp/22/p2p/{hostile}"]  # kept, but dialled from this host only
    per_record = collections.Counter(
        f"addr_{r}" for r in check_addrs(bad, hostile)[1] if r != "too_many"
    )
    assert len(bad + good) <= MAX_ADDRS and sum(per_record.values()) == len(bad) - 1

    rejects: list[str] = []
    nodes = {}
    directories = {}
    for ident, describe, on_reject in (
        (hostile_ident, lambda: (bad + good, {}), None),
        (honest_ident, lambda: ([f"/p2p/{honest_ident.peer_id}"], {}), rejects.append),
        (victim_ident, lambda: ([f"/p2p/{victim_ident.peer_id}"], {}), None),
    ):
        node = hub.add_node(ident.peer_id)
        directory = ResourceDirectory(node, ident, settings, describe, on_reject=on_reject)
        node.set_validator(directory.validator)
        nodes[ident.peer_id], directories[ident.peer_id] = node, directory
    honest = nodes[honest_ident.peer_id]
    mine = directories[honest_ident.peer_id]
    await honest.connect(hostile)
    await honest.connect(victim_ident.peer_id)

    dialled: list[str] = []
    hidden: set[str] = set()
    redialled = trio.Event()
    real_connect, real_connected = honest.connect, honest.connected_peers

    async def connect(addr: str, timeout_s: float = 5.0) -> str:
        dialled.append(addr)
        hidden.clear()  # the dial itself is what shows it connected again
        redialled.set()
        return await real_connect(addr, timeout_s)

    honest.connect = connect  # type: ignore[method-assign]
    honest.connected_peers = lambda: real_connected() - hidden  # type: ignore[method-assign]

    async with trio.open_nursery() as nursery:
        for directory in directories.values():
            nursery.start_soon(directory.run)
            nursery.start_soon(directory.refresh_forever)
        with trio.fail_after(20):
            while not any(r.peer_id == hostile for r in await mine.find()):  # noqa: ASYNC110
                await trio.sleep(0.5)  # (find() answers from what the refresher has found)
        record = next(r for r in await mine.find() if r.peer_id == hostile)
        assert record.addrs == [bad[-1], *good]  # the signed record, less what is unusable
        # counted once for the record, whether it came by a look-up or a put stored here
        assert collections.Counter(r for r in rejects if r.startswith("addr_")) == per_record

        # the connection to it closes: liveness dials it again, at its good addresses only
        await trio.sleep(5)  # a few liveness rounds see it connected
        hidden.add(hostile)
        with trio.fail_after(10):
            await redialled.wait()
        await trio.sleep(2)  # the dial answers; nothing else is dialled
        assert dialled[0] == f"{good[0]}/p2p/{hostile}"
        # (its record's usable addresses only: not what the transport knows of it besides)
        assert set(dialled) <= {f"{good[0]}/p2p/{hostile}", good[1]}, dialled
        assert not any(
            x in addr for addr in dialled for x in ("0.0.0.0", "224.", "/tcp/0/", "127.0.0.1")
        )
        assert mine.lists(hostile)  # dialled again, answered: still listed
        nursery.cancel_scope.cancel()
