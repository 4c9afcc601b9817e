"""A checker's replica session per provider hop: a check sends the replica only the hop's
inputs it has not seen yet (about one step's work, not a replay of the prefix), the session
is replaced when its replica goes away, and it ends with the generation."""

from __future__ import annotations

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.shards.client import generate  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import build, close, model, tokens, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)


def count_rows(cluster) -> dict[str, int]:
    """Per server, the input positions its compute gets from now on."""
    rows = dict.fromkeys(cluster.servers, 0)
    for peer, server in cluster.servers.items():
        honest = server.forward

        async def forward(session, position, x, last_only, peer=peer, honest=honest):
            rows[peer] += int(x.shape[1])
            return await honest(session, position, x, last_only)

        server.forward = forward
    return rows


async def no_sessions_left(cluster, peers: set[str]) -> None:
    with trio.fail_after(10):
        while any(cluster.servers[p].sessions for p in peers):  # noqa: ASYNC110 (a condition)
            await trio.sleep(0.01)


async def test_a_check_costs_the_replica_only_the_positions_it_has_not_seen(
    cluster, model_dir, reference
):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    rows = count_rows(cluster)
    v = verifier(rate=1.0, probation_rate=1.0)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 24) == expected
    route = {hop["peer_id"] for hop in remote.last_route}
    positions = len(prompt) + 24  # the prompt's pass, then 24 one-token steps
    assert v.counters["checks_pass"] == 2 * 25 and not v.counters["checks_fail"]
    # one replica session per hop, fed every position once: what the route computed
    assert v.counters["replica_sessions"] == 2
    assert v.counters["replica_positions"] == 2 * positions
    assert sum(n for p, n in rows.items() if p not in route) == 2 * positions
    assert sum(n for p, n in rows.items() if p in route) == 2 * positions
    # (a fresh session per check would have replayed every prefix: about 18x as many here)
    await no_sessions_left(cluster, set(cluster.servers))


async def test_at_a_low_rate_a_check_sends_the_steps_since_the_last_one(
    cluster, model_dir, reference
):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    rows = count_rows(cluster)
    v = verifier(seed=4, rate=0.25, probation_rate=0.25)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 24) == expected
    route = {hop["peer_id"] for hop in remote.last_route}
    checks = v.counters["checks_pass"]
    assert checks >= 3 and not v.counters["checks_fail"]
    assert v.counters["replica_steps"] == checks
    # each hop's replica got each position at most once (up to its last check)
    replicas = sum(n for p, n in rows.items() if p not in route)
    assert replicas == v.counters["replica_positions"] <= 2 * (len(prompt) + 24)


