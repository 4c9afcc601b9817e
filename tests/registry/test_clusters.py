"""Clusters and membership in the registry: the view, the roles, and admission as every
replica enforces it, attacked the way a real peer would (its own signed entries, gossiped)."""

import random

import pytest

from p2p import identity, records
from registry import clusters
from registry.clusters import Member, cluster_view, clusters_of, record_chunks
from registry.entry import sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import Rejected, Replica

ADMIN, BOB, CAROL, EVE = (identity.NodeIdentity.generate() for _ in range(4))
NOW_MS = 1_700_000_000_000
GIB = 1024**3
BIG = {
    "cpu": {"cores": 16},
    "memory": {"total_bytes": 64 * GIB},
    "gpus": [
        {"name": "RTX 4090", "memory_total_bytes": 25757220864},
        {"name": "T4", "memory_total_bytes": 16 * GIB},
    ],
}
SMALL = {"cpu": {"cores": 4}, "memory": {"total_bytes": 8 * GIB}, "gpus": []}


class FakeTime:
    def __init__(self) -> None:
        self.ms = NOW_MS

    def __call__(self) -> int:
        return self.ms


def replica_for(ident, time=None):
    return Replica(ident, clock=HybridClock(time or FakeTime()))


def record(ident, resources, *, issued_s=NOW_MS / 1000, valid_for=90.0, network="net"):
    return records.make_record(
        ident,
        network_id=network,
        now=issued_s,
        valid_for=valid_for,
        addrs=[],
        resources=resources,
    )


def member(ident, cluster="c", roles=("worker",), **extra):
    return {"cluster_id": cluster, "peer_id": ident.peer_id, "roles": list(roles), **extra}


def signed(ident, key, value, ms=NOW_MS, owner=None, kind="members"):
    ts = Timestamp(ms, 1)
    return sign_entry(
        ident, kind=kind, key=key, value=value, ts=ts, created=ts, owner=owner or ident.peer_id
    )


async def make_cluster(settings=None, admins=(ADMIN,)):
    """An admin's replica holding cluster `c`, and a second replica (a bystander) with it."""
    admin = replica_for(ADMIN)
    value = {"name": "c", "admins": [a.peer_id for a in admins]}
    if settings is not None:
        value["settings"] = settings
    entry = await admin.put("clusters", "c", value)
    bystander = replica_for(CAROL)
    assert await bystander.apply([entry]) == [entry]
    return admin, bystander


async def refused(replica, entry, reason):
    """`entry` arrives by gossip: refused with `reason`, counted, nothing changes."""
    before = dict(replica.entries)
    count = replica.rejected[reason]
    assert await replica.apply([entry], source="gossip") == []
    assert replica.rejected[reason] == count + 1, dict(replica.rejected)
    assert replica.entries == before


# --------------------------------------------------------------------------- the view


async def test_view_roles_voters_and_clusters_of():
    admin, _ = await make_cluster({"admission": "open"})
    await admin.put("members", f"c/{ADMIN.peer_id}", member(ADMIN, roles=["admin"]))
    await admin.put("members", f"c/{BOB.peer_id}", member(BOB, roles=["voter"]))
    await admin.put("members", f"c/{CAROL.peer_id}", member(CAROL))
    await admin.put("members", f"c/{EVE.peer_id}", member(EVE, status="requested"))
    view = cluster_view(admin, "c")
    assert view is not None
    assert view.admission == "open" and view.require is None and view.allowlist == frozenset()
    assert view.admins == {ADMIN.peer_id}
    assert set(view.members) == {ADMIN.peer_id, BOB.peer_id, CAROL.peer_id}
    assert set(view.requests) == {EVE.peer_id}  # a request is not a member
    assert view.voters == {ADMIN.peer_id, BOB.peer_id}
    assert view.members[CAROL.peer_id] == Member(CAROL.peer_id, frozenset({"worker"}))
    assert not view.members[CAROL.peer_id].voter
    assert clusters_of(admin, BOB.peer_id) == ["c"]
    assert clusters_of(admin, EVE.peer_id) == []
    assert cluster_view(admin, "nope") is None
    # leaving removes the member
    await admin.put("members", f"c/{BOB.peer_id}", None)
    assert BOB.peer_id not in cluster_view(admin, "c").members
    assert clusters_of(admin, BOB.peer_id) == []


async def test_defaults_and_several_clusters():
    admin = replica_for(ADMIN)
    for name in ("b", "a"):
        await admin.put("clusters", name, {"name": name, "admins": [ADMIN.peer_id]})
        await admin.put("members", f"{name}/{BOB.peer_id}", member(BOB, cluster=name))
    view = cluster_view(admin, "a")
    assert view.admission == "approval"  # the default
    assert clusters_of(admin, BOB.peer_id) == ["a", "b"]


async def test_older_role_names_read_as_voter_and_worker():
    admin, _ = await make_cluster()
    await admin.put("members", f"c/{BOB.peer_id}", member(BOB, roles=["coordinator"]))
    await admin.put("members", f"c/{CAROL.peer_id}", member(CAROL, roles=["observer"]))
    view = cluster_view(admin, "c")
    assert view.members[BOB.peer_id].roles == {"voter"}
    assert view.members[CAROL.peer_id].roles == {"worker"}


