"""A look-up's DHT walk is a hedge when the record's node is connected: budgeted, so that a
loaded machine, where every node answers late, does not turn each look-up into a walk (the
election procs tests' daemons opened ~870 DHT streams a minute each and KadDHT refused the
most of them: p2p.discovery.HEDGE_PER_LOOKUP)."""

from __future__ import annotations

import math

import trio

from p2p import discovery
from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.identity import NodeIdentity
from p2p.network import NetworkError
from p2p.testing.memnet import MemoryNetwork, MemoryNode

SETTINGS = DiscoverySettings(network_id="sim", record_validity_s=90, publish_interval_s=30)
LOOKUPS = 40


class _SlowOwners:
    """The asker's network: every node asked for its own record answers, but only after
    `delay_s` (past WALK_AFTER_S: a busy node), or, `unreachable`, cannot be dialled (and so
    is never connected); walks are counted and answer at once."""

    def __init__(self, inner: MemoryNode, delay_s: float, unreachable: str | None) -> None:
        self._inner = inner
        self._delay_s = delay_s
        self._unreachable = unreachable
        self.walks = 0

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def connected_peers(self) -> set[str]:
        return self._inner.connected_peers() - {self._unreachable}

    async def dht_get_from(self, peer_id: str, key: str) -> bytes | None:
        await trio.sleep(self._delay_s)
        if peer_id == self._unreachable:
            raise NetworkError(f"cannot dial {peer_id}")
        return await self._inner.dht_get_from(peer_id, key)

    async def dht_get(self, key: str) -> bytes | None:
        self.walks += 1
        return await self._inner.dht_get(key)


async def _asker_and_target(reachable: bool) -> tuple[ResourceDirectory, _SlowOwners, str]:
    hub = MemoryNetwork(seed=11)
    idents = [NodeIdentity.generate() for _ in range(3)]  # asker, target, a third holder
    nodes = [hub.add_node(ident.peer_id) for ident in idents]
    directories = [
        ResourceDirectory(node, ident, SETTINGS, describe=lambda i=i: ([f"/memory/{i}"], {}))
        for i, (node, ident) in enumerate(zip(nodes, idents, strict=True))
    ]
    for node, directory in zip(nodes, directories, strict=True):
        node.set_validator(directory.validator)
    await nodes[2].connect(idents[0].peer_id)
    await nodes[2].connect(idents[1].peer_id)
    assert await directories[1].publish_once()  # its record: on the third node too
    seam = _SlowOwners(nodes[0], 1.0, None if reachable else idents[1].peer_id)
    asker = ResourceDirectory(seam, idents[0], SETTINGS, describe=lambda: ([], {}))  # type: ignore[arg-type]
    return asker, seam, idents[1].peer_id


async def test_look_ups_of_a_slow_connected_node_walk_within_the_budget(autojump_clock):
    asker, seam, target = await _asker_and_target(reachable=True)
    for _ in range(LOOKUPS):
        record = await asker.lookup(target)
        assert record is not None and record.peer_id == target  # its node's or the walk's
    allowed = discovery.HEDGE_BURST + discovery.HEDGE_PER_LOOKUP * LOOKUPS
    assert 1 <= seam.walks <= math.floor(allowed), seam.walks
    assert asker.hedges_skipped == LOOKUPS - seam.walks


async def test_look_ups_of_a_node_that_cannot_be_dialled_walk_each_time(autojump_clock):
    asker, seam, target = await _asker_and_target(reachable=False)
    for _ in range(LOOKUPS):
        record = await asker.lookup(target)
        assert record is not None and record.peer_id == target
    assert seam.walks == LOOKUPS
    assert asker.hedges_skipped == 0
