"""What a flood of one author's entries costs a node: an author already at its quota is
refused before any signature check, and a batch stops working on an author after a few quota
refusals. Measured by counting signature verifications while a real hostile peer (its own
identity, on the in-memory network) pushes and gossips far more entries than its quota."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import trio

from p2p import codec
from p2p.identity import NodeIdentity
from p2p.testing.memnet import MemoryNetwork
from registry import replica as replica_module
from registry.entry import Entry, sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import QUOTA_STRIKES, Limits, Replica
from registry.replication import SYNC_PROTOCOL, ReplicationSettings, Replicator, topic_for

SETTINGS = ReplicationSettings(network_id="flood")
QUOTA = 20


def signed(ident: NodeIdentity, key: str, value: dict[str, Any], now_ms: int, n: int) -> Entry:
    ts = Timestamp(now_ms, n)
    return sign_entry(
        ident, kind="components", key=key, value=value, ts=ts, created=ts, owner=ident.peer_id
    )


async def wait_for(condition: Any, limit_s: float, what: str) -> None:
    deadline = trio.current_time() + limit_s
    while not condition():
        assert trio.current_time() < deadline, f"no {what} within {limit_s} virtual s"
        await trio.sleep(0.1)  # virtual time (autojump clock)


async def test_a_flood_over_quota_costs_few_signature_checks(autojump_clock, monkeypatch):
    verified: Counter[str] = Counter()
    real_verify = replica_module.verify_entry

    def counting_verify(entry: Entry) -> bool:
        verified[entry.author] += 1
        return real_verify(entry)

    monkeypatch.setattr(replica_module, "verify_entry", counting_verify)

    hub = MemoryNetwork(seed=12)
    nodes = []
    for _ in range(2):
        ident = NodeIdentity(node_seed=hub.rng.randbytes(32), payout_key=hub.rng.randbytes(32))
        node = hub.add_node(ident.peer_id)
        rejects: Counter[str] = Counter()
        replica = Replica(
            ident,
            clock=HybridClock(now_ms=lambda: int(hub.now() * 1000)),
            limits=Limits(author_max_entries=QUOTA),
            on_reject=lambda source, reason, rejects=rejects: rejects.update(
                [f"{source}:{reason}"]
            ),
        )
        replicator = Replicator(node, replica, SETTINGS, rng=random.Random(1))
        nodes.append((node, replica, replicator, rejects))
    (target, target_replica, target_repl, rejects), (honest, honest_replica, honest_repl, _) = nodes
    await honest.connect(target.peer_id)
    mallory = NodeIdentity.generate()
    attacker = hub.add_node(mallory.peer_id)
    await attacker.connect(target.peer_id)

    now = int(hub.now() * 1000)
    value = {"name": "fill", "version": "1", "config": {"blob": "x" * 4000}}
    flood = [signed(mallory, f"fill-{n}", value, now, n) for n in range(2000)]
    wire = [e.to_wire() for e in flood]
    async with trio.open_nursery() as nursery:
        for _, _, repl, _ in nodes:
            await repl.start()
            nursery.start_soon(repl.run_anti_entropy)
        sent = 0
        for start in range(0, 1000, 32):  # sync pushes, 32 entries each
            push = {"v": 1, "op": "push", "entries": wire[start : start + 32]}
            reply = await attacker.request(target.peer_id, SYNC_PROTOCOL, codec.encode(push))
            assert codec.decode(reply)["v"] == 1
            sent += len(push["entries"])
        for start in range(1000, 2000, 8):  # gossip, 8 entries a message
            data = codec.encode({"v": 1, "entries": wire[start : start + 8]})
            await attacker.publish(topic_for(SETTINGS.network_id), data)
            sent += 8
            await trio.sleep(0.01)
        await wait_for(
            lambda: rejects["sync:quota"] + rejects["gossip:quota"] >= 2000 - QUOTA,
            30,
            "every flooded entry refused",
        )
        held = [e for e in target_replica.entries.values() if e.author == mallory.peer_id]
        assert len(held) == QUOTA
        # without the early checks every entry would be verified (2,000 on the target, and
        # on the honest node what the target passed on); now each of the two verifies the
        # quota's worth, and at most QUOTA_STRIKES more
        assert verified[mallory.peer_id] <= 2 * (QUOTA + QUOTA_STRIKES), verified
        assert verified[mallory.peer_id] < sent // 20

        # an honest write still replicates to the target
        entry = await honest_repl.write("components", "honest", {"name": "h", "version": "1"})
        await wait_for(
            lambda: target_replica.get("components", "honest") == entry, 10, "the honest write"
        )
        assert verified[honest_replica.ident.peer_id] >= 1
        nursery.cancel_scope.cancel()


async def test_an_author_at_quota_is_refused_before_its_signature_is_checked(monkeypatch):
    """A forged entry (bad signature) of an author at quota is refused for quota, unverified;
    one of an author under quota is still refused for its signature."""
    calls: list[str] = []
    real_verify = replica_module.verify_entry
    monkeypatch.setattr(
        replica_module, "verify_entry", lambda e: calls.append(e.key) or real_verify(e)
    )
    author = NodeIdentity.generate()
    clock_ms = 1_000_000
    r = Replica(
        NodeIdentity.generate(),
        clock=HybridClock(now_ms=lambda: clock_ms),
        limits=Limits(author_max_entries=2),
    )
    good = [signed(author, f"k{n}", {"name": "a", "version": "1"}, clock_ms, n) for n in range(2)]
    assert await r.apply(good, "sync") == good
    forged = signed(author, "k9", {"name": "a", "version": "1"}, clock_ms, 9)
    forged = Entry(**{**forged.__dict__, "signature": bytes(64)})
    calls.clear()
    assert await r.apply([forged], "sync") == []
    assert r.rejected == Counter({"quota": 1}) and calls == []
    other = NodeIdentity.generate()
    bad = signed(other, "o1", {"name": "a", "version": "1"}, clock_ms, 1)
    bad = Entry(**{**bad.__dict__, "signature": bytes(64)})
    assert await r.apply([bad], "sync") == []
    assert r.rejected["bad_signature"] == 1 and calls == ["o1"]


async def test_sync_pushes_beyond_a_peers_byte_budget_are_refused_unchecked(
    autojump_clock, monkeypatch
):
    """A peer pushing faster than `push_bytes_per_s` (entries of many fresh authors, so no
    quota helps) has the rest refused (`sync`/`rate_limited`) without a signature check; its
    pushes are answered, and an honest peer's write still replicates."""
    verified: Counter[str] = Counter()
    real_verify = replica_module.verify_entry

    def counting_verify(entry: Entry) -> bool:
        verified["all"] += 1
        return real_verify(entry)

    monkeypatch.setattr(replica_module, "verify_entry", counting_verify)
    hub = MemoryNetwork(seed=13)
    settings = ReplicationSettings(
        network_id="flood",
        push_bytes_per_s=256 * 1024,
        push_bytes_burst=1 << 20,
        max_message_bytes=1 << 20,  # the burst is never below the largest message
    )
    ident = NodeIdentity(node_seed=hub.rng.randbytes(32), payout_key=hub.rng.randbytes(32))
    target = hub.add_node(ident.peer_id)
    rejects: Counter[str] = Counter()
    target_replica = Replica(ident, clock=HybridClock(now_ms=lambda: int(hub.now() * 1000)))
    target_repl = Replicator(
        target,
        target_replica,
        settings,
        rng=random.Random(2),
        on_reject=lambda source, reason: rejects.update([f"{source}:{reason}"]),
    )
    honest_ident = NodeIdentity.generate()
    honest = hub.add_node(honest_ident.peer_id)
    honest_repl = Replicator(
        honest,
        Replica(honest_ident, clock=HybridClock(now_ms=lambda: int(hub.now() * 1000))),
        settings,
        rng=random.Random(3),
    )
    await honest.connect(target.peer_id)
    attacker = hub.add_node(NodeIdentity.generate().peer_id)
    await attacker.connect(target.peer_id)
    now = int(hub.now() * 1000)
    value = {"name": "fill", "version": "1", "config": {"blob": "x" * 4000}}
    async with trio.open_nursery() as nursery:
        for repl in (target_repl, honest_repl):
            await repl.start()
            nursery.start_soon(repl.run_anti_entropy)
        pushed = 0
        started = trio.current_time()
        for n in range(40):  # 40 pushes of 32 entries (~4 KB each), ~5 MB, back to back
            authors = [NodeIdentity.generate() for _ in range(32)]
            wire = [signed(a, f"k{n}-{i}", value, now, 0).to_wire() for i, a in enumerate(authors)]
            push = codec.encode({"v": 1, "op": "push", "entries": wire})
            reply = await attacker.request(target.peer_id, SYNC_PROTOCOL, push)
            assert codec.decode(reply)["v"] == 1  # answered, refused or not
            pushed += len(push)
        elapsed = trio.current_time() - started
        assert rejects["sync:rate_limited"] >= 32 * 20, rejects
        checked = verified["all"] * len(push) / 32  # bytes of pushes that were checked
        assert checked <= (1 << 20) + 256 * 1024 * elapsed + len(push), (checked, elapsed)
        assert checked < pushed / 3
        entry = await honest_repl.write("components", "honest", {"name": "h", "version": "1"})
        await wait_for(
            lambda: target_replica.get("components", "honest") == entry, 10, "the honest write"
        )
        nursery.cancel_scope.cancel()
