"""Discovery at scale on the in-memory network: k-bucket routing tables, DHT walks that take
about log2(N) rounds, and (p2p.testing.discovery_sim) hundreds of nodes that find each other
beyond the peers they know and drop dead ones within 10 s, on trio's virtual clock."""

from __future__ import annotations

import math
import random

import trio

from p2p.testing.kademlia import K, RoutingTable, dht_id, target_id
from p2p.testing.memnet import MemoryNetwork


def test_k_buckets_keep_at_most_k_per_bucket_and_free_room_on_discard() -> None:
    own = dht_id("me")
    table = RoutingTable(own, bucket_size=2)
    names = [f"p{i}" for i in range(200)]
    added = [name for name in names if table.add(name)]
    buckets: dict[int, int] = {}
    for name in added:
        bucket = (dht_id(name) ^ own).bit_length()
        buckets[bucket] = buckets.get(bucket, 0) + 1
    assert max(buckets.values()) == 2
    assert len(added) < 30  # the far buckets are full; most newcomers were refused
    refused = next(n for n in names if n not in table and (dht_id(n) ^ own).bit_length() == 256)
    assert not table.add(refused)
    full_bucket = [n for n in added if (dht_id(n) ^ own).bit_length() == 256]
    table.discard(full_bucket[0])
    assert table.add(refused)  # a failed peer's place goes to a newcomer
    assert len(RoutingTable().peers()) == 0 and all(RoutingTable().add(n) for n in names[:50])


async def _bootstrapped(count: int, seed: int) -> tuple[MemoryNetwork, list]:
    """`count` nodes with k-buckets, each joined through a random earlier one, refreshed."""
    hub = MemoryNetwork(seed=seed, bucket_size=K)
    rng = random.Random(seed)
    nodes = [hub.add_node(f"node-{i}") for i in range(count)]
    for index in range(1, count):
        await nodes[index].connect(nodes[rng.randrange(index)].peer_id)
    for _ in range(2):
        async with trio.open_nursery() as nursery:
            for node in nodes:
                nursery.start_soon(node.refresh)
    return hub, nodes


async def test_walks_find_the_true_closest_in_about_log2_n_rounds(autojump_clock) -> None:
    count = 400
    hub, nodes = await _bootstrapped(count, seed=11)
    known = [len(node.known_peers()) for node in nodes]
    assert max(known) < count / 2, max(known)  # k-buckets: nobody knows everyone
    hub.lookup_rounds.clear()
    rng = random.Random(12)
    for walker in rng.sample(nodes, 40):
        target = rng.randbytes(32)
        found = await walker.dht_find_peers(target)
        others = [n.peer_id for n in nodes if n is not walker]
        best = sorted(others, key=lambda p: dht_id(p) ^ target_id(target))[:K]
        assert walker.peer_id not in found
        assert len(set(found) & set(best)) >= K - 2, (found, best)
    rounds = list(hub.lookup_rounds.elements())
    assert len(rounds) == 40
    assert max(rounds) <= math.log2(count) and sum(rounds) / len(rounds) >= 2, rounds
