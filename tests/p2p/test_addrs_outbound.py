"""What a host takes from its peers' address claims, and what it passes on (p2p.addrguard;
issue 19, item 4), on real py-libp2p hosts on loopback.

A hostile peer (a gridmesh node of the same network, its own guard taken off, as a peer
running anything else would be) tells an honest node unusable addresses, through identify
(its own) and through Kademlia answers (a third peer's). py-libp2p's swarm dials what its
peerstore holds (every walk, its auto-connector): here nothing is dialled at them (the
transport's dials are recorded, and a "victim" socket on the loopback port they name sees no
connection: Linux dials 0.0.0.0 as this host), and each is counted. The honest node's own
Kademlia and identify answers carry loopback addresses only to a peer on its host (the
devnet keeps working), never signed records that hold them, and no garbage.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from types import SimpleNamespace

import multiaddr
import pytest
import trio
from libp2p.identity.identify.identify import ID as IDENTIFY_PROTOCOL
from libp2p.identity.identify.pb.identify_pb2 import Identify
from libp2p.kad_dht.common import PROTOCOL_ID as KAD_PROTOCOL
from libp2p.kad_dht.pb.kademlia_pb2 import Message
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.peer.peerstore import env_to_send_in_RPC
from libp2p.transport.tcp import tcp as tcp_module

from p2p import addrguard, identity, records
from p2p import addrs as addrs_module
from p2p.addrs import LOCAL, MAX_ADDRS, PRIVATE, PUBLIC
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.host import Libp2pNetwork
from p2p.reach import ReachSettings

NET = "addrout"
# fixed identities (nothing random names a test)
THIRD = identity.NodeIdentity(bytes([21]) * 32, bytes([31]) * 32).peer_id  # a peer's answer names
VICTIM = identity.NodeIdentity(bytes([22]) * 32, bytes([32]) * 32).peer_id
OTHER = identity.NodeIdentity(bytes([23]) * 32, bytes([33]) * 32).peer_id
LAN_IP = "192.0.2.10"  # the honest node's address others dial (a documentation network)


class _AnyValue:
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


class _Node:
    """A host and what it counted."""

    def __init__(self, listen: str = "/ip4/127.0.0.1/tcp/0", hole_punch: bool = False) -> None:
        self.rejects: list[tuple[str, str]] = []
        self.ident = identity.NodeIdentity.generate()
        self.net = Libp2pNetwork(
            self.ident,
            network_id=NET,
            listen=[listen],
            dht_namespace=records.NAMESPACE,
            dht_validator=_AnyValue(),
            on_reject=lambda source, reason: self.rejects.append((source, reason)),
            reach=ReachSettings(hole_punch=hole_punch),
        )

    @property
    def peer_id(self) -> str:
        return self.net.peer_id

    def counted(self, source: str) -> set[str]:
        return {reason for s, reason in self.rejects if s == source}


def _unguarded(node: _Node) -> None:
    """Take `node`'s address guard off: it stores, answers and tells what it is given, as
    py-libp2p alone does (the guard's changes are this host's instance attributes)."""
    net = node.net
    vars(net.host.get_peerstore()).pop("add_addrs", None)
    vars(net.host).pop("new_stream", None)
    net.host.get_mux().handlers[KAD_PROTOCOL] = net.dht.handle_stream


def _record_dials(node: _Node) -> list[str]:
    """Every address the node's TCP transport dials from now on."""
    network = node.net.host.get_network()
    tcp = network.transport_manager.transport_for_dialing(multiaddr.Multiaddr("/ip4/1.2.3.4/tcp/1"))
    dialled: list[str] = []
    dial = tcp.dial

    async def recorded(addr: multiaddr.Multiaddr) -> object:
        dialled.append(str(addr))
        return await dial(addr)

    tcp.dial = recorded
    return dialled


class _Victim:
    """A plain socket on a loopback port: counts every connection made to it."""

    def __init__(self) -> None:
        self.connections = 0
        self.port = 0

    async def serve(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]

        async def count(stream: trio.SocketStream) -> None:
            self.connections += 1
            await stream.aclose()

        nursery.start_soon(trio.serve_listeners, count, listeners)


