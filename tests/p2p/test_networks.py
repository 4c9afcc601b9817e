"""Named networks (issue 19): a network's id is part of every protocol id, gossip topic and
DHT namespace (`p2p.network.NetworkScope`), and the hello refuses a peer of another network,
so a devnet node and a testnet node connected to each other exchange nothing: checked on the
in-memory network and on real py-libp2p hosts on 127.0.0.1."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import multiaddr
import pytest
import trio
from libp2p.peer.peerinfo import info_from_p2p_addr

from p2p import identity, records
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.host import HELLO_PROTOCOL, Libp2pNetwork, read_frame, write_frame
from p2p.network import NetworkError, NetworkScope, check_network_id
from p2p.testing import conformance
from p2p.testing.memnet import MemoryNetwork

DEVNET, TESTNET = "gridmesh-devnet", "gridmesh-testnet"
SYNC = "/gridmesh/registry/sync/1.0.0"
TOPIC = "/gridmesh/registry/1"


# -- the scope ------------------------------------------------------------------------------


def test_every_name_carries_the_network():
    dev, test = NetworkScope(DEVNET), NetworkScope(TESTNET)
    assert dev.protocol(SYNC) == "/gridmesh/gridmesh-devnet/registry/sync/1.0.0"
    assert dev.protocol("/echo/1") == "/gridmesh/gridmesh-devnet/echo/1"
    assert dev.topic(TOPIC) != test.topic(TOPIC)
    # idempotent: a name already scoped (the registry's topic names its network) is kept
    assert dev.protocol(dev.protocol(SYNC)) == dev.protocol(SYNC)
    assert dev.topic(f"/gridmesh/{DEVNET}/registry/1") == f"/gridmesh/{DEVNET}/registry/1"
    # the hello is spoken alike by every network: it is how a peer learns ours
    assert dev.protocol(HELLO_PROTOCOL) == test.protocol(HELLO_PROTOCOL) == HELLO_PROTOCOL
    # no network: nothing changes (memory nodes made without one)
    assert NetworkScope(None).protocol(SYNC) == SYNC
    assert NetworkScope(None).dht_key("/gridmesh/ab") == "/gridmesh/ab"


def test_dht_keys_live_in_the_networks_namespace():
    dev, test = NetworkScope(DEVNET), NetworkScope(TESTNET)
    peer = identity.NodeIdentity.generate().peer_id
    key_dev, key_test = records.record_key(DEVNET, peer), records.record_key(TESTNET, peer)
    assert key_dev.split("/")[1] == dev.namespace(records.NAMESPACE)
    assert key_test.split("/")[1] == test.namespace(records.NAMESPACE)
    assert key_dev.split("/")[1] != key_test.split("/")[1]
    # py-libp2p refuses lookup keys over 50 bytes
    assert len(key_dev) <= 50 and len(key_test) <= 50
    # the transport's mapping keeps a record key and moves a plain one into the namespace
    assert dev.dht_key(key_dev) == key_dev
    assert dev.dht_key("/gridmesh/" + "c0" * 16) == f"/{dev.namespace('gridmesh')}/" + "c0" * 16
    assert test.dht_key(key_dev) != key_dev  # not ours: moved, so never found under ours


@pytest.mark.parametrize("bad", ["", "a/b", "has space", "-lead", "x" * 65, "é"])
def test_a_network_id_that_cannot_name_a_protocol_is_refused(bad):
    with pytest.raises(ValueError, match="is not 1..64 letters"):
        check_network_id(bad)
    with pytest.raises(ValueError):
        NetworkScope(bad)
    with pytest.raises(ValueError):  # both transports, before anything is built
        MemoryNetwork().add_node("x", None, network_id=bad)
    with pytest.raises(ValueError):
        _Host(bad)


# -- in memory ------------------------------------------------------------------------------


class _Describe:
    def __init__(self, node) -> None:
        self.node = node

    def __call__(self):
        return self.node.listen_addrs(), {"cpu": {"cores": 1}}


def _directory(node, ident, network_id: str) -> ResourceDirectory:
    settings = DiscoverySettings(network_id=network_id, dht_timeout_s=2.0, find_timeout_s=2.0)
    directory = ResourceDirectory(node, ident, settings, describe=_Describe(node))
    node.set_validator(directory.validator)
    return directory


async def test_memory_nodes_of_two_networks_exchange_nothing(autojump_clock):
    hub = MemoryNetwork(seed=3, latency_s=0.001)
    idents = [identity.NodeIdentity.generate() for _ in range(4)]
    nets = [DEVNET, DEVNET, TESTNET, TESTNET]
    nodes = [hub.add_node(i.peer_id, None, network_id=n) for i, n in zip(idents, nets, strict=True)]
    dirs = [_directory(n, i, net) for n, i, net in zip(nodes, idents, nets, strict=True)]
    d0, d1, t0, t1 = nodes
    await d1.connect(d0.peer_id)
    await t1.connect(t0.peer_id)
    # the hello, in memory: refused both ways, with the networks named
    with pytest.raises(
        NetworkError, match="is on network 'gridmesh-devnet', not 'gridmesh-testnet'"
    ):
        await t0.connect(d0.peer_id)
    assert "gridmesh-devnet" in t0.refused_peers()[d0.peer_id]
    assert "gridmesh-testnet" in d0.refused_peers()[t0.peer_id]
    # requests and streams on a protocol both serve: refused across networks
    asked: list[str] = []

    async def sync(sender: str, payload: bytes) -> bytes:
        asked.append(sender)
        return b"contents"

    for node in nodes:
        node.set_request_handler(SYNC, sync)
    assert await d1.request(d0.peer_id, SYNC, b"x") == b"contents"
    with pytest.raises(NetworkError, match="is on network"):
        await t0.request(d0.peer_id, SYNC, b"x")
    with pytest.raises(NetworkError, match="is on network"):
        await t0.open_stream(d0.peer_id, SYNC)
    assert asked == [d1.peer_id]
    # gossip on the same topic name: each network hears its own only
    heard: dict[str, list[bytes]] = {n.peer_id: [] for n in nodes}
    for node in nodes:

        async def on(origin: str, data: bytes, me: str = node.peer_id) -> None:
            heard[me].append(data)

        await node.subscribe(TOPIC, on)
    await d0.publish(TOPIC, b"devnet news")
    await t0.publish(TOPIC, b"testnet news")
    await trio.sleep(1)
    assert heard[d1.peer_id] == [b"devnet news"] and heard[t1.peer_id] == [b"testnet news"]
    assert heard[t0.peer_id] == [] and heard[d0.peer_id] == []
    assert hub.subscribers(d0.scope.topic(TOPIC)) == {d0.peer_id, d1.peer_id}
    # records: each network finds its own nodes only, even asked for the others' keys
    for directory in dirs:
        assert await directory.publish_once()
    found = [{r.peer_id for r in await d.find()} for d in dirs]
    assert found[0] == found[1] == {d0.peer_id, d1.peer_id}
    assert found[2] == found[3] == {t0.peer_id, t1.peer_id}
    assert await dirs[2].lookup(d0.peer_id) is None
    assert await t0.dht_get(records.record_key(DEVNET, d0.peer_id)) is None
    assert d0.peer_id not in t0.known_peers() and t0.peer_id not in d0.known_peers()


@asynccontextmanager
async def _scoped_memory_pair() -> AsyncIterator[conformance.Pair]:
    hub = MemoryNetwork(latency_s=0.001)
    a, b = hub.add_node("peer-a", None, TESTNET), hub.add_node("peer-b", None, TESTNET)
    await a.connect(b.listen_addrs()[0])

    async def vanish_b() -> None:
        hub.remove_node(b.peer_id, refuse=True)
        await trio.lowlevel.checkpoint()

    yield conformance.Pair(a, b, vanish_b)


async def test_memory_nodes_of_a_network_keep_the_whole_contract(autojump_clock):
    """Scoped names change nothing a caller sees: the seam's conformance suite passes."""
    await conformance.check_network(_scoped_memory_pair)


