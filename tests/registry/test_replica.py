"""The replica's checks: signatures, ownership, cluster admins, schemas, admission, paging."""

import dataclasses

import pytest

from p2p import identity
from registry.entry import sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import Rejected, Replica

ALICE, BOB, CAROL = (identity.NodeIdentity.generate() for _ in range(3))
COMPONENT = {"name": "llama", "version": "1"}


class FakeTime:
    def __init__(self) -> None:
        self.ms = 1_000_000

    def __call__(self) -> int:
        return self.ms


def replica_for(ident, time=None):
    return Replica(ident, clock=HybridClock(time or FakeTime()))


async def test_put_get_update_delete():
    r = replica_for(ALICE)
    created = await r.put("components", "llama", COMPONENT)
    assert r.get("components", "llama") == created
    updated = await r.put("components", "llama", {**COMPONENT, "version": "2"})
    assert updated.claim == created.claim and updated.ts > created.ts
    gone = await r.put("components", "llama", None)
    assert gone.deleted and r.list("components").items == []
    assert r.stats()["deleted"] == 1


async def test_someone_elses_entry_is_refused_locally_and_remotely():
    alice, bob = replica_for(ALICE), replica_for(BOB)
    entry = await alice.put("components", "llama", COMPONENT)
    assert await bob.apply([entry]) == [entry]
    with pytest.raises(Rejected) as err:
        await bob.put("components", "llama", {**COMPONENT, "version": "evil"})
    assert err.value.reason == "unauthorized"
    # a forged update: Bob signs an entry carrying Alice's claim
    forged = sign_entry(
        BOB,
        kind="components",
        key="llama",
        value={**COMPONENT, "version": "evil"},
        ts=Timestamp(entry.ts.wall_ms + 1, 0),
        created=entry.created,
        owner=ALICE.peer_id,
    )
    assert await alice.apply([forged]) == []
    assert alice.rejected["unauthorized"] == 1
    assert alice.get("components", "llama") == entry


async def test_bad_signature_and_schema_rejected():
    r = replica_for(ALICE)
    good = await replica_for(BOB).put("components", "x", COMPONENT)
    # the fields only (a held entry's __dict__ carries its cached hashes too)
    tampered = dataclasses.replace(good, value={**COMPONENT, "version": "9"})
    assert await r.apply([tampered]) == []
    assert r.rejected["bad_signature"] == 1
    bad_schema = sign_entry(
        BOB,
        kind="components",
        key="y",
        value={"name": 3},
        ts=Timestamp(1, 0),
        created=Timestamp(1, 0),
        owner=BOB.peer_id,
    )
    assert await r.apply([bad_schema]) == []
    assert r.rejected["schema"] == 1
    with pytest.raises(Rejected) as err:
        await r.put("blocks", "b", {"blockId": "other", "blockComponentURI": "x"})
    assert err.value.reason == "schema"


async def test_future_timestamp_rejected():
    time = FakeTime()
    r = replica_for(ALICE, time)
    future = sign_entry(
        BOB,
        kind="components",
        key="x",
        value=COMPONENT,
        ts=Timestamp(time.ms + 3_600_000, 0),
        created=Timestamp(time.ms, 0),
        owner=BOB.peer_id,
    )
    assert await r.apply([future]) == []
    assert r.rejected["bad_timestamp"] == 1


async def test_cluster_admins_control_members_and_cluster_entries():
    alice, carol = replica_for(ALICE), replica_for(CAROL)
    cluster = await alice.put("clusters", "c1", {"name": "c1", "admins": [ALICE.peer_id]})
    member = await alice.put(
        "members",
        f"c1/{BOB.peer_id}",
        {"cluster_id": "c1", "peer_id": BOB.peer_id, "roles": ["worker"]},
    )
    # a member entry before its cluster: refused until the cluster arrives
    assert await carol.apply([member]) == []
    assert carol.rejected["unknown_cluster"] == 1
    assert await carol.apply([cluster, member]) == [cluster, member]
    with pytest.raises(Rejected) as err:
        await carol.put(
            "members",
            f"c1/{CAROL.peer_id}",
            {"cluster_id": "c1", "peer_id": CAROL.peer_id, "roles": ["admin"]},
        )
    assert err.value.reason == "unauthorized"
    # entries naming the cluster are admin-only too
    with pytest.raises(Rejected):
        await carol.put("components", "m", {**COMPONENT, "cluster_id": "c1"})
    # adding Carol as admin lets her write, even entries Alice created
    await alice.put("clusters", "c1", {"name": "c1", "admins": [ALICE.peer_id, CAROL.peer_id]})
    await carol.apply(alice.entries.values())
    updated = await carol.put(
        "members",
        f"c1/{BOB.peer_id}",
        {"cluster_id": "c1", "peer_id": BOB.peer_id, "roles": ["worker", "observer"]},
    )
    assert updated.owner == ALICE.peer_id and updated.author == CAROL.peer_id
    assert await alice.apply([updated]) == [updated]


