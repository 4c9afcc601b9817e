"""Checks of speculating generations gather (`daemon.verify.gather`): several go to one
replica at once and share its pass; a generation that must have its verdicts hurries them;
a step that waits for its checks never gathers."""

from __future__ import annotations

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.shards.client import generate  # noqa: E402
from daemon.verify.gather import Gather  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import HONEST_A, build, close, model, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)


async def test_concurrent_generations_checks_share_replica_passes(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=0.25, probation_rate=0.25, gather_s=5.0, speculate=True)
    got: list[list[int]] = []

    async def one() -> None:
        remote = model(cluster, v.generation(), fast="a1")
        await remote.open()
        got.append([t async for t in generate(remote, prompt, 12)])
        await close(remote)

    with trio.fail_after(60):  # (a round of 5 s goes when the generations end: hurried)
        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
    assert got == [expected[:12]] * 6
    checks = v.counters["checks_pass"]
    assert checks >= 10 and not v.counters["checks_fail"]
    # each round's checks of a range go to one replica, which runs them in one pass or few
    assert v.gather.checks >= 10 and v.gather.rounds < v.gather.checks / 2
    passes = sum(  # range A's replicas (a1 is on every route)
        sum(cluster.servers[p].batching.batch_sizes.values()) for p in HONEST_A if p != "a1"
    )
    a_checks = sum(1 for d in v.verdicts if d.hop == 0)
    assert 0 < passes < a_checks / 2, (passes, a_checks)


async def test_a_waiting_step_does_not_gather(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0, gather_s=10.0, speculate=False)
    remote = model(cluster, v.generation(), fast="a1")
    await remote.open()
    with trio.fail_after(8):  # a check that gathered would wait 10 s at every step
        assert [t async for t in generate(remote, prompt, 4)] == expected[:4]
    await close(remote)
    assert v.gather.checks == 0 and v.counters["checks_pass"] == 2 * 5


async def test_a_round_goes_when_hurried_or_after_its_time(autojump_clock):
    gather = Gather(1.0)
    went: list[float] = []

    async def check() -> None:
        await gather.wait()
        went.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        nursery.start_soon(check)
    assert went == [1.0, 1.0] and (gather.rounds, gather.checks) == (1, 2)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(check)
        await trio.sleep(0.25)
        gather.hurry()
    assert went[2] == 1.25 and gather.rounds == 2
    with pytest.raises(ValueError):
        Gather(-1.0)


async def test_a_rounds_checks_of_a_range_run_as_one_replica_pass(cluster, model_dir, reference):
    """Four generations' first steps gather in one round; each range's four checks go to the
    round's replica together and run there as one pass (not the first alone, then the rest:
    a replica has no traffic of its own to wait for)."""
    prompt, _ = reference
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0, gather_s=10.0, speculate=True)
    remotes = [model(cluster, v.generation(), fast="a1") for _ in range(4)]
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            for remote in remotes:
                await remote.open()
                nursery.start_soon(lambda r=remote: r.step(prompt, speculative=True))
        for remote in remotes:  # the first hurries the round: all eight checks go
            assert await remote.settle(wait=True) is None
    assert (v.gather.rounds, v.gather.checks) == (1, 8)
    assert v.counters["checks_pass"] == 8
    route_b = remotes[0].hops[1].peer_id
    used = {
        p: dict(cluster.servers[p].batching.batch_sizes)
        for p in ("a2", "a3", "b1", "b2", "b3")
        if p != route_b and cluster.servers[p].batching.batch_sizes
    }
    # one replica a range (the round's), one pass of the four checks each
    assert sorted(p[0] for p in used) == ["a", "b"], used
    assert all(sizes == {4: 1} for sizes in used.values()), used
    for remote in remotes:
        await close(remote)
