"""Registry limits on the in-memory network: a hostile peer with its own identity gossips and
pushes bad-typed, oversized, impersonating and quota-busting entries; a registry larger than
the sync message limit reaches a newly joined node completely.

Virtual time (`autojump_clock`); every node is a real Replica + Replicator on `p2p.testing.memnet`.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import pytest
import trio

from p2p import codec
from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork, MemoryNode
from registry import sync
from registry.blocks import announcement_key, announcements
from registry.entry import Entry, sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import Limits, Replica
from registry.replication import SYNC_PROTOCOL, ReplicationSettings, Replicator, topic_for

SETTINGS = ReplicationSettings(network_id="limits")
LIMITS = Limits(max_entry_bytes=8 * 1024, author_max_entries=200, author_max_bytes=512 * 1024)


@dataclass
class SimNode:
    ident: NodeIdentity
    node: MemoryNode
    replica: Replica
    replicator: Replicator
    rejects: Counter[str] = field(default_factory=Counter)

    @property
    def peer_id(self) -> str:
        return self.node.peer_id


def add_node(
    hub: MemoryNetwork, settings: ReplicationSettings = SETTINGS, limits: Limits = LIMITS
) -> SimNode:
    ident = NodeIdentity(node_seed=hub.rng.randbytes(32), payout_key=hub.rng.randbytes(32))
    node = hub.add_node(ident.peer_id)
    rejects: Counter[str] = Counter()

    def count(source: str, reason: str) -> None:
        rejects.update([f"{source}:{reason}"])

    replica = Replica(
        ident,
        clock=HybridClock(now_ms=lambda: int(hub.now() * 1000)),
        limits=limits,
        on_reject=count,
    )
    replicator = Replicator(
        node, replica, settings, rng=random.Random(hub.rng.random()), on_reject=count
    )
    return SimNode(ident, node, replica, replicator, rejects)


async def start(nursery: trio.Nursery, sim: SimNode) -> None:
    await sim.replicator.start()
    nursery.start_soon(sim.replicator.run_anti_entropy)
    nursery.start_soon(sim.node.run_maintenance, 30.0)


async def network(
    nursery: trio.Nursery, hub: MemoryNetwork, count: int, **kw: Any
) -> list[SimNode]:
    sims: list[SimNode] = []
    for _ in range(count):
        sim = add_node(hub, **kw)
        if sims:
            await sim.node.connect(sims[-1].peer_id)
        await start(nursery, sim)
        sims.append(sim)
    await trio.sleep(5)  # virtual time: the first routing refreshes spread the chain
    return sims


async def wait_for(condition: Any, limit_s: float, what: str) -> None:
    deadline = trio.current_time() + limit_s
    while not condition():
        assert trio.current_time() < deadline, f"no {what} within {limit_s} virtual s"
        await trio.sleep(0.5)  # virtual time (autojump clock)


def signed(
    ident: NodeIdentity, kind: str, key: str, value: dict[str, Any], now_ms: int, n: int = 0
) -> Entry:
    ts = Timestamp(now_ms, n)
    return sign_entry(
        ident, kind=kind, key=key, value=value, ts=ts, created=ts, owner=ident.peer_id
    )


def announcement(
    peer_id: str, start: int, end: int, key: str | None = None, **parameters: Any
) -> dict[str, Any]:
    key = key or announcement_key("m", start, end, peer_id)
    return {
        "blockId": key,
        "blockComponentURI": "m",
        "model": "m",
        "layers": [start, end],
        "served_by": [peer_id],
        "parameters": {"ms_per_layer": 1.5, **parameters},
    }


def honest_entries(sim: SimNode, honest: set[str]) -> dict[Any, Entry]:
    return {i: e for i, e in sim.replica.entries.items() if e.author in honest}


async def test_a_hostile_peer_is_refused_counted_and_cannot_wedge_sync(autojump_clock):
    hub = MemoryNetwork(seed=11, fanout=16)
    settings = replace(SETTINGS, max_message_bytes=64 * 1024)
    async with trio.open_nursery() as nursery:
        sims = await network(nursery, hub, 4, settings=settings)
        for i, sim in enumerate(sims):
            for j in range(10):
                value = {"name": f"c{i}-{j}", "version": "1"}
                await sim.replicator.write("components", f"honest-{i}-{j}", value)
            key = announcement_key("m", i, i + 1, sim.peer_id)
            await sim.replicator.write("blocks", key, announcement(sim.peer_id, i, i + 1))
        honest = {sim.peer_id for sim in sims}
        await wait_for(
            lambda: all(len(s.replica.entries) == 44 for s in sims), 20, "honest convergence"
        )

        mallory = NodeIdentity.generate()
        attacker = hub.add_node(mallory.peer_id)
        for sim in sims:
            await attacker.connect(sim.peer_id)
        now = int(hub.now() * 1000)
        victim = sims[0].peer_id
        bad: list[Entry] = [
            # the entry that killed every daemon: ms_per_layer a string
            signed(
                mallory,
                "blocks",
                announcement_key("m", 0, 4, mallory.peer_id),
                announcement(mallory.peer_id, 0, 4, ms_per_layer="fast"),
                now,
            ),
            # announcing someone else as a server
            signed(
                mallory, "blocks", "fake-server", announcement(victim, 0, 4, "fake-server"), now
            ),
            # squatting the key the victim announces under
            signed(
                mallory,
                "blocks",
                announcement_key("m", 8, 9, victim),
                announcement(mallory.peer_id, 8, 9, announcement_key("m", 8, 9, victim)),
                now,
            ),
            # over the per-entry limit (the schema alone allows 64 KiB)
            signed(mallory, "components", "big", {"name": "x" * 4000, "version": "y" * 4000}, now),
        ]
        flood = [
            signed(mallory, "components", f"flood-{n}", {"name": "f" * 900, "version": "1"}, now, n)
            for n in range(1200)
        ]
        wire = [e.to_wire() for e in bad + flood]
        for start_ in range(0, len(wire), 64):  # gossip, as a peer publishes it
            data = codec.encode({"v": 1, "entries": wire[start_ : start_ + 64]})
            await attacker.publish(topic_for(SETTINGS.network_id), data)
            await trio.sleep(0.01)
        for sim in sims:  # and sync pushes, straight to each node
            for start_ in range(0, len(wire), 50):
                push = {"v": 1, "op": "push", "entries": wire[start_ : start_ + 50]}
                reply = await attacker.request(sim.peer_id, SYNC_PROTOCOL, codec.encode(push))
                assert codec.decode(reply)["v"] == 1
        await trio.sleep(3)

        for sim in sims:
            rejected = sim.replica.rejected
            assert rejected["schema"] >= 1, rejected  # ms_per_layer "fast"
            assert rejected["admission"] >= 2, rejected  # impersonation, squatting
            assert rejected["too_large"] >= 1, rejected
            assert rejected["quota"] >= 1000, rejected
            assert sim.rejects["gossip:quota"] >= 1 and sim.rejects["sync:quota"] >= 1
            held = [e for e in sim.replica.entries.values() if e.author == mallory.peer_id]
            assert len(held) <= LIMITS.author_max_entries
            assert sum(len(codec.encode(e.to_wire())) for e in held) <= LIMITS.author_max_bytes
            assert {e.key for e in held} <= {f"flood-{n}" for n in range(1200)}
            # routing sees exactly the honest servers
            assert sorted(a.peer_id for a in announcements(sim.replica.entries.values())) == (
                sorted(honest)
            )

        # honest writes keep replicating, and a new node receives every honest entry
        await sims[1].replicator.write("components", "after", {"name": "a", "version": "1"})
        joiner = add_node(hub, settings=settings)
        await joiner.node.connect(sims[2].peer_id)
        await start(nursery, joiner)
        honest.add(joiner.peer_id)
        await wait_for(
            lambda: (
                len(honest_entries(sims[0], honest)) == 45
                and all(honest_entries(s, honest) == honest_entries(sims[0], honest) for s in sims)
                and honest_entries(joiner, honest) == honest_entries(sims[0], honest)
            ),
            30,
            "every honest entry everywhere",
        )
        nursery.cancel_scope.cancel()


async def test_a_registry_larger_than_the_message_limit_reaches_a_new_node(autojump_clock):
    """1,200 entries of ~1.5 KB (1.9 MB) by 40 authors, each under quota, against a 32 KiB
    sync message limit: listings, pull replies and pushes are all paged, and a new node
    walking at most two listing pages per round still ends with every entry."""
    hub = MemoryNetwork(seed=5)
    settings = replace(SETTINGS, max_message_bytes=32 * 1024)
    async with trio.open_nursery() as nursery:
        sims = await network(nursery, hub, 3, settings=settings)
        authors = [NodeIdentity.generate() for _ in range(40)]
        now = int(hub.now() * 1000)
        entries = [
            signed(
                author,
                "components",
                f"a{a}-{n}",
                {"name": "n" * 1400, "version": str(n)},
                now,
                n,
            )
            for a, author in enumerate(authors)
            for n in range(30)
        ]
        total = sum(len(codec.encode(e.to_wire())) for e in entries)
        assert total > 50 * settings.max_message_bytes
        assert await sims[0].replica.apply(entries, "local") == entries
        await wait_for(
            lambda: all(len(s.replica.entries) == len(entries) for s in sims), 60, "convergence"
        )
        # the joiner takes (almost) no pushes: it must walk the listing pages itself, or the
        # others' pushes may bring it everything first (as they do since gossip is validated)
        joiner = add_node(
            hub,
            settings=replace(
                settings, max_pages_per_round=2, push_bytes_per_s=1.0, push_bytes_burst=1
            ),
        )
        await joiner.node.connect(sims[1].peer_id)
        await start(nursery, joiner)
        await wait_for(
            lambda: joiner.replica.entries == sims[0].replica.entries, 120, "the joiner's catch-up"
        )
        assert joiner.replicator.stats["sync_pages"] > 2
        for sim in [*sims, joiner]:
            assert sim.replica.rejected.total() == 0
            assert not any("too_large" in r for r in sim.rejects), sim.rejects
        nursery.cancel_scope.cancel()


async def test_entries_a_node_refuses_are_not_fetched_or_pushed_every_round(autojump_clock):
    """Two nodes whose quotas differ (an older config, or entries that arrived in another
    order): the stricter node refuses 15 of the author's 20 entries once, not every round
    in either direction, and retries them after `refused_ttl_s`."""
    hub = MemoryNetwork(seed=8)
    settings = replace(SETTINGS, refused_ttl_s=30.0)
    generous = add_node(hub, settings=settings, limits=Limits())
    strict = add_node(hub, settings=settings, limits=Limits(author_max_entries=5))
    await strict.node.connect(generous.peer_id)
    author = NodeIdentity.generate()
    now = int(hub.now() * 1000)
    entries = [
        signed(author, "components", f"e{n}", {"name": "e", "version": str(n)}, now, n)
        for n in range(20)
    ]
    assert await generous.replica.apply(entries, "local") == entries
    async with trio.open_nursery() as nursery:
        await start(nursery, generous)
        await start(nursery, strict)
        await trio.sleep(10)  # about ten rounds each way
        held = [e for e in strict.replica.entries.values() if e.author == author.peer_id]
        assert len(held) == 5
        first = strict.replica.rejected["quota"]
        assert 15 <= first <= 30, first  # a pull and a push may both deliver them once
        rounds = strict.replicator.stats["sync_rounds"] + generous.replicator.stats["sync_rounds"]
        await trio.sleep(15)
        more = strict.replicator.stats["sync_rounds"] + generous.replicator.stats["sync_rounds"]
        assert more - rounds >= 10
        assert strict.replica.rejected["quota"] == first  # no refetch, no re-push
        assert strict.replicator.stats["sync_skipped_refused"] > 0
        assert generous.replicator.stats["sync_skipped_refused"] > 0
        await trio.sleep(40)  # past the TTL: tried again (and refused again)
        assert strict.replica.rejected["quota"] > first
        nursery.cancel_scope.cancel()


async def test_a_hostile_sync_server_cannot_make_a_round_loop(autojump_clock):
    """A peer that answers every pull with `more` and entries nobody asked for, and lists the
    same page again and again: the round ends (with an error), takes nothing unasked."""
    hub = MemoryNetwork(seed=4)
    honest = add_node(hub)
    mallory = NodeIdentity.generate()
    evil = hub.add_node(mallory.peer_id)
    await honest.node.connect(evil.peer_id)
    now = int(hub.now() * 1000)
    listed = signed(mallory, "components", "listed", {"name": "a", "version": "1"}, now)
    pushed = signed(mallory, "components", "unasked", {"name": "b", "version": "1"}, now)
    asked: Counter[str] = Counter()

    async def serve(sender: str, payload: bytes) -> bytes:
        op = codec.decode(payload)["op"]
        asked[op] += 1
        if op == "digests":
            kind, key, claim, version = sync.summary(listed)
            return codec.encode(
                {
                    "v": 1,
                    "buckets": [[kind, sync.bucket_of(kind, key)]],
                    "summaries": [[kind, key, claim, version]],
                    "truncated": True,
                    "next": {"kind": kind, "key": key},  # never advances
                }
            )
        return codec.encode({"v": 1, "entries": [pushed.to_wire()], "more": True})

    evil.set_request_handler(SYNC_PROTOCOL, serve)
    with trio.fail_after(10), pytest.raises(sync.SyncError, match="did not advance"):
        await honest.replicator.sync_with(evil.peer_id)
    assert asked == Counter({"digests": 2, "pull": 2})
    assert honest.rejects["sync:unrequested"] == 2
    assert honest.replica.entries == {}


async def test_gossip_of_large_entries_is_split_under_the_gossip_limit(autojump_clock):
    """64 entries of ~30 KB (re-announced after a pull, say) do not fit one 512 KiB gossip
    message: they go out in several, and every receiver applies all of them."""
    hub = MemoryNetwork(seed=6, fanout=8)
    a, b = add_node(hub, limits=Limits()), add_node(hub, limits=Limits())
    await b.node.connect(a.peer_id)
    await a.replicator.start()
    await b.replicator.start()  # gossip only: no anti-entropy to make up for a refusal
    authors = [NodeIdentity.generate() for _ in range(8)]
    now = int(hub.now() * 1000)
    entries = [
        signed(
            authors[n % 8],
            "components",
            f"big-{n}",
            {"name": "n", "version": "1", "config": {f"k{i}": "x" * 4000 for i in range(7)}},
            now,
            n,
        )
        for n in range(64)
    ]
    assert sum(len(codec.encode(e.to_wire())) for e in entries) > 1 << 20
    assert await a.replica.apply(entries, "local") == entries
    await a.replicator.announce(entries)
    await wait_for(lambda: len(b.replica.entries) == 64, 10, "every gossiped entry")
    assert a.replicator.stats["gossip_sent"] >= 4
    assert not b.rejects, b.rejects