async def test_cluster_settings_are_checked():
    admin = replica_for(ADMIN)
    base = {"name": "c", "admins": [ADMIN.peer_id]}
    with pytest.raises(Rejected, match="settings.admission must be one of"):
        await admin.put("clusters", "c", {**base, "settings": {"admission": "anyone"}})
    with pytest.raises(Rejected, match="settings.require is not a valid filter"):
        await admin.put("clusters", "c", {**base, "settings": {"require": "gpus >="}})
    with pytest.raises(Rejected, match=r"settings.allowlist\[0\] must be a peer id"):
        await admin.put("clusters", "c", {**base, "settings": {"allowlist": ["a b"]}})
    # settings written before the fields were declared stay readable
    await admin.put("clusters", "c", {**base, "settings": {"region": "eu"}})
    assert cluster_view(admin, "c").admission == "approval"


# --------------------------------------------------------------------------- admission


async def test_open_cluster_self_join_and_leave_everywhere():
    admin, bystander = await make_cluster({"admission": "open"})
    bob = replica_for(BOB)
    await bob.apply(admin.entries.values())
    joined = await bob.put("members", f"c/{BOB.peer_id}", member(BOB, roles=["voter"]))
    for replica in (admin, bystander):
        assert await replica.apply([joined], source="gossip") == [joined]
        assert cluster_view(replica, "c").voters == {BOB.peer_id}
    left = await bob.put("members", f"c/{BOB.peer_id}", None)
    for replica in (admin, bystander):
        assert await replica.apply([left], source="gossip") == [left]
        assert cluster_view(replica, "c").members == {}


async def test_forged_member_entry_for_someone_else_is_refused():
    admin, bystander = await make_cluster({"admission": "open"})
    # Eve signs an entry making Bob a member (or removing Bob, once he joined)
    forged = signed(EVE, f"c/{BOB.peer_id}", member(BOB))
    await refused(bystander, forged, "unauthorized")
    joined = signed(BOB, f"c/{BOB.peer_id}", member(BOB))
    assert await bystander.apply([joined]) == [joined]
    removal = sign_entry(
        EVE,
        kind="members",
        key=f"c/{BOB.peer_id}",
        value=None,
        ts=Timestamp(NOW_MS + 5, 0),
        created=joined.created,
        owner=BOB.peer_id,
    )
    await refused(bystander, removal, "unauthorized")
    # and a local user of Eve's node gets the reason
    eve = replica_for(EVE)
    await eve.apply(admin.entries.values())
    with pytest.raises(Rejected, match="only an admin of cluster 'c' may write or remove"):
        await eve.put("members", f"c/{BOB.peer_id}", member(BOB))


async def test_self_join_as_admin_is_refused_even_in_an_open_cluster():
    _, bystander = await make_cluster({"admission": "open"})
    await refused(
        bystander, signed(EVE, f"c/{EVE.peer_id}", member(EVE, roles=["admin"])), "unauthorized"
    )
    await refused(
        bystander, signed(EVE, f"c/{EVE.peer_id}", member(EVE, roles=["coordinator"])), "bad_role"
    )


async def test_approval_cluster_takes_requests_and_an_admin_approves():
    admin, bystander = await make_cluster({"admission": "approval"})
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", member(EVE)), "needs_approval")
    request = signed(BOB, f"c/{BOB.peer_id}", member(BOB, roles=["voter"], status="requested"))
    assert await bystander.apply([request]) == [request]
    assert await admin.apply([request]) == [request]
    view = cluster_view(bystander, "c")
    assert view.members == {} and set(view.requests) == {BOB.peer_id}
    # a requester cannot approve itself
    await refused(
        bystander,
        signed(BOB, f"c/{BOB.peer_id}", member(BOB, roles=["voter"]), ms=NOW_MS + 10),
        "needs_approval",
    )
    approved = await admin.put("members", f"c/{BOB.peer_id}", member(BOB, roles=["voter"]))
    assert approved.owner == BOB.peer_id and approved.author == ADMIN.peer_id
    assert await bystander.apply([approved]) == [approved]
    assert cluster_view(bystander, "c").voters == {BOB.peer_id}
    # an admin removes a member; an admin re-adds one who left
    removed = await admin.put("members", f"c/{BOB.peer_id}", None)
    assert await bystander.apply([removed]) == [removed]
    assert cluster_view(bystander, "c").members == {}
    again = await admin.put("members", f"c/{BOB.peer_id}", member(BOB))
    assert await bystander.apply([again]) == [again]
    assert set(cluster_view(bystander, "c").members) == {BOB.peer_id}


async def test_allowlist_cluster_admits_only_listed_peers():
    _, bystander = await make_cluster({"admission": "allowlist", "allowlist": [BOB.peer_id]})
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", member(EVE)), "not_allowlisted")
    ok = signed(BOB, f"c/{BOB.peer_id}", member(BOB))
    assert await bystander.apply([ok]) == [ok]


