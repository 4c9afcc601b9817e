"""One peer floods gone notices (p2p.gone) over gossip on the in-memory network, as a real
peer would: false notices about every honest node, notices about peers nobody lists, about
itself and about its receivers, and malformed ones. No honest live node is hidden, the
checks stay within what p2p.gone promises, the flood is counted, and a node cut off during
the flood still leaves every list within 10 s."""

from __future__ import annotations

import random
from collections import Counter

import msgspec
import trio

from p2p.discovery import DiscoverySettings, ResourceDirectory
from p2p.gone import GONE_TOPIC, MAX_CHECKS, MAX_FALSE, GoneNotice
from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork, MemoryNode

SETTINGS = DiscoverySettings(
    network_id="sim",
    record_validity_s=90,
    publish_interval_s=30,
    liveness_max_pings=4,  # 11 peers each: pings are capped, as at scale
)
HONEST = 12
FLOOD_S = 30.0


class _ProbeLog:
    """Wraps a node's gone-notice probe: how many run at once, and when each peer was asked."""

    def __init__(self, inner):  # type: ignore[no-untyped-def]
        self._inner = inner
        self.running = 0
        self.peak = 0
        self.asked: dict[str, list[float]] = {}

    async def __call__(self, peer_id: str) -> bool:
        self.running += 1
        self.peak = max(self.peak, self.running)
        self.asked.setdefault(peer_id, []).append(trio.current_time())
        try:
            return await self._inner(peer_id)
        finally:
            self.running -= 1


def _flood_batch(rng: random.Random, batch: int, honest: list[str]) -> list[bytes]:
    """One round of the flood: each payload distinct (gossip drops repeated bytes)."""
    notice = msgspec.msgpack.encode
    seq = batch % 256
    out = [notice(GoneNotice(peer_id, seq)) for peer_id in honest]  # all false
    out += [notice(GoneNotice(f"12D3KooNobody{rng.getrandbits(64):x}", seq)) for _ in range(4)]
    out.append(notice(GoneNotice("flooder", seq)))
    out += [
        rng.randbytes(rng.randrange(1, 300)),  # garbage, sometimes over the size bound
        notice({"peer": honest[batch % len(honest)], "seq": 256 + batch}),  # seq out of range
        notice({"peer": "", "seq": batch % 256}),  # empty peer id
        notice({"peer": "x" * 129, "seq": batch % 256}),  # peer id too long
        notice([honest[0], batch]),  # not a map
    ]
    return out


async def test_a_gone_notice_flood_hides_no_honest_node_stays_bounded_and_is_counted(
    autojump_clock,
):
    hub = MemoryNetwork(seed=31)
    rejects: list[Counter[str]] = [Counter() for _ in range(HONEST)]
    nodes: list[MemoryNode] = []
    directories: list[ResourceDirectory] = []
    for index in range(HONEST):
        ident = NodeIdentity.generate()
        node = hub.add_node(ident.peer_id)
        directory = ResourceDirectory(
            node,
            ident,
            SETTINGS,
            describe=lambda i=index: ([f"/memory/{i}"], {"i": i}),
            on_reject=lambda reason, c=rejects[index]: c.update([reason]),
        )
        node.set_validator(directory.validator)
        if nodes:
            await node.connect(nodes[0].peer_id)
        nodes.append(node)
        directories.append(directory)
    probes = [_ProbeLog(d.gone._probe) for d in directories]
    for directory, probe in zip(directories, probes, strict=True):
        directory.gone._probe = probe
    flooder = hub.add_node("flooder")
    for node in nodes[:3]:
        await flooder.connect(node.peer_id)
    ids = [node.peer_id for node in nodes]
    rng = random.Random(31)

    def hidden(live: list[int]) -> list[tuple[int, int]]:
        return [(a, b) for a in live for b in live if not directories[a].lists(ids[b])]

    async with trio.open_nursery() as nursery:
        for directory in directories:
            nursery.start_soon(directory.run)
            nursery.start_soon(directory.refresh_forever)
        await trio.sleep(20)  # virtual time (autojump clock): everyone finds everyone
        assert hidden(list(range(HONEST))) == []

        victim = HONEST - 1  # cut off halfway through the flood
        live = list(range(HONEST))
        started = trio.current_time()
        cut_at = started + FLOOD_S / 2
        gone_after: float | None = None
        batch = 0
        while trio.current_time() - started < FLOOD_S:
            for data in _flood_batch(rng, batch, ids):
                await flooder.publish(GONE_TOPIC, data)
            batch += 1
            await trio.sleep(0.25)  # virtual time (autojump clock)
            if victim in live and trio.current_time() >= cut_at:
                hub.partition([{ids[victim]}])  # its links silent, its connections open
                live.remove(victim)
            assert hidden(live) == [], trio.current_time() - started  # the flood hid nobody
            listed = any(directories[a].lists(ids[victim]) for a in live)
            if victim not in live and gone_after is None and not listed:
                gone_after = trio.current_time() - cut_at
        nursery.cancel_scope.cancel()

    assert gone_after is not None and gone_after <= 10, gone_after  # a true death still counts
    for index in live:
        gone, probe = directories[index].gone, probes[index]
        # at most MAX_CHECKS at once, and each peer at most once per recheck_s on the
        # flooder's word (own suspicions excepted: none of the live peers missed a ping)
        assert probe.peak <= MAX_CHECKS and gone.checks_peak <= MAX_CHECKS
        for peer_id, times in probe.asked.items():
            if peer_id != ids[victim]:
                gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
                assert all(gap >= 5.0 for gap in gaps), (peer_id, times)
        # the flooder is muted after MAX_FALSE refuted notices: its word costs little more
        false_checks = sum(len(t) for p, t in probe.asked.items() if p != ids[victim])
        assert false_checks <= MAX_FALSE + MAX_CHECKS, false_checks
        assert gone.refuted >= MAX_FALSE
        # counted, in the metrics too (on_reject); what a node refuses it does not forward,
        # so nodes the flooder does not send to directly may see no malformed or muted ones
        assert rejects[index]["gone_notice"] == gone.refused
        assert rejects[index]["gone_notice_muted"] == gone.muted
        assert rejects[index]["gone_notice_refuted"] >= MAX_FALSE
        assert directories[index].liveness.lost().keys() <= {ids[victim]}
    for index in range(3):  # the flooder's own peers: it sends to them directly
        assert directories[index].gone.refused > 0 and directories[index].gone.muted > 0
