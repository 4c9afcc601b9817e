"""Speculation: the token loop goes on while a step's checks run, lets a token out only once
every step it depends on passed its checks, and rolls back to a step found wrong after it
went on: the output is exactly the honest generation's (greedy and seeded sampling alike),
and no token drawn from the wrong step reaches the caller."""

from __future__ import annotations

import pytest
import trio

torch = pytest.importorskip("torch")

from daemon.serving.sampling import legacy_sampler  # noqa: E402
from daemon.shards.client import generate  # noqa: E402
from tests.daemon.shards import memory_cluster  # noqa: E402
from tests.daemon.verify.cluster import A, build, close, model, verifier  # noqa: E402

cluster, model_dir, reference = (
    memory_cluster.cluster,
    memory_cluster.model_dir,
    memory_cluster.reference,
)

AHEAD = 3  # steps the route serves past the wrong one before its check may answer


def wrong_once_and_slow_checks(cluster, at: int) -> dict:
    """The cheater (on range A, first on routes) returns a wrong output for the step at
    position `at` alone; range A's replicas answer a check that covers `at` only once the
    cheater has served `AHEAD` steps past it (or after 5 s: a loop that waits for its checks
    never gets there). Returns what happened: the positions the cheater served, whether the
    loop went on before the check answered, and when the check answered."""
    seen: dict = {"positions": [], "went_on": False, "answered": False, "wrong": 0}
    moved = trio.Event()
    cheat = cluster.servers["cheat"]
    honest_cheat = cheat.forward

    async def cheating(session, position, x, last_only):
        nonlocal moved
        out = await honest_cheat(session, position, x, last_only)
        seen["positions"].append(int(position))
        moved.set()
        moved = trio.Event()
        if position == at:
            seen["wrong"] += 1
            return out + 1.0
        return out

    cheat.forward = cheating
    for peer, span in cluster.ranges.items():
        if span != A or peer == "cheat":
            continue
        server = cluster.servers[peer]

        async def slow(session, position, x, last_only, honest=server.forward):
            if position <= at < position + int(x.shape[1]):
                with trio.move_on_after(5):
                    while max(seen["positions"], default=-1) < at + AHEAD:
                        await moved.wait()
                    seen["went_on"] = True
            out = await honest(session, position, x, last_only)
            if position <= at < position + int(x.shape[1]):
                seen["answered"] = True
            return out

        server.forward = slow
    return seen


async def run(remote, prompt, n, sampler=None, on_token=None) -> list[int]:
    await remote.open()
    try:
        return [t async for t in generate(remote, prompt, n, sampler=sampler, on_token=on_token)]
    finally:
        await close(remote)


async def test_a_wrong_step_caught_after_the_loop_went_on_is_rolled_back(
    cluster, model_dir, reference
):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    await cluster.add("cheat", model_dir, *A)
    at = len(prompt) + 4  # the step of the 5th token drawn (the 6th token comes from it)
    seen = wrong_once_and_slow_checks(cluster, at)
    v = verifier(rate=1.0, probation_rate=1.0, speculate=True)
    remote = model(cluster, v.generation())
    delivered: list[tuple[int, bool]] = []  # (token, had its step's check answered)

    def on_token(sampled) -> None:
        delivered.append((sampled.token, seen["answered"]))

    assert await run(remote, prompt, 24, on_token=on_token) == expected
    assert seen["went_on"] and seen["wrong"] == 1
    assert max(seen["positions"][: seen["positions"].index(at) + AHEAD + 1]) == at + AHEAD
    assert [r["peer_id"] for r in remote.recoveries] == ["cheat"]
    assert remote.recoveries[0]["rolled_back_to"] == at
    # tokens 1..5 come from steps before `at`; the 6th on from `at` and later: none of those
    # went out before the check of `at` answered
    assert all(answered for _, answered in delivered[5:])
    assert [t for t, _ in delivered] == expected


async def test_seeded_sampling_is_exact_across_a_roll_back(cluster, model_dir, reference):
    prompt, _ = reference
    await build(cluster, model_dir, None)
    await cluster.add("cheat", model_dir, *A)
    # the honest run: no cheater on the route, no checks
    honest = model(cluster, None, fast="a1")
    want = await run(honest, prompt, 24, sampler=legacy_sampler(prompt, temperature=0.9, seed=5))
    at = len(prompt) + 6
    seen = wrong_once_and_slow_checks(cluster, at)
    v = verifier(rate=1.0, probation_rate=1.0, speculate=True)
    remote = model(cluster, v.generation())
    got = await run(remote, prompt, 24, sampler=legacy_sampler(prompt, temperature=0.9, seed=5))
    assert seen["went_on"] and remote.recoveries[0]["rolled_back_to"] == at
    assert got == want


async def test_a_generation_that_ends_waits_for_its_last_checks(cluster, model_dir, reference):
    """The wrong step is the last token's: the generation may not end on it."""
    prompt, expected = reference
    await build(cluster, model_dir, None)
    await cluster.add("cheat", model_dir, *A)
    n = 8
    at = len(prompt) + n - 2  # the step the 8th (last) token is drawn from
    seen = wrong_once_and_slow_checks(cluster, at)
    v = verifier(rate=1.0, probation_rate=1.0, speculate=True)
    remote = model(cluster, v.generation())
    assert await run(remote, prompt, n) == expected[:n]
    assert seen["answered"] and remote.recoveries[0]["rolled_back_to"] == at


async def test_without_speculation_the_loop_waits_for_each_check(cluster, model_dir, reference):
    prompt, expected = reference
    await build(cluster, model_dir, None)
    await cluster.add("cheat", model_dir, *A)
    at = len(prompt) + 2
    seen = wrong_once_and_slow_checks(cluster, at)
    v = verifier(rate=1.0, probation_rate=1.0, speculate=False)
    remote = model(cluster, v.generation())
    with trio.fail_after(30):
        assert await run(remote, prompt, 8) == expected[:8]
    assert not seen["went_on"]  # (its replica gave up waiting for the route to go on)
    assert "rolled_back_to" not in remote.recoveries[0]
