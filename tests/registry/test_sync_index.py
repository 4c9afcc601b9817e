"""The replica's anti-entropy index (`sync.Entries`) against a computation from scratch.

The bucket digests and the keys by bucket are kept as entries change, so a change that
reaches the entries without the index would make a replica announce digests (or list
entries) it does not hold: anti-entropy would then never converge on that bucket. Random
sequences of every way entries change (local writes and deletes, entries from a peer,
stale entries, garbage collection, a restart reading sqlite) are checked after each step.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from p2p import identity
from p2p.aio import open_bridge
from registry import sync
from registry.entry import Entry, EntryId
from registry.hlc import HybridClock
from registry.replica import Rejected, Replica
from registry.store import RegistryStore

ALICE, BOB = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()
VALUES = {
    "components": lambda n: {"name": "c", "version": str(n)},
    "endpoints": lambda n: {"url": f"http://e{n}.example", "protocol": "http"},
}
STEPS = 60


class FakeTime:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def _sorted_ids(entries: dict[EntryId, Entry], buckets: set[tuple[str, int]]) -> list[EntryId]:
    return sorted(i for i in entries if (i[0], sync.bucket_of(*i)) in buckets)


def check_index(held: sync.Entries, rng: random.Random) -> None:
    """Everything the index answers equals its computation over the plain entries."""
    plain = dict(held.items())
    assert held.digests() == sync.digests(plain.values())
    assert sorted(e.id for e in held.tombstones()) == sorted(
        i for i, e in plain.items() if e.deleted
    )
    kinds = sorted(VALUES)
    for kind in [*kinds, "blocks"]:  # (no entry of that one)
        assert sorted(e.id for e in held.of_kind(kind)) == sorted(i for i in plain if i[0] == kind)
    for _ in range(4):
        buckets = {
            (rng.choice(kinds), rng.randrange(sync.BUCKETS)) for _ in range(rng.randint(1, 6))
        }
        ids = _sorted_ids(plain, buckets)
        assert list(held.ids_in(buckets)) == ids
        if ids:
            after, end = sorted(rng.choices(ids, k=2))
            assert list(held.ids_in(buckets, after, end)) == [i for i in ids if after < i <= end]
        # a listing page and the plan of a peer's page: as over a freshly indexed copy
        listing = sync.listing(held, sorted(buckets), max_items=3)
        assert listing == sync.listing(plain, sorted(buckets), max_items=3)
        assert sync.plan(held, listing) == sync.plan(plain, listing)


def check_list(r: Replica, rng: random.Random) -> None:
    """`Replica.list` pages (read from the index) equal a filter of the sorted entries."""
    kind = rng.choice([None, *sorted(VALUES)])
    deleted = rng.random() < 0.5
    want = [
        e
        for i, e in sorted(r.entries.items())
        if (kind is None or i[0] == kind) and (deleted or not e.deleted)
    ]
    got, cursor = [], None
    while True:
        page = r.list(kind, limit=7, cursor=cursor, include_deleted=deleted)
        got += page.items
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert got == want


async def _step(rng: random.Random, r: Replica, peer: Replica, time: FakeTime) -> str:
    """One random change to `r`; what changed it (a refused or empty step says so)."""
    kind = rng.choice(sorted(VALUES))
    key = f"k{rng.randrange(24)}"
    held = r.get(kind, key)
    op = rng.choice(["put", "put", "put", "delete", "peer", "stale", "gc"])
    time.ms += rng.randrange(1, 50)
    try:
        if op == "put":  # a deleted key of its own too: the tombstone replaced
            await r.put(kind, key, VALUES[kind](rng.randrange(1000)))
        elif op == "delete":  # one of its own live keys
            mine = [e.id for e in r.entries.values() if e.owner == ALICE.peer_id and not e.deleted]
            if not mine:
                return "none"
            await r.put(*rng.choice(sorted(mine)), None)
        elif op == "peer":  # a peer's write of its own key, as gossip brings it
            theirs = peer.get(kind, key)
            if theirs is None or not theirs.deleted:
                deleting = theirs is not None and rng.random() < 0.3
                theirs = await peer.put(kind, key, None if deleting else VALUES[kind](1))
            if not await r.apply([theirs], "gossip"):
                return "peer: no change"
        elif op == "stale" and held is not None:
            assert await r.apply([held], "sync") == []  # held already: nothing changes
        elif op == "gc":
            time.ms += 5_000
            if not await r.collect_garbage(horizon_ms=1_000):
                return "gc: none"
        else:
            return "none"
    except Rejected:
        return "refused"  # a key the peer owns here
    return op


@pytest.mark.parametrize("seed", range(6))
async def test_index_equals_a_fresh_computation_after_any_changes(tmp_path: Path, seed: int):
    rng, checks = random.Random(seed), random.Random(-seed)  # the changes, what is checked
    time = FakeTime()
    clock = HybridClock(time)
    peer = Replica(BOB, clock=HybridClock(time))
    done: set[str] = set()
    async with open_bridge() as bridge:
        store = RegistryStore(bridge, tmp_path / "registry.db")
        await store.open()
        r = Replica(ALICE, clock=clock, store=store)
        await r.load()
        for _ in range(STEPS):
            if rng.random() < 0.1:  # a restart: everything back from sqlite, re-indexed
                before = dict(r.entries.items())
                r = Replica(ALICE, clock=clock, store=store)
                await r.load()
                assert dict(r.entries.items()) == before
                done.add("reload")
            else:
                done.add(await _step(rng, r, peer, time))
            check_index(r.entries, checks)
            check_list(r, checks)
        await store.close()
    # each sequence takes every path that changes the entries (one that no sequence took
    # could forget the index unnoticed)
    assert {"put", "delete", "peer", "gc", "reload"} <= done, done


async def test_garbage_collection_of_a_kinds_last_entry_drops_its_digests():
    time = FakeTime()
    r = Replica(ALICE, clock=HybridClock(time))
    await r.put("endpoints", "e", VALUES["endpoints"](1))
    await r.put("components", "c", VALUES["components"](1))
    first = r.digests()
    await r.put("endpoints", "e", None)
    time.ms += 10_000
    assert await r.collect_garbage(horizon_ms=1_000) == 1
    assert set(r.digests()) == {"components"} == set(sync.digests(r.entries.values()))
    assert set(first) == {"components", "endpoints"}  # a digests handed out stays as it was


def test_entries_are_read_only_but_through_put_and_remove():
    held = sync.Entries()
    with pytest.raises(TypeError):
        held[("components", "a")] = None  # type: ignore[index]
    assert not hasattr(held, "pop") and not hasattr(held, "update")
