"""py-libp2p's auto-connector, bounded (p2p.peers.AutoDialBound), on real hosts: a peer that
left is dialled a few times, less and less often, then no more; one that connects again is
dialled again if it goes.

The connector runs its cycles on the wall clock (every 10 s below its watermarks, which a
small network always is); here its clock is a fake one moved 10 s a cycle, and its cycles
are run by the test, so an hour passes in a second. The dials are real (a closed port)."""

from __future__ import annotations

import socket

import multiaddr
import pytest
from libp2p.network import auto_connector
from libp2p.peer.id import ID

from p2p import identity, records
from p2p.host import Libp2pNetwork
from p2p.peers import AUTO_DIAL_MAX_FAILURES

NET = "autodials"
GONE = identity.NodeIdentity(bytes([41]) * 32, bytes([42]) * 32).peer_id


class _AnyValue:
    def validate(self, key: str, value: bytes) -> None:
        return None

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


def _net() -> Libp2pNetwork:
    return Libp2pNetwork(
        identity.NodeIdentity.generate(),
        network_id=NET,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=_AnyValue(),
    )


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then closed): where a killed peer was."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_a_peer_that_left_is_auto_dialled_a_few_times_then_forgotten(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr(auto_connector.time, "time", lambda: clock[0])
    node = _net()
    async with node.run():
        # a peer that was here and left: known at an address nothing answers at any more
        port = _closed_port()
        gone = ID.from_base58(GONE)
        node.host.get_peerstore().add_addrs(
            gone, [multiaddr.Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")], 7200
        )
        assert node.peer_addrs(GONE)
        swarm = node.host.get_network()
        dialled: list[float] = []  # the connector's dials of it (py-libp2p's swarm may
        dial_peer = swarm.dial_peer  # refuse some itself, within its own backoff)

        async def recorded(peer_id: ID) -> object:
            if peer_id == gone:
                dialled.append(clock[0])
            return await dial_peer(peer_id)

        swarm.dial_peer = recorded
        connector = swarm.auto_connector
        started = clock[0]
        for _ in range(360):  # an hour of its cycles
            clock[0] += 10.0
            await connector.maybe_connect()
        assert 2 <= len(dialled) <= AUTO_DIAL_MAX_FAILURES, dialled
        assert dialled[-1] - started < 600, dialled  # the last within ten minutes, none after
        assert node.auto_dials.forgotten_total == 1
        # it connects again (our notifee's `connected`): dialled again should it go
        node.auto_dials.forgive(gone)
        assert not connector._should_skip_peer(gone)
