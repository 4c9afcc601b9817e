"""Inbound streams served at once are capped per peer and per protocol (HostLimits
`max_streams_per_peer`, `max_streams_per_protocol`, enforced by p2p.guard.StreamGuard): real
peers hold streams open on a protocol whose handler never returns; those over a cap are reset
and counted, and slots come back when streams end."""

from __future__ import annotations

from collections import Counter

import trio

from p2p.host import HostLimits
from p2p.network import NetworkError
from tests.p2p.test_gossip_validator import _node, _running, _until

HOLD = "/gridmesh/hold/1.0.0"


async def test_streams_over_the_per_peer_and_per_protocol_caps_are_reset_and_counted():
    rejects: Counter[str] = Counter()
    limits = HostLimits(max_streams_per_peer=4, max_streams_per_protocol=5)
    target, a, b = _node(rejects, limits), _node(Counter()), _node(Counter())
    release = trio.Event()
    serving: list[str] = []

    async def hold(stream) -> None:
        serving.append(stream.peer_id)
        await release.wait()

    async def open_held(peer, count: int, streams: list) -> None:
        for _ in range(count):
            try:  # one over a cap may be reset before its negotiation is even answered
                stream = await peer.open_stream(target.peer_id, HOLD)
                await stream.send(b"x")
            except NetworkError:
                continue
            streams.append(stream)

    target.set_stream_handler(HOLD, hold)
    async with _running(target, a, b):
        await a.connect(target.listen_addrs()[0])
        await b.connect(target.listen_addrs()[0])
        held_a: list = []
        await open_held(a, 8, held_a)
        guard = target._guard
        # a's cap counts all its streams (its gossip stream too): the rest were reset
        await _until(
            lambda: serving.count(a.peer_id) + rejects["stream:too_many_streams"] == 8,
            10,
            "each of a's streams served or refused",
        )
        assert guard.open_by_peer[a.peer_id] == 4 and serving.count(a.peer_id) >= 3
        held_b: list = []
        await open_held(b, 4, held_b)
        served_a = serving.count(a.peer_id)
        await _until(
            lambda: serving.count(b.peer_id) + rejects["stream:protocol_busy"] == 4,
            10,
            "each of b's streams served or refused",
        )
        assert guard.open_by_protocol[target.scope.protocol(HOLD)] == 5
        assert serving.count(b.peer_id) == 5 - served_a
        assert target.bans.scores.score(a.peer_id) < 0  # over its own cap: held against it
        assert target.bans.scores.score(b.peer_id) == 0  # the protocol was busy: not its fault
        # the handlers end: every slot comes back
        release.set()
        hold_id = target.scope.protocol(HOLD)
        await _until(lambda: hold_id not in guard.open_by_protocol, 10, "the slots back")
        release = trio.Event()
        more: list = []
        await open_held(a, 3, more)
        await _until(lambda: serving.count(a.peer_id) == served_a + 3, 10, "a served again")
        release.set()
