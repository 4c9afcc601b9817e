"""p2p.reach on real hosts over loopback: AutoNAT's fresh dial-back, relay serving within its
limits (only once public), reservations and the relayed addresses advertised, connecting and
talking through a relay. (NAT, hole punching and private status: tests/daemon/test_nat_procs.py.)"""

import contextlib
import os
import socket
from contextlib import AsyncExitStack

import multiaddr
import pytest
import trio
from libp2p.host.autonat.pb.autonat_pb2 import Message as AutoNATMessage
from libp2p.peer.id import ID

from p2p import identity, records
from p2p.host import Libp2pNetwork
from p2p.network import NetworkError
from p2p.reach import PRIVATE, PUBLIC, UNKNOWN, ReachSettings, reach_info, tally

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


class _AnyValue:
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def make(**settings: object) -> Libp2pNetwork:
    reach = ReachSettings(**{"confirmations": 1, "check_s": 0.2, **settings})  # type: ignore[arg-type]
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id="reachtest",
        listen=[LOOPBACK],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AnyValue(),
        reach=reach,
    )


async def wait_for(condition, timeout_s: float = 10.0) -> None:  # type: ignore[no-untyped-def]
    with trio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll the state
            await trio.sleep(0.05)


async def echo(sender: str, data: bytes) -> bytes:
    return data


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_status_flips_only_when_enough_peers_agree() -> None:
    assert tally({}, 2, UNKNOWN) == UNKNOWN
    assert tally({"a": True}, 2, UNKNOWN) == UNKNOWN
    assert tally({"a": True, "b": True}, 2, UNKNOWN) == PUBLIC
    assert tally({"a": False, "b": False, "c": True}, 2, PUBLIC) == PRIVATE
    assert tally({"a": False, "b": True}, 2, PRIVATE) == PRIVATE  # no majority: unchanged


async def test_autonat_dials_back_on_a_fresh_connection() -> None:
    # py-libp2p's server answers with host.connect(), which succeeds for any connected peer:
    # a closed port would be reported reachable. Ours dials that address anew.
    server, client = make(), make()
    async with AsyncExitStack() as stack:
        for net in (server, client):
            await stack.enter_async_context(net.run())
        await client.connect(server.listen_addrs()[0])
        dead = f"/ip4/127.0.0.1/tcp/{closed_port()}"
        status, _ = await client.reach.autonat.query_server(
            ID.from_base58(server.peer_id), [multiaddr.Multiaddr(dead).to_bytes()]
        )
        assert status == AutoNATMessage.E_DIAL_ERROR
        assert client.peer_id in server.connected_peers()  # the old connection is untouched
        await wait_for(lambda: client.reach.status == PUBLIC)  # its real address answers
        assert reach_info(client)["reachability"] == PUBLIC
        # the dial-backs stop after the security handshake: they never join either swarm
        client_id, server_id = ID.from_base58(client.peer_id), ID.from_base58(server.peer_id)
        assert len(server.host.get_network().get_connections(client_id)) == 1
        assert len(client.host.get_network().get_connections(server_id)) == 1


async def test_relay_reservation_relayed_address_and_a_request_through_it() -> None:
    # no hole punching: on loopback DCUtR would make the connection direct at once
    relay, private, dialer = make(serve=True), make(hole_punch=False), make(hole_punch=False)
    async with AsyncExitStack() as stack:
        for net in (relay, private, dialer):
            await stack.enter_async_context(net.run())
        for net in (private, dialer):
            await net.connect(relay.listen_addrs()[0])
        await wait_for(lambda: relay.reach.serving)
        assert await private.reach.reserve_on(ID.from_base58(relay.peer_id))
        circuit = [a for a in private.listen_addrs() if "/p2p-circuit/" in a]
        assert circuit == [f"{relay.listen_addrs()[0]}/p2p-circuit/p2p/{private.peer_id}"]
        assert reach_info(private)["relays"] == [relay.peer_id]

        private.set_request_handler("echo", echo)
        assert await dialer.connect(circuit[0]) == private.peer_id
        assert dialer.reach.connection_kind(private.peer_id) == "relayed"
        assert dialer.reach.connection_kind(relay.peer_id) == "direct"
        assert await dialer.request(private.peer_id, "echo", b"x" * 1000) == b"x" * 1000


