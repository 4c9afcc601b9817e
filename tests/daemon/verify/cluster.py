"""Honest and cheating shard servers on the in-memory network for the verification tests:
range A = layers [0, 3) on a cheater and three honest servers, range B = [3, 6) on three honest
ones; the cheater announces the lowest round trip, so routes go through it."""

from __future__ import annotations

import random

from daemon.shards.client import RemoteModel, generate
from daemon.verify.cheat import Cheat
from daemon.verify.policy import VerifyConfig
from daemon.verify.verifier import Verifier
from scheduler.routing import Server
from tests.daemon.shards.memory_cluster import LAYERS, MemoryCluster

A, B = (0, 3), (3, 6)
HONEST_A = ("a1", "a2", "a3")
HONEST_B = ("b1", "b2", "b3")


async def build(cluster: MemoryCluster, model_dir, mode: str | None, **cheat_kw) -> Cheat | None:
    """The servers; `mode`: the cheater's ("cheat", on range A), None for none."""
    for peer in HONEST_A:
        await cluster.add(peer, model_dir, *A)
    for peer in HONEST_B:
        await cluster.add(peer, model_dir, *B)
    if mode is None:
        return None
    server = await cluster.add("cheat", model_dir, *A)
    return Cheat(server, mode, **cheat_kw).install()


def announced(cluster: MemoryCluster, fast: str = "cheat"):
    async def servers() -> list[Server]:
        return [
            Server(p, a, b, ms_per_layer=1.0, rtt_ms=0.5 if p == fast else 1.0)
            for p, (a, b) in cluster.ranges.items()
            if p not in cluster.dead
        ]

    return servers


def verifier(seed: int = 1, **config) -> Verifier:
    return Verifier(VerifyConfig(**config), rng=random.Random(seed))


def model(cluster: MemoryCluster, checks, max_length: int = 128, **kw) -> RemoteModel:
    return RemoteModel(
        cluster.client,
        announced(cluster, kw.pop("fast", "cheat")),
        model_id="tiny",
        num_layers=LAYERS,
        max_length=max_length,
        verifier=checks,
        **kw,
    )


async def tokens(remote: RemoteModel, prompt: list[int], n: int) -> list[int]:
    """The generation's tokens; its last route stays in `remote.last_route`."""
    await remote.open()
    try:
        return [t async for t in generate(remote, prompt, n)]
    finally:
        remote.last_route = remote.route  # type: ignore[attr-defined]
        await close(remote)


async def close(remote: RemoteModel) -> None:
    """Close the generation and its checks' replica sessions."""
    await remote.close()
    if remote.verifier is not None:
        await remote.verifier.aclose()
