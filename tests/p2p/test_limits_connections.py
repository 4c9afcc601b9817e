"""Connections are capped in total (inbound and outbound together) and per peer (HostLimits
`max_connections`, `max_connections_per_peer`, held by py-libp2p's resource manager through
p2p.caps): real peers on 127.0.0.1 connect past a cap; the connections over it are refused
and counted, the peers already connected are still served, and slots come back."""

from __future__ import annotations

from collections import Counter

import multiaddr
import pytest
import trio
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.rcmgr import Direction

from p2p import caps
from p2p.host import HostLimits
from p2p.network import NetworkError
from tests.p2p.test_gossip_validator import _node, _running, _until

ECHO = "/gridmesh/test/echo/1"


async def _echo(sender: str, payload: bytes) -> bytes:
    return payload


def _refused(rejects: Counter[str]) -> int:
    return rejects["connection:total_limit"] + rejects["connection:inbound_limit"]


async def test_connections_past_the_total_cap_are_refused_counted_and_come_back():
    rejects: Counter[str] = Counter()
    target = _node(rejects, HostLimits(max_connections=3))
    honest = [_node(Counter()) for _ in range(2)]
    crowd = [_node(Counter()) for _ in range(4)]
    target.set_request_handler(ECHO, _echo)
    async with _running(target, *honest, *crowd):
        addr = target.listen_addrs()[0]
        for peer in honest:
            await peer.connect(addr)
        await crowd[0].connect(addr)  # the third connection: the cap is full
        refused = 0
        for peer in crowd[1:]:
            try:
                await peer.connect(addr, timeout_s=5)
            except NetworkError:
                refused += 1
        assert refused == 3
        assert _refused(rejects) >= 3
        assert caps.connection_counts(target.host.get_network())["total"] <= 3
        # the peers inside the cap are still served, and the target is alive
        for peer in honest:
            assert await peer.request(target.peer_id, ECHO, b"hi", timeout_s=5) == b"hi"
        # outbound too: the target's own dial past the cap is refused and counted
        before = rejects["connection:total_limit"]
        with pytest.raises(NetworkError):
            await target.connect(crowd[3].listen_addrs()[0], timeout_s=5)
        assert rejects["connection:total_limit"] > before
        # a peer leaves: its slot comes back and a newcomer is served
        await target._drop_peer(crowd[0].peer_id)
        await _until(
            lambda: caps.connection_counts(target.host.get_network())["total"] == 2, 10, "gone"
        )
        with trio.fail_after(20):
            while True:  # the refused peer's own retry may still be on its way out
                try:
                    await crowd[1].connect(addr, timeout_s=5)
                    break
                except NetworkError:
                    await trio.sleep(0.2)
        assert await crowd[1].request(target.peer_id, ECHO, b"in", timeout_s=5) == b"in"


async def test_connections_past_the_per_peer_cap_are_refused_and_counted():
    rejects: Counter[str] = Counter()
    target = _node(rejects, HostLimits(max_connections_per_peer=2))
    greedy, honest = _node(Counter()), _node(Counter())
    target.set_request_handler(ECHO, _echo)
    async with _running(target, greedy, honest):
        addr = target.listen_addrs()[0]
        await greedy.connect(addr)
        await honest.connect(addr)
        info = info_from_p2p_addr(multiaddr.Multiaddr(addr))
        swarm = greedy.host.get_network()
        opened = refused = 0
        for _ in range(5):  # fresh connections from the same identity
            try:
                with trio.fail_after(5):
                    await swarm.dial_addr(info.addrs[0], info.peer_id)
                opened += 1
            except Exception:
                refused += 1
        await _until(
            lambda: rejects["connection:per_peer_limit"] >= 4, 10, "the extra connections counted"
        )
        conns = target.host.get_network().get_connections(ID.from_base58(greedy.peer_id))
        assert len(conns) <= 2
        assert rejects["connection:per_peer_limit"] == 4  # 1 + 5 dialled, 2 allowed
        # the honest peer, and the greedy one on its allowed connections, are still served
        assert await honest.request(target.peer_id, ECHO, b"hi", timeout_s=5) == b"hi"
        assert await greedy.request(target.peer_id, ECHO, b"me", timeout_s=5) == b"me"


def test_the_swarm_limits_never_refuse_before_the_caps():
    limits = HostLimits(max_connections=10, max_connections_per_peer=3)
    config = caps.connection_config(limits)
    assert config.max_connections == config.high_watermark == 11
    assert config.max_connections_per_peer == 3
    assert config.min_connections <= config.low_watermark <= 11
    manager = caps.resource_manager(limits, lambda source, reason: None)
    assert manager.limits.max_connections > 2 * 10
    assert manager.circuit_breaker is None and manager.graceful_degradation is None
    lifecycle = manager.connection_lifecycle.limits
    assert lifecycle.max_established_total == 10 and lifecycle.max_established_per_peer == 3


def test_the_managers_own_refusals_are_counted():
    rejects: Counter[str] = Counter()
    manager = caps.resource_manager(
        HostLimits(), lambda source, reason: rejects.update([f"{source}:{reason}"])
    )
    manager.limits.max_streams = 1
    assert manager.acquire_stream("", Direction.INBOUND)
    assert not manager.acquire_stream("", Direction.INBOUND)
    assert rejects["stream:resource_limit"] == 1
    manager.limits.max_connections = 0
    assert manager.open_connection(None, endpoint_ip="127.0.0.1") is None
    assert rejects["connection:resource_limit"] == 1
