"""The policies that ship with gridmesh, run through the sandbox: least-loaded assignment
spreads equal instances, and the token bucket refuses over quota and refills."""

from __future__ import annotations

import pytest
import trio

from daemon.sandbox import PolicyFailed, SandboxConfig, SandboxPool
from daemon.sandbox.defaults import BUILTIN, least_loaded, token_bucket

CONFIG = SandboxConfig(spare_workers=0, workers_per_policy=2)


def test_builtin_packages_are_trusted_and_stable() -> None:
    for make in BUILTIN.values():
        first, second = make(), make()
        assert first.trusted and first.digest == second.digest


async def test_least_loaded_assignment() -> None:
    policy = least_loaded()
    async with SandboxPool(CONFIG) as pool:

        async def pick(instances: list[dict], **parameters: object) -> dict:
            args = {"input_data": {"instances": instances}, "parameters": parameters}
            return await pool.call(policy, "eval", args)

        loads = [{"id": "a", "load": 0.7}, {"id": "b", "load": 0.2}, {"id": "c", "load": 0.9}]
        assert (await pick(loads))["instance"] == "b"
        # equal instances share the requests
        equal = [{"id": "a", "load": 0.5}, {"id": "b", "load": 0.5}]
        chosen = [(await pick(equal))["instance"] for _ in range(10)]
        assert chosen.count("a") == 5 and chosen.count("b") == 5
        near = [{"id": "a", "queue": 3}, {"id": "b", "queue": 4}, {"id": "c", "queue": 9}]
        picks = {(await pick(near, load_key="queue", tolerance=1))["instance"] for _ in range(4)}
        assert picks == {"a", "b"}
        for bad, match in (
            ([], "non-empty list"),
            ([{"id": "a", "load": -1}], "must be a number >= 0"),
            ([{"load": 1}], "string id"),
        ):
            with pytest.raises(PolicyFailed, match=match):
                await pick(bad)


async def test_token_bucket_quota() -> None:
    policy = token_bucket().bind("quota", settings={"rate_per_s": 2, "burst": 3})
    async with SandboxPool(CONFIG) as pool:

        async def ask(key: str, now: float, cost: float = 1) -> dict:
            data = {"key": key, "now": now, "cost": cost}
            return await pool.call(policy, "eval", {"input_data": data})

        assert [(await ask("session:s", 0.0))["allowed"] for _ in range(4)] == [
            True,
            True,
            True,
            False,
        ]
        refused = await ask("session:s", 0.0)
        assert refused == {"allowed": False, "remaining": 0.0, "retry_after_s": 0.5}
        assert (await ask("apikey:other", 0.0))["allowed"]  # keys have their own buckets
        assert (await ask("session:s", 0.5))["allowed"]  # refilled 1 token in 0.5 s
        assert (await ask("session:s", 100.0, cost=5))["retry_after_s"] is None  # > burst
        # concurrent calls of a stateful policy share one worker, so one bucket
        results: list[bool] = []

        async def one() -> None:
            results.append((await ask("session:c", 50.0))["allowed"])

        async with trio.open_nursery() as nursery:
            for _ in range(6):
                nursery.start_soon(one)
        assert results.count(True) == 3
        assert await pool.call(policy, "management", {"action": "state"}) == {"keys": 3}
        await pool.call(policy, "management", {"action": "reset", "data": {"key": "session:c"}})
        assert (await ask("session:c", 50.0))["allowed"]
    with pytest.raises(PolicyFailed, match="rate_per_s must be a number > 0"):
        async with SandboxPool(CONFIG) as pool:
            bad = token_bucket().bind("q", settings={"rate_per_s": 0})
            await pool.call(bad, "eval", {"input_data": {"key": "k"}})