# -- real hosts -----------------------------------------------------------------------------


class _Host:
    def __init__(self, network_id: str) -> None:
        self.ident = identity.NodeIdentity.generate()
        self.rejects: list[tuple[str, str]] = []
        self.net = Libp2pNetwork(
            self.ident,
            network_id=network_id,
            listen=["/ip4/127.0.0.1/tcp/0"],
            dht_namespace=records.NAMESPACE,
            dht_validator=_Lazy(self),
            on_reject=lambda source, reason: self.rejects.append((source, reason)),
        )
        settings = DiscoverySettings(network_id=network_id, dht_timeout_s=3.0)
        self.directory = ResourceDirectory(
            self.net, self.ident, settings, describe=lambda: (self.net.listen_addrs(), {})
        )


class _Lazy:
    def __init__(self, host: _Host) -> None:
        self.host = host

    def validate(self, key: str, value: bytes) -> None:
        self.host.directory.validator.validate(key, value)

    def select(self, key: str, values: list[bytes]) -> int:
        return self.host.directory.validator.select(key, values)


@asynccontextmanager
async def _running(*hosts: _Host) -> AsyncIterator[None]:
    failure: Exception | None = None
    async with AsyncExitStack() as stack:
        for host in hosts:
            await stack.enter_async_context(host.net.run())
        try:
            yield
        except Exception as exc:  # raised as itself, not inside the hosts' exception groups
            failure = exc
    if failure is not None:
        raise failure


