"""Flood families on the registry's gossip and sync: entries with bad signatures (`badsig`),
garbage on the registry topic (`gossip`), and a fill of valid maximum-size entries by one
author (`fill`)."""

from __future__ import annotations

import os
import time
from typing import Any

import trio

from daemon.tools.hostile_peer.peer import Flood
from p2p import codec
from registry.entry import sign_entry
from registry.hlc import Timestamp
from registry.replication import SYNC_PROTOCOL, WIRE_VERSION

GOSSIP_ENTRIES = 64  # registry.replication.MAX_GOSSIP_ENTRIES: a message the target must open
FILL_STRINGS = 15  # 15 strings of 4,000 characters: just under the 64 KiB value limit


async def badsig(attack: Flood) -> None:
    """Registry gossip whose entries carry bad signatures (GOSSIP_ENTRIES per message)."""
    now_ms = int(time.time() * 1000)
    template = sign_entry(
        attack.me,
        kind="components",
        key="x",
        value={"name": "forged", "version": "1"},
        ts=Timestamp(now_ms, 0),
        created=Timestamp(now_ms, 0),
        owner=attack.me.peer_id,
    ).to_wire()

    async def one() -> None:
        entries = []
        for i in range(GOSSIP_ENTRIES):
            entry = dict(template)
            entry["key"] = f"forged-{attack.rng.getrandbits(64):x}"
            # half claim to be the target's, half ours: both with a signature of neither
            entry["author"] = entry["owner"] = attack.target if i % 2 else attack.me.peer_id
            entry["sig"] = attack.rng.randbytes(64)
            entries.append(entry)
        await attack.publish(codec.encode({"v": WIRE_VERSION, "entries": entries}))

    await attack.workers(one, 2)


async def gossip(attack: Flood) -> None:
    """Garbage on the registry topic: random bytes and malformed structures."""
    malformed = [
        {"v": WIRE_VERSION, "entries": "not a list"},
        {"v": WIRE_VERSION, "entries": [{"kind": 1}] * GOSSIP_ENTRIES},
        {"v": 99, "entries": []},
        _nested(40),  # deeper than the decoder allows
        {"v": WIRE_VERSION, "entries": [None] * 5000},
    ]

    async def one() -> None:
        if attack.rng.random() < 0.5:
            data = os.urandom(attack.rng.choice((64, 1024, 16 * 1024, 64 * 1024)))
        else:
            data = codec.encode(attack.rng.choice(malformed))
        await attack.publish(data)

    await attack.workers(one, 2)


async def fill(attack: Flood) -> None:
    """A registry fill by one author: valid maximum-size entries by sync push and gossip."""
    filler = {f"b{i}": "x" * 4000 for i in range(FILL_STRINGS)}
    made = 0

    def entries(n: int) -> list[dict[str, Any]]:
        nonlocal made
        out = []
        for _ in range(min(n, attack.limits.fill_entries - made)):
            made += 1
            now_ms = int(time.time() * 1000)
            key = f"fill-{attack.me.peer_id[-8:]}-{made}"
            out.append(
                sign_entry(
                    attack.me,
                    kind="components",
                    key=key,
                    value={"name": key, "version": "1", "config": filler},
                    ts=Timestamp(now_ms, made),
                    created=Timestamp(now_ms, made),
                    owner=attack.me.peer_id,
                ).to_wire()
            )
        return out

    async def push() -> None:
        batch = entries(32)  # about 2 MB: under the sync protocol's 4 MiB
        if not batch:
            attack.exhausted = True
            return
        payload = codec.encode({"v": WIRE_VERSION, "op": "push", "entries": batch})
        attack.stats.sent += len(batch)
        attack.stats.bytes += len(payload)
        reply = codec.decode(
            await attack.net.request(attack.target, SYNC_PROTOCOL, payload, timeout_s=10)
        )
        applied = reply.get("applied", 0) if isinstance(reply, dict) else 0
        applied = applied if isinstance(applied, int) else 0
        attack.stats.accepted += applied
        attack.stats.refused += len(batch) - applied

    async def gossip() -> None:
        await attack.outbound_room()
        batch = entries(8)  # about 500 KB: under the gossip limit
        if not batch:
            attack.exhausted = True
            return
        if await attack.publish(codec.encode({"v": WIRE_VERSION, "entries": batch})):
            attack.stats.sent += len(batch) - 1  # entries, not messages

    async with trio.open_nursery() as nursery:
        if attack.limits.fill_pushers > 0:
            nursery.start_soon(attack.workers, push, attack.limits.fill_pushers)
        nursery.start_soon(attack.workers, gossip, 1)


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth):
        out = [out]
    return out