async def test_a_replica_that_goes_away_is_replaced(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    checks = v.generation()
    remote = model(cluster, checks, fast="a1")
    await remote.open()
    got: list[int] = []
    try:
        async for token in generate(remote, prompt, 24):
            got.append(token)
            if len(got) == 8:  # the first range's checker goes away
                (follower,) = [s for hop, s in checks._followers.values() if hop.start == 0]
                cluster.kill(follower.peer)
                gone = follower.peer
    finally:
        await close(remote)
    assert got == expected and not remote.recoveries
    assert v.counters["checks_pass"] == 2 * 25 and not v.counters["checks_fail"]
    # a new session on another replica caught up on the whole prefix, in one pass
    assert v.counters["replica_sessions"] == 3
    assert v.counters["replica_positions"] > 2 * (len(prompt) + 24)
    assert gone not in v.reputation.records or not v.reputation.records[gone].total_failures


async def test_replica_sessions_end_when_the_checks_are_flushed(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    checks = v.generation()
    remote = model(cluster, checks, fast="a1")
    await remote.open()
    assert [t async for t in generate(remote, prompt, 6)] == expected[:6]
    route = {hop.peer_id for hop in remote.hops}
    replicas = {s.peer for _, s in checks._followers.values()}
    assert len(replicas) == 2 and not replicas & route
    assert all(cluster.servers[p].sessions for p in replicas)
    checks.flush()  # (what a daemon's generation calls at its end: closes in the background)
    await no_sessions_left(cluster, replicas)
    assert not checks._followers
    await remote.close()


async def test_the_requester_holds_at_most_its_cap_of_replica_sessions(
    cluster, model_dir, reference
):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    v.max_replica_sessions = 2
    generations = [v.generation() for _ in range(2)]
    for checks in generations:  # neither is flushed nor closed: the cap ends the first's
        remote = model(cluster, checks, fast="a1")
        await remote.open()
        assert [t async for t in generate(remote, prompt, 4)] == expected[:4]
        await remote.close()
    assert v.counters["replica_sessions"] == 4 and v.counters["replica_sessions_evicted"] == 2
    assert not generations[0]._followers and len(generations[1]._followers) == 2
    assert v.to_json()["replica_sessions_open"] == 2
    with trio.fail_after(10):  # the servers see the evicted sessions' streams end
        while sum(len(s.sessions) for s in cluster.servers.values()) > 2:  # noqa: ASYNC110
            await trio.sleep(0.01)
    await generations[1].aclose()
    await no_sessions_left(cluster, set(cluster.servers))


async def test_replica_sessions_reuse_the_streams_kept_to_the_replicas(
    cluster, model_dir, reference
):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    for _ in range(3):  # one generation after the other: each opens 2 replica sessions
        remote = model(cluster, v.generation(), fast="a1")
        assert await tokens(remote, prompt, 4) == expected[:4]
    assert v.counters["replica_sessions"] == 6 and not v.counters["replica_unavailable"]
    # on at most two streams (one per replica drawn, and each session ended with a frame,
    # not its stream): the servers hold no session, the streams stay for the next checks
    assert v.links.opened <= 4 and len(v.links) == v.links.opened
    await no_sessions_left(cluster, set(cluster.servers))


async def test_a_kept_stream_that_broke_is_replaced_at_once(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 4) == expected[:4]
    kept = [link for links in v.links._links.values() for link in links]
    assert kept and v.links.opened == len(kept)
    for link in kept:  # (as a server that closed them, idle, or a connection that dropped)
        link.stream.abort()
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 4) == expected[:4]
    # the next sessions opened on new streams to the same replicas, with no check lost
    assert v.counters["checks_pass"] == 2 * 2 * 5 and not v.counters["checks_skipped"]
    assert not v.counters["replica_unavailable"] and v.links.opened == 2 * len(kept)
    await no_sessions_left(cluster, set(cluster.servers))


async def test_a_replica_sends_back_only_the_rows_a_check_compares(cluster, model_dir, reference):
    """A check compares one step's rows: a one-position step's replica is asked for its last
    row alone (`last_only`), on the middle hop too, and sends back no rows of the positions
    it caught up on; the prompt's step (several positions) gets its rows."""
    prompt, expected = reference
    await build(cluster, model_dir, None)
    sent: dict[str, list[int]] = {p: [] for p in cluster.servers}
    for peer, server in cluster.servers.items():
        honest = server.forward

        async def forward(session, position, x, last_only, peer=peer, honest=honest):
            out = await honest(session, position, x, last_only)
            sent[peer].append(int(out.shape[1]))
            return out

        server.forward = forward
    v = verifier(seed=3, rate=0.3, probation_rate=0.3)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 24) == expected
    assert v.counters["checks_pass"] >= 4 and not v.counters["checks_fail"]
    route = {hop["peer_id"] for hop in remote.last_route}
    caught_up = v.counters["replica_positions"] - v.counters["replica_steps"]
    assert caught_up > 0  # (the checks did catch up on positions they had not seen)
    replies = [rows for p, each in sent.items() if p not in route for rows in each]
    assert len(replies) == v.counters["replica_steps"]
    first_steps = sum(1 for rows in replies if rows == len(prompt))  # a check of step 0
    assert all(rows == 1 for rows in replies if rows != len(prompt))
    assert sum(replies) <= v.counters["replica_steps"] + first_steps * len(prompt)


async def test_an_agreeing_check_asks_for_the_servers_only_to_choose_its_replica(
    cluster, model_dir, reference
):
    """The servers announced (a lookup in a real network) are asked for once per checked hop,
    to choose or confirm its replica, and again only where a third replica must decide."""
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    remote = model(cluster, v.generation(), fast="a1")
    announced, asked = remote._servers, [0]

    async def servers():
        asked[0] += 1
        return await announced()

    remote._servers = servers
    assert await tokens(remote, prompt, 8) == expected[:8]
    assert v.counters["checks_pass"] == 2 * 9 and not v.counters["checks_fail"]
    assert asked[0] == 1 + v.counters["checks_pass"]  # the route's opening, then each check