def _bad_addrs(victim_port: int) -> dict[str, str]:
    """Addresses a hostile peer gives for a peer, and the reason each is dropped by a node
    that is not on loopback alone."""
    return {
        f"/ip4/0.0.0.0/tcp/{victim_port}": "addr_unspecified",  # Linux dials this host
        f"/ip4/127.0.0.1/tcp/{victim_port}": "addr_local",  # loopback from another host
        f"/ip4/224.0.0.251/tcp/{victim_port}": "addr_multicast",
        "/ip4/192.0.2.77/tcp/0": "addr_port_zero",
        f"/ip4/127.0.0.1/tcp/{victim_port}/p2p/{VICTIM}": "addr_wrong_peer",
    }


def _not_on_loopback_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    """This host has a LAN address: a node on 0.0.0.0 advertises it, not loopback."""
    monkeypatch.setattr(addrs_module, "interface_ips", lambda v: [LAN_IP] if v == 4 else [])


async def _wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll the state
            await trio.sleep(0.05)


def _identified(node: _Node, peer_id: str) -> bool:
    try:
        return bool(node.net.host.get_peerstore().get_protocols(ID.from_base58(peer_id)))
    except Exception:
        return False


def _bad_dials(dialled: list[str], victim_port: int) -> list[str]:
    return [a for a in dialled if f"/tcp/{victim_port}" in a or "/tcp/0" in a or "224." in a]


