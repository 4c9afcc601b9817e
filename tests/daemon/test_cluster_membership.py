"""Cluster membership through whole daemons on the in-memory network (virtual time): created
on one daemon, joined from others, approved, removed, left, seen the same everywhere; and
refused joins, from the RPC and from a hostile peer's gossip, with the reason."""

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from daemon.api.client import RPCCallError
from daemon.cluster.membership import register_cluster_methods
from registry.clusters import record_chunks
from registry.entry import sign_entry
from tests.daemon.harness import RESOURCES, MemoryCluster, RunningDaemon

GIB = 1024**3
BIG = {
    **RESOURCES,
    "gpus": [{"index": 0, "name": "H100", "memory_total_bytes": 80 * GIB}],
}
INVALID_PARAMS = -32602


def resources_for(home: Path) -> dict[str, Any]:
    """node2 has a big GPU; the others none."""
    return BIG if home.name == "node2" else RESOURCES


@asynccontextmanager
async def daemons(root: Path, count: int) -> AsyncIterator[MemoryCluster]:
    async with trio.open_nursery() as nursery:
        cluster = MemoryCluster(root, nursery, detect_resources=resources_for)
        # resource records are stamped by the network's clock, registry entries by the wall
        # clock: let the two agree, as on a real network
        cluster.hub.epoch = time.time() - trio.current_time()
        await cluster.start(count)
        await cluster.wait_for(cluster.all_found, 60, f"all {count} daemons to find each other")
        try:
            yield cluster
        finally:
            nursery.cancel_scope.cancel()


async def members_everywhere(cluster: MemoryCluster, name: str) -> set[tuple[str, str]] | None:
    """The (peer, status) pairs every daemon lists, if they all agree."""
    seen = []
    for running in cluster.daemons:
        try:
            rows = await running.call("cluster_members", {"name": name})
        except RPCCallError:
            return None
        seen.append({(r["peer_id"], r["status"]) for r in rows})
    return seen[0] if all(s == seen[0] for s in seen) else None


async def converge(cluster: MemoryCluster, name: str, expected: set[tuple[str, str]]) -> None:
    async def agreed() -> bool:
        return await members_everywhere(cluster, name) == expected

    await cluster.wait_for(agreed, 30, f"every daemon to list {expected}")


async def error_of(running: RunningDaemon, method: str, params: dict[str, Any]) -> RPCCallError:
    with pytest.raises(RPCCallError) as err:
        await running.call(method, params)
    return err.value


async def test_create_join_approve_remove_leave_seen_everywhere(tmp_path, autojump_clock):
    async with daemons(tmp_path, 4) as cluster:
        a, b, c, d = cluster.daemons
        info = await a.call("cluster_create", {"name": "lab", "description": "the lab"})
        assert info["admission"] == "approval" and info["admins"] == [a.peer_id]
        assert info["this_node"] == {"peer_id": a.peer_id, "status": "active", "admin": True}
        await converge(cluster, "lab", {(a.peer_id, "active")})
        # an approval cluster: joining is a request, not membership, until approved
        joined = await b.call("cluster_join", {"name": "lab", "role": "voter"})
        assert joined["status"] == "requested"
        await c.call("cluster_join", {"name": "lab"})
        await converge(
            cluster,
            "lab",
            {(a.peer_id, "active"), (b.peer_id, "requested"), (c.peer_id, "requested")},
        )
        # only an admin approves or removes
        err = await error_of(d, "cluster_approve", {"name": "lab", "peer": b.peer_id})
        assert "only an admin" in err.message
        err = await error_of(b, "cluster_remove", {"name": "lab", "peer": c.peer_id})
        assert "only an admin" in err.message
        await a.call("cluster_approve", {"name": "lab", "peer": b.peer_id})
        await a.call("cluster_remove", {"name": "lab", "peer": c.peer_id})
        await converge(cluster, "lab", {(a.peer_id, "active"), (b.peer_id, "active")})
        for running in cluster.daemons:
            info = await running.call("cluster_info", {"name": "lab"})
            assert info["voters"] == sorted([a.peer_id, b.peer_id])
            assert info["description"] == "the lab"
        # joining again as a member changes nothing
        again = await b.call("cluster_join", {"name": "lab"})
        assert again["note"] == "already a member"
        await b.call("cluster_leave", {"name": "lab"})
        await converge(cluster, "lab", {(a.peer_id, "active")})
        err = await error_of(b, "cluster_leave", {"name": "lab"})
        assert "not a member" in err.message
        # an admin may add a peer directly, even one that left
        await a.call("cluster_approve", {"name": "lab", "peer": b.peer_id, "role": "worker"})
        await converge(cluster, "lab", {(a.peer_id, "active"), (b.peer_id, "active")})
        # creating it twice is refused
        err = await error_of(a, "cluster_create", {"name": "lab"})
        assert "already exists" in err.message