async def _until(condition, timeout_s: float, what: str) -> None:
    with trio.move_on_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - polls a host's state
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out waiting for {what}")


async def test_libp2p_hosts_of_two_networks_exchange_nothing_even_when_connected():
    dev0, dev1, test0 = _Host(DEVNET), _Host(DEVNET), _Host(TESTNET)
    async with _running(dev0, dev1, test0):
        asked: list[str] = []

        async def sync(sender: str, payload: bytes) -> bytes:
            asked.append(sender)
            return b"contents"

        for host in (dev0, dev1, test0):
            host.net.set_request_handler(SYNC, sync)
        await dev1.net.connect(dev0.net.listen_addrs()[0])
        # records: dev0's reaches dev1 (and, below, not test0)
        assert await dev0.directory.publish_once()
        await _until(
            lambda: (
                dev1.net.dht.value_store.get(
                    records.record_key(DEVNET, dev0.ident.peer_id).encode()
                )
                is not None
            ),
            5,
            "dev0's record at dev1",
        )
        # the hello: refused with the networks named, on both sides
        with pytest.raises(
            NetworkError, match="is on network 'gridmesh-devnet', not 'gridmesh-testnet'"
        ):
            await test0.net.connect(dev0.net.listen_addrs()[0])
        assert "gridmesh-devnet" in test0.net.refused_peers()[dev0.ident.peer_id]
        assert "gridmesh-testnet" in dev0.net.refused_peers()[test0.ident.peer_id]
        assert ("hello", "wrong_network") in dev0.rejects
        # connected anyway (a raw libp2p dial, no hello of ours): nothing is served
        info = info_from_p2p_addr(multiaddr.Multiaddr(dev0.net.listen_addrs()[0]))
        await test0.net.host.connect(info)
        with pytest.raises(Exception):  # noqa: B017 - unsupported, reset or closed
            with trio.fail_after(8):
                stream = await test0.net.host.new_stream(
                    info.peer_id, [dev0.net.scope.protocol(SYNC)]
                )
                await write_frame(stream, b"give me everything")
                await read_frame(stream)
        assert asked == []
        # its own protocol names are not even spoken there
        assert test0.net.scope.protocol(SYNC) not in {
            str(p) for p in dev0.net.host.get_mux().handlers if p is not None
        }
        # gossip on one topic name: the testnet host hears none of it
        heard: dict[str, list[bytes]] = {"dev1": [], "test0": []}

        async def on_dev1(origin: str, data: bytes) -> None:
            heard["dev1"].append(data)

        async def on_test0(origin: str, data: bytes) -> None:
            heard["test0"].append(data)

        await dev0.net.subscribe(TOPIC, on_dev1)  # a subscriber of its own, for the mesh
        await dev1.net.subscribe(TOPIC, on_dev1)
        await test0.net.subscribe(TOPIC, on_test0)
        with trio.fail_after(10):
            while not heard["dev1"]:
                await dev0.net.publish(TOPIC, b"devnet news")
                await trio.sleep(0.1)
        await test0.net.publish(TOPIC, b"testnet news")
        await trio.sleep(0.5)
        assert heard["test0"] == []
        assert b"testnet news" not in heard["dev1"]
        # test0's own record, put straight into dev0's DHT while connected: refused
        assert await test0.directory.lookup(dev0.ident.peer_id) is None
        record = records.make_record(
            test0.ident,
            network_id=TESTNET,
            now=time.time(),
            valid_for=60,
            addrs=[],
            resources={},
        )
        key = records.record_key(TESTNET, test0.ident.peer_id)
        stored = True
        with trio.move_on_after(10):  # dev0 holds it for the hello (5 s), then resets it
            stored = await test0.net.dht.value_store._store_at_peer(
                info.peer_id, key.encode(), record
            )
        assert not stored
        assert dev0.net.dht.value_store.get(key.encode()) is None
        assert test0.ident.peer_id not in dev0.net.known_peers()


async def test_a_dns4_bootstrap_address_is_resolved_when_dialled():
    """`/dns4/NAME/...` is kept as written and resolved by the dial (localhost here)."""
    a, b = _Host(TESTNET), _Host(TESTNET)
    async with _running(a, b):
        port = a.net.listen_addrs()[0].split("/tcp/")[1].split("/")[0]
        addr = f"/dns4/localhost/tcp/{port}/p2p/{a.ident.peer_id}"
        with trio.fail_after(10):
            assert await b.net.connect(addr) == a.ident.peer_id
        assert a.ident.peer_id in b.net.known_peers()
