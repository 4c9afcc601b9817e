"""Per-author quotas and the per-entry size limit, for local writes and peers' entries alike."""

from __future__ import annotations

from collections import Counter

import pytest

from p2p import identity
from registry.hlc import HybridClock
from registry.replica import Limits, Rejected, Replica, wire_size

ALICE, BOB = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()


class Time:
    ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def replica(ident, limits: Limits, time: Time | None = None) -> Replica:
    return Replica(ident, clock=HybridClock(time or Time()), limits=limits)


def recount(r: Replica) -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for entry in r.entries.values():
        for scope in ("*", entry.kind):
            row = out.setdefault((entry.author, scope), [0, 0])
            row[0] += 1
            row[1] += wire_size(entry)
    return out


def component(i: int, version: str = "1") -> dict[str, str]:
    return {"name": f"c{i}", "version": version}


async def test_an_author_at_its_entry_quota_is_refused_but_may_update_and_delete():
    time = Time()
    alice = replica(ALICE, Limits(author_max_entries=3), time)
    for i in range(3):
        await alice.put("components", f"c{i}", component(i))
    with pytest.raises(Rejected) as err:
        await alice.put("components", "c3", component(3))
    assert err.value.reason == "quota"
    assert "registry.author_max_entries" in str(err.value)
    await alice.put("components", "c0", component(0, "2"))  # in place: no growth
    await alice.put("components", "c1", None)  # a tombstone still counts, until collected
    with pytest.raises(Rejected):
        await alice.put("components", "c3", component(3))
    time.ms += 10_000
    assert await alice.collect_garbage(horizon_ms=1_000) == 1
    await alice.put("components", "c3", component(3))
    assert alice.usage == recount(alice)


async def test_peers_entries_over_quota_are_refused_and_counted_per_source():
    alice = replica(ALICE, Limits())
    entries = [await alice.put("components", f"c{i}", component(i)) for i in range(10)]
    size = max(wire_size(e) for e in entries)
    seen: Counter[str] = Counter()
    bob = Replica(
        BOB,
        clock=HybridClock(Time()),
        limits=Limits(author_max_entries=100, author_max_bytes=4 * size),
        on_reject=lambda source, reason: seen.update([f"{source}:{reason}"]),
    )
    applied = await bob.apply(entries, "gossip")
    assert applied == entries[:4]
    assert seen == Counter({"gossip:quota": 6})
    assert await bob.apply(entries, "sync") == []
    assert seen["sync:quota"] == 6 and bob.rejected["quota"] == 12
    assert bob.usage[(ALICE.peer_id, "*")][1] <= 4 * size
    assert bob.usage == recount(bob)
    quota = bob.stats()["quota"]  # what registry_stats shows an operator
    assert quota["author_max_bytes"] == 4 * size and quota["authors"] == 1
    assert quota["top_authors"] == [
        {"author": ALICE.peer_id, "entries": 4, "bytes": sum(wire_size(e) for e in entries[:4])}
    ]


async def test_a_per_kind_quota_bounds_one_kind_only():
    limits = Limits(per_kind={"endpoints": (1, 1 << 20)})
    alice = replica(ALICE, limits)
    await alice.put("endpoints", "e0", {"url": "http://a.example", "protocol": "http"})
    with pytest.raises(Rejected) as err:
        await alice.put("endpoints", "e1", {"url": "http://b.example", "protocol": "http"})
    assert err.value.reason == "quota" and "kind endpoints" in str(err.value)
    for i in range(5):
        await alice.put("components", f"c{i}", component(i))


async def test_an_entry_over_max_entry_bytes_is_refused_from_anyone():
    alice = replica(ALICE, Limits())
    big = await alice.put("components", "big", {"name": "x" * 3000, "version": "y" * 3000})
    small_limits = Limits(max_entry_bytes=4096)
    bob = replica(BOB, small_limits)
    assert await bob.apply([big], "sync") == []
    assert bob.rejected == Counter({"too_large": 1})
    with pytest.raises(Rejected) as err:
        await bob.put("components", "big", {"name": "x" * 3000, "version": "y" * 3000})
    assert err.value.reason == "too_large" and "registry.max_entry_bytes" in str(err.value)


async def test_a_batch_cannot_exceed_the_quota_in_one_go():
    alice = replica(ALICE, Limits())
    entries = [await alice.put("components", f"c{i}", component(i)) for i in range(6)]
    bob = replica(BOB, Limits(author_max_entries=2))
    assert await bob.apply(entries, "sync") == entries[:2]
    assert bob.usage == recount(bob)