async def test_open_and_allowlist_clusters_and_require(tmp_path, autojump_clock):
    async with daemons(tmp_path, 4) as cluster:
        a, b, c, d = cluster.daemons
        await a.call(
            "cluster_create",
            {"name": "gpu", "admission": "open", "require": "gpus >= 1 AND vram_gb >= 24"},
        )
        await a.call(
            "cluster_create",
            {"name": "club", "admission": "allowlist", "allowlist": [d.peer_id]},
        )
        await converge(cluster, "club", {(a.peer_id, "active")})
        # b has no GPU: refused, and told which conditions failed
        err = await error_of(b, "cluster_join", {"name": "gpu"})
        assert err.data["reason"] == "requirement"
        assert "gpus >= 1 (this node: 0)" in err.message
        assert "vram_gb >= 24 (this node: 0.0)" in err.message
        # c (node2) has an 80 GiB GPU: in at once, as a voter, everywhere
        joined = await c.call("cluster_join", {"name": "gpu", "role": "voter"})
        assert joined["status"] == "active"
        await converge(cluster, "gpu", {(a.peer_id, "active"), (c.peer_id, "active")})
        # the allowlist admits d only
        err = await error_of(b, "cluster_join", {"name": "club"})
        assert err.data["reason"] == "not_allowlisted"
        await d.call("cluster_join", {"name": "club"})
        await converge(cluster, "club", {(a.peer_id, "active"), (d.peer_id, "active")})
        assert b.daemon.replica.rejected["requirement"] == 0  # local refusals: not attacks


async def test_hostile_peer_gossips_forged_and_unauthorised_member_entries(
    tmp_path, autojump_clock
):
    """d signs entries no replica may accept and gossips them past its own checks: every
    other daemon refuses them, counts them in /metrics, and keeps running."""
    async with daemons(tmp_path, 4) as cluster:
        a, b, c, d = cluster.daemons
        await a.call("cluster_create", {"name": "lab"})
        await a.call("cluster_create", {"name": "gpu", "admission": "open", "require": "gpus >= 1"})
        await converge(cluster, "gpu", {(a.peer_id, "active")})
        ts = d.daemon.replica.clock.now()

        def forged(key: str, roles: list[str], **extra: Any):
            cluster_id, _, peer = key.partition("/")
            value = {"cluster_id": cluster_id, "peer_id": peer, "roles": roles, **extra}
            return sign_entry(
                d.daemon.ident,
                kind="members",
                key=key,
                value=value,
                ts=ts,
                created=ts,
                owner=d.peer_id,
            )

        attacks = [
            forged(f"lab/{b.peer_id}", ["voter"]),  # someone else's membership
            forged(f"lab/{d.peer_id}", ["worker"]),  # approval cluster: no request
            forged(f"gpu/{d.peer_id}", ["admin"]),  # itself as admin
            forged(f"gpu/{d.peer_id}", ["worker"]),  # no record for the requirement
        ]
        # its own record, signed, but it has no GPU
        small = forged(
            f"gpu/{d.peer_id}",
            ["voter"],
            resource_record=record_chunks(d.daemon.directory.make_own_record()),
        )
        before = [r.metric("gridmesh_rejected_messages_total") for r in (a, b, c)]
        for entry in [*attacks, small]:
            await d.daemon.replicator.announce([entry])
        await trio.sleep(2)  # virtual: gossip and a few anti-entropy rounds
        for running, was in zip((a, b, c), before, strict=True):
            assert running.metric("gridmesh_rejected_messages_total") > was
            for reason in ("unauthorized", "needs_approval", "requirement"):
                assert running.metric("gridmesh_rejected_messages_total", reason=reason) >= 1
            for name in ("lab", "gpu"):
                rows = await running.call("cluster_members", {"name": name})
                assert [r["peer_id"] for r in rows] == [a.peer_id], (name, rows)
        assert all(not r.stopped.is_set() for r in cluster.daemons)