async def test_require_is_evaluated_on_the_joiners_signed_record():
    _, bystander = await make_cluster(
        {"admission": "open", "require": "gpus >= 1 AND vram_gb >= 24 AND cpu_cores >= 8"}
    )
    # no record
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", member(EVE)), "requirement")
    # a record that fails the requirement: the refusal names each failed condition
    small = member(EVE, resource_record=record_chunks(record(EVE, SMALL)))
    with pytest.raises(Rejected) as err:
        bystander.check(signed(EVE, f"c/{EVE.peer_id}", small))
    assert err.value.reason == "requirement"
    assert "gpus >= 1 (this node: 0)" in str(err.value)
    assert "vram_gb >= 24 (this node: 0.0)" in str(err.value)
    assert "cpu_cores >= 8 (this node: 4)" in str(err.value)
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", small), "requirement")
    # a big node's record copied by Eve: signed by someone else
    stolen = member(EVE, resource_record=record_chunks(record(BOB, BIG)))
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", stolen), "forged_record")
    # Eve's record with its resources edited after signing
    wire = records.make_record(
        EVE, network_id="net", now=NOW_MS / 1000, valid_for=90, addrs=[], resources=BIG
    )
    tampered = wire.replace(b"RTX 4090", b"RTX 4091")
    assert tampered != wire
    forged = member(EVE, resource_record=record_chunks(tampered))
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", forged), "forged_record")
    # a stale record: expired long before the join was written
    old = member(BOB, resource_record=record_chunks(record(BOB, BIG, issued_s=NOW_MS / 1000 - 600)))
    await refused(bystander, signed(BOB, f"c/{BOB.peer_id}", old), "stale_record")
    # garbage in the record field
    junk = member(EVE, resource_record=["not base64!"])
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", junk), "bad_record")
    junk = member(EVE, resource_record=["AAAA"])
    await refused(bystander, signed(EVE, f"c/{EVE.peer_id}", junk), "bad_record")
    # Bob's own fresh record meets it: a 4090 reports 23.99 GiB, which reads as 24.0
    good = member(BOB, resource_record=record_chunks(record(BOB, BIG)))
    ok = signed(BOB, f"c/{BOB.peer_id}", good)
    assert await bystander.apply([ok]) == [ok]
    assert set(cluster_view(bystander, "c").members) == {BOB.peer_id}


async def test_requirement_with_or_and_missing_fields():
    record_ = records.validate_record(
        records.record_key("net", BOB.peer_id),
        record(BOB, SMALL),
        now=NOW_MS / 1000,
        network_id="net",
    )
    assert clusters.requirement_problems("gpus >= 1 OR ram_gb >= 8", record_) == []
    problems = clusters.requirement_problems("gpu_name LIKE 'H%' OR ram_gb > 100", record_)
    assert problems == ['gpu_name LIKE "H%" OR ram_gb > 100']
    problems = clusters.requirement_problems("gpu_name LIKE 'H%'", record_)
    assert problems == ['gpu_name LIKE "H%" (this node: not declared)']
    fields = clusters.resource_fields(record_)
    assert fields["ram_gb"] == 8.0 and fields["gpus"] == 0 and "gpu_name" not in fields


async def test_admins_may_always_add_and_remove():
    admin, bystander = await make_cluster(
        {"admission": "allowlist", "allowlist": [], "require": "gpus >= 8"}
    )
    added = await admin.put("members", f"c/{EVE.peer_id}", member(EVE, roles=["admin"]))
    assert await bystander.apply([added]) == [added]
    assert cluster_view(bystander, "c").members[EVE.peer_id].voter
    # a member may leave even where it could not join by itself
    left = sign_entry(
        EVE,
        kind="members",
        key=f"c/{EVE.peer_id}",
        value=None,
        ts=Timestamp(NOW_MS + 1000, 0),
        created=added.created,
        owner=added.owner,
    )
    assert await bystander.apply([left]) == [left]
    assert cluster_view(bystander, "c").members == {}


async def test_hostile_record_bytes_never_crash_a_replica():
    _, bystander = await make_cluster({"admission": "open", "require": "gpus >= 1"})
    rng = random.Random(7)
    good = record(EVE, BIG)
    for i in range(200):
        data = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        chunks = record_chunks(bytes(data)) if i % 2 else [rng.randbytes(30).hex()]
        entry = signed(EVE, f"c/{EVE.peer_id}", member(EVE, resource_record=chunks), ms=NOW_MS + i)
        await bystander.apply([entry], source="gossip")
    assert EVE.peer_id not in cluster_view(bystander, "c").members
    assert sum(bystander.rejected.values()) == 200


async def test_a_request_for_the_admin_role_is_refused_by_the_schema_hook():
    admin, _ = await make_cluster()
    with pytest.raises(Rejected) as err:
        await admin.put(
            "members", f"c/{BOB.peer_id}", member(BOB, roles=["admin"], status="requested")
        )
    assert err.value.reason == "admission" and "cannot ask for the admin role" in str(err.value)