async def test_creator_must_be_admin_of_new_cluster():
    r = replica_for(ALICE)
    with pytest.raises(Rejected) as err:
        await r.put("clusters", "c2", {"name": "c2", "admins": [BOB.peer_id]})
    assert err.value.reason == "unauthorized"


async def test_delete_of_missing_and_recreate_by_other_after_delete():
    alice, bob = replica_for(ALICE), replica_for(BOB)
    with pytest.raises(Rejected) as err:
        await alice.put("components", "nope", None)
    assert err.value.reason == "not_found"
    await alice.put("components", "k", COMPONENT)
    tomb = await alice.put("components", "k", None)
    await bob.apply([tomb])
    with pytest.raises(Rejected, match="tombstone"):
        await bob.put("components", "k", COMPONENT)
    again = await alice.put("components", "k", COMPONENT)  # the owner may re-create
    assert again.claim == tomb.claim and not again.deleted


async def test_list_filter_and_paging():
    r = replica_for(ALICE)
    for i in range(5):
        await r.put("components", f"c{i}", {**COMPONENT, "version": str(i)})
    page = r.list("components", limit=2)
    assert [e.key for e in page.items] == ["c0", "c1"] and page.next_cursor
    page2 = r.list("components", limit=2, cursor=page.next_cursor)
    assert [e.key for e in page2.items] == ["c2", "c3"]
    last = r.list("components", limit=2, cursor=page2.next_cursor)
    assert [e.key for e in last.items] == ["c4"] and last.next_cursor is None
    only = r.list("components", lambda rec: rec["value"]["version"] in ("1", "3"))
    assert [e.key for e in only.items] == ["c1", "c3"]
    with pytest.raises(Rejected):
        r.list("components", cursor="garbage!!")


async def test_garbage_collection_of_tombstones():
    time = FakeTime()
    r = replica_for(ALICE, time)
    await r.put("components", "k", COMPONENT)
    await r.put("components", "k", None)
    time.ms += 10_000
    assert await r.collect_garbage(horizon_ms=60_000) == 0
    time.ms += 60_000
    assert await r.collect_garbage(horizon_ms=60_000) == 1
    assert r.get("components", "k") is None


async def test_a_backdated_claim_cannot_take_over_an_owned_key():
    time = FakeTime()
    alice, carol = replica_for(ALICE, time), replica_for(CAROL, time)
    owned = await alice.put("components", "llama", COMPONENT)
    await carol.apply([owned])
    time.ms += 120_000  # two minutes later, Bob signs a create "from before" Alice's
    stolen = sign_entry(
        BOB,
        kind="components",
        key="llama",
        value={**COMPONENT, "version": "mine"},
        ts=Timestamp(time.ms, 0),
        created=Timestamp(owned.created.wall_ms - 1, 0),
        owner=BOB.peer_id,
    )
    for replica in (alice, carol):
        assert await replica.apply([stolen], "gossip") == []
        assert replica.rejected["stale_claim"] == 1
        assert replica.get("components", "llama") == owned


async def test_concurrent_creates_converge_on_the_earlier_claim():
    time = FakeTime()
    alice, bob = replica_for(ALICE, time), replica_for(BOB, time)
    first = await alice.put("components", "k", COMPONENT)
    time.ms += 300  # Bob creates the same key before hearing of Alice's
    second = await bob.put("components", "k", {**COMPONENT, "version": "2"})
    await alice.apply([second])
    await bob.apply([first])
    assert alice.get("components", "k") == bob.get("components", "k") == first


async def test_cached_digests_follow_every_change():
    """`Replica.digests()` is cached; every way entries change (local writes, entries from
    peers, garbage collection) must show in the next digests exactly as a fresh computation."""
    from registry import sync

    time = FakeTime()
    r, other = replica_for(ALICE, time), replica_for(BOB, time)

    def fresh() -> dict[str, list[bytes]]:
        return sync.digests(r.entries.values())

    assert r.digests() == fresh() == {}
    await r.put("components", "a", COMPONENT)
    first = r.digests()
    assert first == fresh() and first
    await r.put("components", "a", {**COMPONENT, "version": "2"})  # same key, same count
    assert r.digests() == fresh() != first
    theirs = await other.put("components", "b", COMPONENT)
    assert await r.apply([theirs], "gossip")
    assert r.digests() == fresh()
    await r.put("components", "a", None)
    time.ms += 10_000_000
    assert await r.collect_garbage(horizon_ms=1_000) == 1
    assert r.digests() == fresh()
    assert ("components", "a") not in r.entries


async def test_changes_moves_with_every_change_to_the_entries():
    alice, bob = replica_for(ALICE), replica_for(BOB)
    seen = [alice.changes]
    entry = await alice.put("components", "llama", COMPONENT)
    seen.append(alice.changes)
    await alice.put("components", "llama", None)
    seen.append(alice.changes)
    assert seen[0] < seen[1] < seen[2]
    before = bob.changes
    await bob.apply([entry])
    assert bob.changes > before