async def test_params_are_validated(tmp_path, autojump_clock):
    async with daemons(tmp_path, 1) as cluster:
        (a,) = cluster.daemons
        bad = [
            ("cluster_create", {"name": "a/b"}),
            ("cluster_create", {"name": ""}),
            ("cluster_create", {"name": "x" * 65}),
            ("cluster_create", {"name": "lab", "admission": "anyone"}),
            ("cluster_create", {"name": "lab", "require": "gpus >="}),
            ("cluster_create", {"name": "lab", "allowlist": ["not a peer"]}),
            ("cluster_create", {"name": "lab", "allowlist": ["p1", "p1"]}),
            ("cluster_join", {"name": "lab", "role": "admin"}),
            ("cluster_approve", {"name": "lab"}),
            ("cluster_members", {"name": "lab", "extra": 1}),
        ]
        for method, params in bad:
            err = await error_of(a, method, params)
            assert err.code == INVALID_PARAMS, (method, params, err.message)
        err = await error_of(a, "cluster_join", {"name": "nowhere"})
        assert "not known to this node" in err.message
        err = await error_of(a, "cluster_create", {"name": "lab", "require": "gpus >="})
        assert "require is not a valid filter" in err.message


async def test_info_renders_the_runtime_and_placements_when_given(tmp_path, autojump_clock):
    async with daemons(tmp_path, 1) as cluster:
        (a,) = cluster.daemons
        from daemon.api.jsonrpc import Dispatcher

        dispatcher = Dispatcher()
        calls: list[str] = []

        async def placements(name: str) -> list[dict[str, Any]]:
            calls.append(name)
            return [{"block": "llama.0-4", "peer_id": a.peer_id}]

        def broken(name: str) -> dict[str, Any]:
            raise RuntimeError("not running")

        register_cluster_methods(
            dispatcher,
            a.daemon.replicator,
            a.daemon.directory,
            describe=lambda name: {"coordinator": a.peer_id, "term": 3},
            placements=placements,
        )
        a.daemon.dispatcher = dispatcher
        await a.call("cluster_create", {"name": "lab"})
        info = await a.call("cluster_info", {"name": "lab"})
        assert info["runtime"] == {"coordinator": a.peer_id, "term": 3}
        assert info["placements"] == [{"block": "llama.0-4", "peer_id": a.peer_id}]
        assert calls == ["lab", "lab"]  # create answers with the info too
        other = Dispatcher()
        register_cluster_methods(other, a.daemon.replicator, a.daemon.directory, describe=broken)
        a.daemon.dispatcher = other
        info = await a.call("cluster_info", {"name": "lab"})
        assert info["runtime"] == {"error": "RuntimeError: not running"}
        assert "placements" not in info


async def test_members_run_an_election_and_info_shows_the_coordinator(tmp_path, autojump_clock):
    """The registry's members are what the cluster runtime runs: three voters (an open
    cluster) elect one coordinator, and cluster_info on every daemon shows it and its term."""
    async with daemons(tmp_path, 4) as cluster:
        a, b, c, d = cluster.daemons
        await a.call("cluster_create", {"name": "lab", "admission": "open"})
        await converge(cluster, "lab", {(a.peer_id, "active")})
        for running in (b, c):
            await running.call("cluster_join", {"name": "lab", "role": "voter"})
        await converge(
            cluster, "lab", {(a.peer_id, "active"), (b.peer_id, "active"), (c.peer_id, "active")}
        )

        async def one_coordinator() -> str | None:
            seen = set()
            for running in (a, b, c):
                runtime = (await running.call("cluster_info", {"name": "lab"}))["runtime"]
                seen.add((runtime["coordinator"], runtime["term"]))
            (leader, term), *others = seen
            return leader if not others and leader is not None and term > 0 else None

        leader = await cluster.wait_for(one_coordinator, 30, "one coordinator known to all")
        assert leader in {a.peer_id, b.peer_id, c.peer_id}
        # d is not a member: it knows of the cluster but runs nothing for it
        info = await d.call("cluster_info", {"name": "lab"})
        assert info["this_node"]["status"] == "none" and info["runtime"]["member"] is False
        assert info["voters"] == sorted([a.peer_id, b.peer_id, c.peer_id])
        # the coordinator's placements: none deployed yet
        assert (await a.call("cluster_info", {"name": "lab"}))["placements"] == []
