"""A check runs beside its step: the hops drawn when the step starts get their replica ready
at once and send it the hop's input as soon as it is known, while the provider computes; the
step's end only compares. Each hop's step is drawn once, also when the step runs again after
a failover further on, and a check whose step never comes ends by itself."""

from __future__ import annotations

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.verify.cheat import Cheat  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import (  # noqa: E402
    HONEST_A,
    HONEST_B,
    A,
    B,
    build,
    close,
    model,
    tokens,
    verifier,
)

cluster, model_dir, reference, virtual_time = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
    memory_cluster.virtual_time,
)


async def test_the_replica_computes_while_the_provider_does(cluster, model_dir, reference):
    """The route's servers compute a step only once the step's replica has its input: had
    the check waited for the step's end, the step would never end."""
    prompt, expected = reference
    await build(cluster, model_dir, None)
    route = {"a1", "b1"}  # (fast="a1": a1, then the first of range B)
    fed: dict[tuple[int, int], int] = {A: 0, B: 0}  # per range, positions its replicas got
    changed = trio.Event()

    for peer, server in cluster.servers.items():
        honest = server.forward
        span = cluster.ranges[peer]

        async def forward(session, position, x, last_only, peer=peer, honest=honest, span=span):
            nonlocal changed
            if peer in route:  # wait for the replica of this range to get this position
                with trio.fail_after(10):
                    while fed[span] < position + int(x.shape[1]):
                        await changed.wait()
            else:
                fed[span] = max(fed[span], position + int(x.shape[1]))
                changed.set()
                changed = trio.Event()
            return await honest(session, position, x, last_only)

        server.forward = forward
    v = verifier(rate=1.0, probation_rate=1.0)
    remote = model(cluster, v.generation(), fast="a1")
    assert await tokens(remote, prompt, 8) == expected[:8]
    assert {hop["peer_id"] for hop in remote.last_route} == route and not remote.recoveries
    assert v.counters["checks_pass"] == 2 * 9 and not v.counters["checks_fail"]


async def test_a_hop_kept_by_a_failover_is_not_checked_again(cluster, model_dir, reference):
    prompt, expected = reference
    for peer in HONEST_A:
        await cluster.add(peer, model_dir, *A)
    for peer in HONEST_B:
        await cluster.add(peer, model_dir, *B)
    server = await cluster.add("cheat", model_dir, *B)  # the second hop cheats
    Cheat(server, "corrupt").install()
    # (a generation that waits for its checks: one that speculates rolls the whole route
    # back to the step, and every hop's part runs again)
    v = verifier(rate=1.0, probation_rate=1.0, speculate=False)
    remote = model(cluster, v.generation())  # routes go through the cheater
    assert await tokens(remote, prompt, 6) == expected[:6]
    assert [r["peer_id"] for r in remote.recoveries] == ["cheat"]
    # 7 steps x 2 hops passed, and the first step's second hop failed; the first hop's
    # part of that step, kept by the failover, was not checked again
    assert v.counters["checks_fail"] == 1
    assert v.counters["checks_pass"] == 2 * 7


async def test_a_check_whose_step_never_comes_ends_by_itself(cluster, model_dir, virtual_time):
    await build(cluster, model_dir, None)
    v = verifier(rate=1.0, probation_rate=1.0)
    checks = v.generation()
    remote = model(cluster, checks, fast="a1", step_timeout_s=1.0)
    await remote.open()
    checks.before_step(remote, 0)  # drawn (rate 1), but the step is never sent
    plans = [plan for _, _, plan in checks._drawn.values()]
    assert len(plans) == 2 and all(plan is not None for plan in plans)
    with trio.fail_after(60):
        for plan in plans:
            await plan.done.wait()
    assert all(plan.result is None and plan.error is None for plan in plans)
    assert v.counters["checks_abandoned"] == 2
    await close(remote)
    assert not checks._followers


async def test_a_hop_replaced_before_its_step_loses_its_draw():
    """A drawn hop that a failover replaced before its step ran: its check is called off and
    its draw forgotten when the step starts again on the new route (a check left waiting
    would hold a replica session for READY_TIMEOUT_STEPS step timeouts)."""
    from daemon.shards.hops import Hop
    from daemon.verify.policy import VerifyConfig
    from daemon.verify.verifier import Verifier

    class Model:  # what before_step reads of a RemoteModel; servers never answer here
        def __init__(self, hops: list[Hop]) -> None:
            self.hops = hops

        async def _servers(self) -> list[object]:
            await trio.sleep_forever()
            return []

    def hop(peer: str, start: int, end: int) -> Hop:
        return Hop(peer, start, end, None, session="s")  # type: ignore[arg-type]

    v = Verifier(VerifyConfig(rate=1.0, probation_rate=1.0))
    checks = v.generation()
    first, second, third = hop("a1", 0, 3), hop("b1", 3, 6), hop("b2", 3, 6)
    remote = Model([first, second])
    checks.before_step(remote, 4)
    plans = {id(h): entry[2] for h in (first, second) for entry in [checks._drawn[id(h)]]}
    remote.hops = [first, third]  # b1 failed: the step runs again from layer 3 on b2
    checks.before_step(remote, 4)
    assert plans[id(second)].scope.cancel_called
    assert not plans[id(first)].scope.cancel_called  # kept hop: kept draw, kept check
    assert checks._drawn[id(first)][2] is plans[id(first)]
    assert set(checks._drawn) == {id(first), id(third)}
    await checks.aclose()
