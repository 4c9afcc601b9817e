"""The DHT flood: forged puts (tampered, stale, foreign, oversized records) sent to the
target alone."""

from __future__ import annotations

import os

import trio

from daemon.tools.hostile_peer.peer import Flood
from p2p import codec, records


async def dht(attack: Flood) -> None:
    """Forged DHT puts (tampered, stale, foreign, oversized records), to the target only."""
    now = attack.net.now()
    good = records.make_record(
        attack.me, network_id=attack.network_id, now=now, valid_for=60.0, addrs=[], resources={}
    )
    tampered = codec.decode(good)
    tampered["body"]["resources"] = {"gpus": [{"name": "H100"}] * 8}
    stale = records.make_record(
        attack.me,
        network_id=attack.network_id,
        now=now - 600,
        valid_for=60.0,
        addrs=[],
        resources={},
    )
    values = [
        codec.encode(tampered),
        stale,
        good,  # a good record under a key that is not its own
        os.urandom(300),
        os.urandom(records.MAX_RECORD_BYTES + 1024),  # over the record limit
    ]
    store = attack.net.dht.value_store

    async def one() -> None:
        value = attack.rng.choice(values)
        if attack.rng.random() < 0.2:
            key = f"/foreign/{attack.rng.getrandbits(128):x}"  # outside the namespace
        else:
            key = f"/{records.NAMESPACE}/{attack.rng.getrandbits(256):064x}"
        attack.stats.sent += 1
        attack.stats.bytes += len(value)
        # straight to the target: a DHT put would also look up and dial its neighbours;
        # an answer that takes longer than 2 s is not waited for
        with trio.move_on_after(2) as scope:
            stored = await store._store_at_peer(attack.target_id, key.encode(), value)
        if scope.cancelled_caught:
            attack.stats.failed += 1
        elif stored:
            attack.stats.accepted += 1
        else:
            attack.stats.refused += 1

    await attack.workers(one, 4 * attack.limits.concurrency)