async def test_relay_limits_reservations_and_bytes() -> None:
    relay = make(serve=True, max_reservations=1, circuit_bytes=64 * 1024)
    first, second, dialer = make(hole_punch=False), make(), make(hole_punch=False)
    async with AsyncExitStack() as stack:
        for net in (relay, first, second, dialer):
            await stack.enter_async_context(net.run())
        for net in (first, second, dialer):
            await net.connect(relay.listen_addrs()[0])
        await wait_for(lambda: relay.reach.serving)
        relay_id = ID.from_base58(relay.peer_id)
        assert await first.reach.reserve_on(relay_id)
        assert not await second.reach.reserve_on(relay_id)  # one slot, taken
        first.set_request_handler("echo", echo)
        circuit = next(a for a in first.listen_addrs() if "/p2p-circuit/" in a)
        await dialer.connect(circuit)
        assert await dialer.request(first.peer_id, "echo", b"y" * 1000) == b"y" * 1000
        with pytest.raises(NetworkError):  # past the circuit's 64 KiB
            await dialer.request(first.peer_id, "echo", b"z" * (256 * 1024), timeout_s=5)


async def test_a_relay_not_known_to_be_public_refuses_reservations() -> None:
    relay = make(serve=True, confirmations=16)  # never enough peers to agree
    private = make()
    async with AsyncExitStack() as stack:
        for net in (relay, private):
            await stack.enter_async_context(net.run())
        await private.connect(relay.listen_addrs()[0])
        assert relay.reach.status == UNKNOWN
        assert not await private.reach.reserve_on(ID.from_base58(relay.peer_id))
        assert relay.reach.refused_hops >= 1
        assert private.reach.relayed_addrs() == []


async def test_dcutr_upgrades_a_relayed_connection_to_a_direct_one() -> None:
    relay, private, dialer = make(serve=True), make(), make()
    async with AsyncExitStack() as stack:
        for net in (relay, private, dialer):
            await stack.enter_async_context(net.run())
        for net in (private, dialer):
            await net.connect(relay.listen_addrs()[0])
        await wait_for(lambda: relay.reach.serving)
        assert await private.reach.reserve_on(ID.from_base58(relay.peer_id))
        circuit = next(a for a in private.listen_addrs() if "/p2p-circuit/" in a)
        private.set_request_handler("echo", echo)
        await dialer.connect(circuit)
        # both ends run DCUtR: the relayed connection is upgraded (no NAT on loopback)
        await wait_for(lambda: dialer.reach.connection_kind(private.peer_id) == "direct", 20)
        assert await dialer.request(private.peer_id, "echo", b"d" * 1000) == b"d" * 1000


async def test_garbage_on_relay_hole_punch_and_autonat_streams_leaves_the_relay_serving() -> None:
    relay, attacker, private = make(serve=True), make(), make(hole_punch=False)
    async with AsyncExitStack() as stack:
        for net in (relay, attacker, private):
            await stack.enter_async_context(net.run())
        for net in (attacker, private):
            await net.connect(relay.listen_addrs()[0])
        await wait_for(lambda: relay.reach.serving)
        protocols = [str(p) for p in relay.host.get_mux().handlers if p is not None]
        targets = [p for p in protocols if "relay" in p or "dcutr" in p or "autonat" in p]
        assert len(targets) >= 4, protocols  # hop, stop, dcutr, autonat
        for protocol in targets:
            for size in (1, 7, 64 * 1024):
                with contextlib.suppress(Exception), trio.move_on_after(2):
                    stream = await attacker.host.new_stream(relay.host.get_id(), [protocol])
                    await stream.write(os.urandom(size))
                    await stream.close()
        assert await private.reach.reserve_on(ID.from_base58(relay.peer_id))
        await relay.ping(private.peer_id)


async def test_advertised_addresses_are_built_once_per_moment_and_again_when_they_change() -> None:
    # pubsub asks for our addresses (host.get_addrs) with every RPC it sends: a gossip burst
    # must not rebuild them each time, and a new reservation must show at once
    relay, private = make(serve=True), make(hole_punch=False)
    async with AsyncExitStack() as stack:
        for net in (relay, private):
            await stack.enter_async_context(net.run())
        await private.connect(relay.listen_addrs()[0])
        await wait_for(lambda: relay.reach.serving)
        reach = private.reach
        builds = 0
        listen = reach._host_addrs

        def counted() -> list[multiaddr.Multiaddr]:
            nonlocal builds
            builds += 1
            return listen()

        reach._host_addrs = counted
        reach._addrs_changed()
        first = [str(a) for a in private.host.get_addrs()]
        for _ in range(200):
            assert [str(a) for a in private.host.get_addrs()] == first
        assert builds == 1
        assert await reach.reserve_on(ID.from_base58(relay.peer_id))
        assert any("/p2p-circuit" in str(a) for a in private.host.get_addrs())
        assert builds == 2