@asynccontextmanager
async def _honest_hostile_and_victim(
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[tuple[_Node, _Node, _Victim]]:
    """An honest node (on all interfaces, not on loopback alone) and a hostile one, both
    running, and a victim listener that counts the connections it is dialled with."""
    _not_on_loopback_alone(monkeypatch)
    honest, hostile = _Node("/ip4/0.0.0.0/tcp/0"), _Node()
    victim = _Victim()
    async with AsyncExitStack() as stack:
        nursery = await stack.enter_async_context(trio.open_nursery())
        await victim.serve(nursery)
        for node in (honest, hostile):
            await stack.enter_async_context(node.net.run())
        yield honest, hostile, victim
        nursery.cancel_scope.cancel()


# -- in: what a peer says is checked before the swarm may dial it ---------------------


async def test_a_hostile_identify_is_counted_and_none_of_its_addresses_is_dialled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _honest_hostile_and_victim(monkeypatch) as (honest, hostile, victim):
        bad = _bad_addrs(victim.port)
        port = honest.net.host.get_transport_addrs()[0].value_for_protocol("tcp")
        bad[f"/ip4/{LAN_IP}/tcp/{port}"] = "addr_own"  # the honest node itself
        hostile_at = hostile.net.listen_addrs()[0]
        _unguarded(hostile)
        # its identify (listen addresses and its signed record) claims the bad addresses
        claims = [multiaddr.Multiaddr(a) for a in bad]
        hostile.net.host.get_addrs = lambda: claims
        dialled = _record_dials(honest)
        assert not any("127.0.0.1" in a for a in honest.net.listen_addrs())
        await honest.net.connect(hostile_at)
        await _wait_for(lambda: _identified(honest, hostile.peer_id))
        await _wait_for(lambda: set(bad.values()) <= honest.counted("peerstore"))
        assert honest.net.peer_addrs(hostile.peer_id) == []
        # the connection closes; what py-libp2p dials the peer at next (every new stream,
        # a Kademlia walk, its auto-connector) is what its peerstore holds: nothing
        await honest.net.host.disconnect(ID.from_base58(hostile.peer_id))
        with pytest.raises(Exception, match="[Nn]o known addresses|peer ID not found"):
            await honest.net.host.get_network().dial_peer(ID.from_base58(hostile.peer_id))
        assert _bad_dials(dialled, victim.port) == []
        assert victim.connections == 0


async def test_a_hostile_kademlia_answer_is_counted_and_none_of_its_addresses_is_dialled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with _honest_hostile_and_victim(monkeypatch) as (honest, hostile, victim):
        bad = _bad_addrs(victim.port)
        _unguarded(hostile)
        # the hostile peer knows a third peer "at" the bad addresses, and says so
        third = ID.from_base58(THIRD)
        claims = [multiaddr.Multiaddr(a) for a in bad]
        hostile.net.host.get_peerstore().add_addrs(third, claims, 3600)  # (unguarded)
        await hostile.net.dht.routing_table.add_peer(
            PeerInfo(third, claims), skip_server_mode_check=True
        )
        dialled = _record_dials(honest)
        await honest.net.connect(hostile.net.listen_addrs()[0])
        # a walk asks the hostile peer, learns of the third, and would dial it
        await honest.net.dht_find_peers(third.to_bytes())
        await _wait_for(lambda: set(bad.values()) <= honest.counted("peerstore"))
        assert honest.net.peer_addrs(THIRD) == []
        with pytest.raises(Exception, match="[Nn]o known addresses|peer ID not found"):
            await honest.net.host.get_network().dial_peer(third)
        assert _bad_dials(dialled, victim.port) == []
        assert victim.connections == 0


async def test_a_name_a_peer_gives_is_dialled_only_where_it_resolves_to_a_usable_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A name passes as public when it is stored; what it resolves to (a hostile peer's own
    DNS answer: loopback, 0.0.0.0) is checked when the transport dials it."""
    async with _honest_hostile_and_victim(monkeypatch) as (honest, hostile, victim):
        answers = [f"/ip4/127.0.0.1/tcp/{victim.port}", f"/ip4/0.0.0.0/tcp/{victim.port}"]

        async def resolve(maddr, **_: object) -> list[multiaddr.Multiaddr]:  # type: ignore[no-untyped-def]
            assert "victim.example" in str(maddr)
            return [multiaddr.Multiaddr(a) for a in answers]

        monkeypatch.setattr(tcp_module, "resolve_multiaddr_with_retry", resolve)
        hostile_at = hostile.net.listen_addrs()[0]
        _unguarded(hostile)
        named = [multiaddr.Multiaddr(f"/dns4/victim.example/tcp/{victim.port}")]
        hostile.net.host.get_addrs = lambda: named
        await honest.net.connect(hostile_at)
        await _wait_for(lambda: _identified(honest, hostile.peer_id))
        assert honest.net.peer_addrs(hostile.peer_id) == [str(named[0])]  # a name: kept
        await honest.net.host.disconnect(ID.from_base58(hostile.peer_id))
        with pytest.raises(Exception):  # noqa: B017 - py-libp2p's errors vary by path
            await honest.net.host.get_network().dial_peer(ID.from_base58(hostile.peer_id))
        assert honest.counted("dns") == {"addr_local", "addr_unspecified"}
        assert victim.connections == 0


def test_a_peer_is_on_this_host_only_when_connected_directly_from_one_of_its_addresses(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    node = _Node()
    guard, peer = node.net.addr_guard, ID.from_base58(THIRD)
    circuit = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{OTHER}/p2p-circuit")]
    connections = {
        "direct": [],
        "relayed": [SimpleNamespace(get_transport_addresses=lambda: circuit)],
    }
    network = node.net.host.get_network()

    def stream(ip: str, kind: str) -> SimpleNamespace:
        monkeypatch.setattr(network, "get_connections", lambda _peer: connections[kind])
        return SimpleNamespace(
            get_remote_address=lambda: (ip, 40000), muxed_conn=SimpleNamespace(peer_id=peer)
        )

    assert guard.near(stream("127.0.0.1", "direct"))
    assert guard.near(stream("::1", "direct"))
    assert not guard.near(stream("198.51.100.7", "direct"))
    # through a relay on this host: the address is the relay's, the peer may be anywhere
    assert not guard.near(stream("127.0.0.1", "relayed"))


def test_a_peer_is_stored_at_no_more_than_max_addrs_addresses() -> None:
    node = _Node()
    peer = ID.from_base58(THIRD)
    store = node.net.host.get_peerstore()
    first = [multiaddr.Multiaddr(f"/ip4/1.2.3.{i}/tcp/1") for i in range(30)]
    store.add_addrs(peer, first, 60)
    store.add_addrs(peer, [multiaddr.Multiaddr(f"/ip4/1.2.4.{i}/tcp/1") for i in range(5)], 60)
    assert len(node.net.peer_addrs(THIRD)) == MAX_ADDRS
    assert node.rejects == [("peerstore", "addr_too_many")] * (35 - MAX_ADDRS)
    store.add_addrs(peer, first, 60)  # told again (a Kademlia walk): no more, none counted
    assert len(node.net.peer_addrs(THIRD)) == MAX_ADDRS
    assert len(node.rejects) == 35 - MAX_ADDRS


def test_a_hole_punch_is_tried_only_at_usable_addresses_of_what_the_peer_sent() -> None:
    node = _Node(hole_punch=True)
    sent = [
        multiaddr.Multiaddr(a).to_bytes()
        for a in ("/ip4/0.0.0.0/tcp/4001", "/ip4/1.2.3.4/tcp/0", "/ip4/8.8.4.4/tcp/4001")
    ]
    assert node.net.reach.dcutr is not None
    decoded = node.net.reach.dcutr._decode_observed_addrs(sent)
    assert [str(a) for a in decoded] == ["/ip4/8.8.4.4/tcp/4001"]
    assert node.counted("dcutr") == {"addr_unspecified", "addr_port_zero"}


# -- out: what we pass on is for the peer that asks ----------------------------------


async def _ask(asker: _Node, peer_id: str, message: Message) -> Message:
    """One Kademlia request from `asker` to `peer_id`, as bytes on the wire; its answer."""
    stream = await asker.net.host.new_stream(ID.from_base58(peer_id), [KAD_PROTOCOL])
    body = message.SerializeToString()
    await stream.write(addrguard._varint(len(body)) + body)
    data = b""
    with trio.fail_after(10):
        while (split := addrguard._frame(data)) is None:
            chunk = await stream.read(65536)
            assert chunk, "the stream closed before the answer"
            data += chunk
    await stream.close()
    answer = Message()
    answer.ParseFromString(split[0])
    return answer


async def _identify(asker: _Node, peer_id: str) -> Identify:
    stream = await asker.net.host.new_stream(ID.from_base58(peer_id), [IDENTIFY_PROTOCOL])
    data = b""
    with trio.fail_after(10):
        while (split := addrguard._frame(data)) is None:
            chunk = await stream.read(65536)
            assert chunk, "the stream closed before the answer"
            data += chunk
    message = Identify()
    message.ParseFromString(split[0])
    return message


def _entry(answer: Message, peer_id: str) -> Message.Peer:
    return next(p for p in answer.closerPeers if ID(p.id).to_base58() == peer_id)


def _texts(raw: list[bytes]) -> list[str]:
    return [str(multiaddr.Multiaddr(a)) for a in raw]


def _places(raw: list[bytes]) -> list[str]:
    """The addresses less their /p2p/ part (a signed record's have it, identify's not)."""
    return [a.split("/p2p/")[0] for a in _texts(raw)]


async def test_kademlia_answers_carry_loopback_only_to_a_peer_on_this_host(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A devnet node (on loopback alone) knows a same-host peer at loopback: it tells a peer
    on its host so (the devnet finds itself), and a remote peer nothing of it; garbage it
    was given (a provider's word, stored as it came) goes to nobody, and is counted."""
    honest, neighbour, asker = _Node(), _Node(), _Node()
    async with AsyncExitStack() as stack:
        for node in (honest, neighbour, asker):
            await stack.enter_async_context(node.net.run())
        await neighbour.net.connect(honest.net.listen_addrs()[0])
        await asker.net.connect(honest.net.listen_addrs()[0])
        await _wait_for(lambda: _identified(honest, neighbour.peer_id))
        # what a provider said of itself (ADD_PROVIDER: stored as it came, not dialled)
        given = [
            "/ip4/0.0.0.0/tcp/4001",
            "/ip4/1.2.3.4/tcp/4001",
            f"/ip4/1.2.3.4/tcp/4002/p2p/{OTHER}",
            "/ip4/127.0.0.1/tcp/4003",
        ]
        provided = PeerInfo(ID.from_base58(THIRD), [multiaddr.Multiaddr(a) for a in given])
        honest.net.dht.provider_store.add_provider(b"some-key", provided)
        get_providers = Message(type=Message.MessageType.GET_PROVIDERS, key=b"some-key")
        loopback = [a.split("/p2p/")[0] for a in neighbour.net.listen_addrs()]
        assert all("/ip4/127.0.0.1/" in a for a in loopback)
        find = Message(
            type=Message.MessageType.FIND_NODE, key=ID.from_base58(neighbour.peer_id).to_bytes()
        )

        # a peer on this host (the devnet): loopback addresses and signed records as stored
        near = await _ask(asker, honest.peer_id, find)
        assert _places(_entry(near, neighbour.peer_id).addrs) == loopback
        assert _entry(near, neighbour.peer_id).HasField("signedRecord")
        assert near.HasField("senderRecord")
        (provider,) = (await _ask(asker, honest.peer_id, get_providers)).providerPeers
        assert _texts(provider.addrs) == ["/ip4/1.2.3.4/tcp/4001", "/ip4/127.0.0.1/tcp/4003"]
        assert {"addr_unspecified", "addr_wrong_peer"} <= honest.counted("answer")

        # a remote peer: no loopback address, and no record that has one (ours neither)
        monkeypatch.setattr(addrguard, "_same_host", lambda ip: False)
        far = await _ask(asker, honest.peer_id, find)
        assert _texts(_entry(far, neighbour.peer_id).addrs) == []
        assert not _entry(far, neighbour.peer_id).HasField("signedRecord")
        assert not far.HasField("senderRecord")
        assert not any("127.0.0.1" in a for p in far.closerPeers for a in _texts(p.addrs))
        (provider,) = (await _ask(asker, honest.peer_id, get_providers)).providerPeers
        assert _texts(provider.addrs) == ["/ip4/1.2.3.4/tcp/4001"]
        assert honest.net.addr_guard.withheld["kad"] >= 2


async def test_identify_and_requests_tell_a_remote_peer_no_loopback_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node on loopback alone has no other address: a peer on its host is told it; a
    remote one (it dialled out) is not, in identify nor in the signed record of its own
    Kademlia requests."""
    honest, asker = _Node(), _Node()
    async with AsyncExitStack() as stack:
        for node in (honest, asker):
            await stack.enter_async_context(node.net.run())
        await asker.net.connect(honest.net.listen_addrs()[0])
        own = [a.split("/p2p/")[0] for a in honest.net.listen_addrs()]
        near = await _identify(asker, honest.peer_id)
        assert _texts(list(near.listen_addrs)) == own and near.HasField("signedPeerRecord")

        monkeypatch.setattr(addrguard, "_same_host", lambda ip: False)
        far = await _identify(asker, honest.peer_id)
        assert list(far.listen_addrs) == [] and not far.HasField("signedPeerRecord")
        assert far.public_key == near.public_key and list(far.protocols) == list(near.protocols)

        # its own requests: what py-libp2p's Kademlia writes, through the host's new_stream
        heard: list[Message] = []

        async def capture(stream) -> None:  # type: ignore[no-untyped-def]
            data = b""
            while (split := addrguard._frame(data)) is None:
                chunk = await stream.read(65536)
                if not chunk:
                    return
                data += chunk
            message = Message()
            message.ParseFromString(split[0])
            heard.append(message)
            await stream.close()

        asker.net.host.get_mux().handlers[KAD_PROTOCOL] = capture
        request = Message(type=Message.MessageType.FIND_NODE, key=b"k" * 34)
        request.senderRecord = env_to_send_in_RPC(honest.net.host)[0]
        stream = await honest.net.host.new_stream(ID.from_base58(asker.peer_id), [KAD_PROTOCOL])
        body = request.SerializeToString()
        await stream.write(addrguard._varint(len(body)))  # as py-libp2p does: two writes
        await stream.write(body)
        await _wait_for(lambda: any(m.key == request.key for m in heard))
        assert not next(m for m in heard if m.key == request.key).HasField("senderRecord")
        assert honest.net.addr_guard.withheld["identify"] >= len(own)


# -- what a node says of itself to peers beyond its host --------------------------------


async def _record_seen_by(
    reader: _Node, publisher: _Node, directory: ResourceDirectory
) -> list[str]:
    """The publisher's record as it is now, as `reader` gets it when it asks the publisher
    (a Kademlia GET_VALUE): its addresses. (It is stored as a put stores it first: the put's
    walk here may stall on the far peer's LAN address, which no one answers on this host.)"""
    key = directory.key_for(publisher.peer_id)
    scoped = publisher.net.scope.dht_key(key).encode()
    publisher.net.dht.value_store.put(scoped, directory.make_own_record())
    value = await reader.net.dht_get_from(publisher.peer_id, key)
    assert value is not None
    record = records.validate_record(key, value, now=reader.net.now(), network_id=NET)
    return list(record.addrs)


async def test_a_node_on_loopback_alone_keeps_loopback_out_of_its_record_once_peers_are_elsewhere(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A node listening on loopback alone, among peers on its host (the devnet), lists its
    loopback address in its DHT record: they dial it there. Once it knows a peer elsewhere
    (here: one listening on a LAN address), the record, which any peer may fetch, lists it
    no more: a peer elsewhere could not dial it, and would only learn of this host."""
    _not_on_loopback_alone(monkeypatch)  # the far peer, on 0.0.0.0, advertises LAN_IP
    honest, neighbour, far = _Node(), _Node(), _Node("/ip4/0.0.0.0/tcp/0")
    directory = ResourceDirectory(
        honest.net,
        honest.ident,
        DiscoverySettings(network_id=NET),
        describe=lambda: (honest.net.listen_addrs(), {}),
    )
    async with AsyncExitStack() as stack:
        for node in (honest, neighbour, far):
            await stack.enter_async_context(node.net.run())
        loopback = honest.net.listen_addrs()
        assert all("/ip4/127.0.0.1/" in a for a in loopback)
        assert not any("127.0.0.1" in a for a in far.net.listen_addrs())
        # the devnet: every peer on this host
        await honest.net.connect(neighbour.net.listen_addrs()[0])
        await _wait_for(lambda: _identified(honest, neighbour.peer_id))
        assert await _record_seen_by(neighbour, honest, directory) == loopback

        # a peer elsewhere (dialled on loopback here, as the test's one host allows)
        port = far.net.host.get_transport_addrs()[0].value_for_protocol("tcp")
        await honest.net.connect(f"/ip4/127.0.0.1/tcp/{port}/p2p/{far.peer_id}")
        await _wait_for(lambda: any(LAN_IP in a for a in honest.net.peer_addrs(far.peer_id)))
        assert await _record_seen_by(far, honest, directory) == []
        assert await _record_seen_by(neighbour, honest, directory) == []


def test_a_peer_dials_our_addresses_of_the_scopes_its_connection_shows(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`reach_of`: on this host, all; from a private address (our LAN, our NAT), private and
    public ones; from a public one, or only through a relay, public ones alone."""
    _not_on_loopback_alone(monkeypatch)
    node = _Node()
    guard, peer = node.net.addr_guard, ID.from_base58(THIRD)
    circuit = [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/1/p2p/{OTHER}/p2p-circuit")]
    network = node.net.host.get_network()

    def connected_from(ip: str, relayed: bool = False) -> int:
        conn = SimpleNamespace(
            get_transport_addresses=lambda: circuit if relayed else [],
            muxed_conn=SimpleNamespace(get_remote_address=lambda: (ip, 40000)),
        )
        monkeypatch.setattr(network, "get_connections", lambda _peer: [conn])
        return guard.reach_of(peer)

    assert connected_from("127.0.0.1") == LOCAL
    assert connected_from(LAN_IP) == LOCAL  # one of this host's own addresses
    assert connected_from("::ffff:127.0.0.1") == LOCAL
    assert connected_from("192.168.7.9") == PRIVATE
    assert connected_from("10.1.2.3") == PRIVATE
    assert connected_from("8.8.4.4") == PUBLIC
    assert connected_from("127.0.0.1", relayed=True) == PUBLIC
    monkeypatch.setattr(network, "get_connections", lambda _peer: [])
    assert guard.reach_of(peer) == PUBLIC


async def test_autonat_asks_a_server_to_dial_back_only_addresses_it_could(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """What an AutoNAT server receives, on the wire: a server on our host is asked to try
    our loopback address (the devnet finds itself reachable); a server elsewhere is asked
    only our public addresses (it dials back only at the IP it sees us at: a private or
    loopback one would only tell it of our LAN and host), and, where we have none, nothing."""
    client, server = _Node(), _Node()
    asked: list[list[str]] = []
    async with AsyncExitStack() as stack:
        for node in (client, server):
            await stack.enter_async_context(node.net.run())
        autonat = server.net.reach.autonat
        handle_dial = autonat._handle_dial

        async def recorded(message, observed_ip, is_relayed):  # type: ignore[no-untyped-def]
            asked.append([str(multiaddr.Multiaddr(a)) for a in message.dial.peer.addrs])
            return await handle_dial(message, observed_ip, is_relayed)

        monkeypatch.setattr(autonat, "_handle_dial", recorded)
        await client.net.connect(server.net.listen_addrs()[0])
        loopback = [a.split("/p2p/")[0] for a in client.net.listen_addrs()]

        # on our host: loopback asked, and reached
        await client.net.reach.check()
        assert asked == [loopback]
        assert client.net.reach.votes == {server.peer_id: True}

        # elsewhere: a loopback-only node has nothing such a server could dial
        monkeypatch.setattr(addrguard, "_same_host", lambda ip: False)
        await client.net.reach.check()
        assert len(asked) == 1 and client.net.reach.votes == {}

        # with a LAN address and a public one (the NAT mapping a peer saw): the public one
        public = "/ip4/8.8.4.4/tcp/4001"
        mixed = [*loopback, f"/ip4/{LAN_IP}/tcp/4001", public]
        monkeypatch.setattr(
            client.net.reach,
            "_candidate_addrs",
            lambda: [multiaddr.Multiaddr(a).to_bytes() for a in mixed],
        )
        await client.net.reach.check()
        assert asked[1:] == [[public]]
