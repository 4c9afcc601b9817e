"""The registry's gossip validator (`Replicator.validate_gossip`): gossip this node would not
take goes no further than this node.

Attacked as a real peer on the in-memory network: a hostile node, connected to the target
only, gossips over-quota entries, garbage and replays; the nodes behind the target (a line,
hostile - target - c - d) never receive them, neither delivered nor forwarded, while the
target counts each refusal once; honest gossip still crosses the line hop by hop (no anti-
entropy runs, so only gossip forwarding can carry it)."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from p2p import codec
from p2p.identity import NodeIdentity
from p2p.network import GossipVerdict
from p2p.testing.memnet import MemoryNetwork, MemoryNode
from registry import replica as replica_module
from registry.entry import Entry, sign_entry
from registry.hlc import HybridClock, Timestamp
from registry.replica import QUOTA_STRIKES, Limits, Replica
from registry.replication import ReplicationSettings, Replicator, topic_for

ACCEPT, IGNORE, REJECT = GossipVerdict.ACCEPT, GossipVerdict.IGNORE, GossipVerdict.REJECT

SETTINGS = ReplicationSettings(network_id="validator")
TOPIC = topic_for(SETTINGS.network_id)
QUOTA = 10
VALUE = {"name": "fill", "version": "1", "config": {"blob": "x" * 2000}}


@dataclass
class Node:
    node: MemoryNode
    replica: Replica
    replicator: Replicator
    rejects: Counter[str] = field(default_factory=Counter)


def _replicated(hub: MemoryNetwork, ident: NodeIdentity) -> Node:
    rejects: Counter[str] = Counter()

    def count(source: str, reason: str) -> None:
        rejects[f"{source}:{reason}"] += 1

    replica = Replica(
        ident,
        clock=HybridClock(now_ms=lambda: int(hub.now() * 1000)),
        limits=Limits(author_max_entries=QUOTA),
        on_reject=count,
    )
    node = hub.add_node(ident.peer_id)
    replicator = Replicator(node, replica, SETTINGS, rng=random.Random(1), on_reject=count)
    return Node(node, replica, replicator, rejects)


def _offline(
    clock_ms: int,
    counts: Counter[str],
    limits: Limits | None = None,
    settings: ReplicationSettings = SETTINGS,
) -> tuple[Replica, Replicator]:
    """A replica and its replicator without a network (messages are handed in directly) on a
    frozen clock, both counting refusals into `counts` as `source:reason`."""

    def count(source: str, reason: str) -> None:
        counts[f"{source}:{reason}"] += 1

    replica = Replica(
        NodeIdentity.generate(),
        clock=HybridClock(now_ms=lambda: clock_ms),
        limits=limits or Limits(),
        on_reject=count,
    )
    repl = Replicator(None, replica, settings, on_reject=count)  # type: ignore[arg-type]
    return replica, repl


def signed(ident: NodeIdentity, key: str, now_ms: int, n: int) -> Entry:
    ts = Timestamp(now_ms, n)
    return sign_entry(
        ident, kind="components", key=key, value=VALUE, ts=ts, created=ts, owner=ident.peer_id
    )


def message(entries: list[Any]) -> bytes:
    return codec.encode({"v": 1, "entries": entries})


async def wait_for(condition: Any, limit_s: float, what: str) -> None:
    deadline = trio.current_time() + limit_s
    while not condition():
        assert trio.current_time() < deadline, f"no {what} within {limit_s} virtual s"
        await trio.sleep(0.05)  # virtual time (autojump clock)


@pytest.fixture
def verified(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Entry signatures checked by the replicas, per author."""
    counts: Counter[str] = Counter()
    real_verify = replica_module.verify_entry

    def counting_verify(entry: Entry) -> bool:
        counts[entry.author] += 1
        return real_verify(entry)

    monkeypatch.setattr(replica_module, "verify_entry", counting_verify)
    return counts


async def test_gossip_the_target_refuses_never_reaches_the_nodes_behind_it(
    autojump_clock, verified
):
    hub = MemoryNetwork(seed=21)
    mallory = NodeIdentity.generate()
    hostile = hub.add_node(mallory.peer_id)
    target, c, d = (_replicated(hub, NodeIdentity.generate()) for _ in range(3))
    # the line: hostile - target - c - d (each node knows its neighbours only)
    await hostile.connect(target.node.peer_id)
    await c.node.connect(target.node.peer_id)
    await d.node.connect(c.node.peer_id)
    assert hostile.known_peers() == {target.node.peer_id}
    assert d.node.known_peers() == {c.node.peer_id}

    async def ignore(origin: str, data: bytes) -> None:
        pass

    await hostile.subscribe(TOPIC, ignore)  # a peer of the mesh like any other
    for n in (target, c, d):
        await n.replicator.start()

    now = int(hub.now() * 1000)
    flood = [signed(mallory, f"fill-{i}", now, i) for i in range(QUOTA + 200)]
    wire = [e.to_wire() for e in flood]
    # the author's quota's worth: taken and forwarded down the line (8 entries a message)
    for start in range(0, QUOTA, 8):
        await hostile.publish(TOPIC, message(wire[start : min(start + 8, QUOTA)]))
    held = [("components", f"fill-{i}") for i in range(QUOTA)]
    await wait_for(lambda: all(k in d.replica.entries for k in held), 5, "the quota at d")
    received = {n.node.peer_id: n.node.gossip_received for n in (c, d)}
    verified.clear()

    # then what none of them would take
    over_quota = [message(wire[s : s + 8]) for s in range(QUOTA, QUOTA + 200, 8)]
    forged = dict(wire[QUOTA], key="forged", sig=bytes(64))
    garbage = [
        random.Random(3).randbytes(1000),  # not msgpack
        codec.encode({"v": 99, "entries": []}),  # an unknown version
        message([{"kind": 5}, "x"]),  # malformed entries
        message([dict(forged, author=target.node.peer_id, owner=target.node.peer_id)]),
        message(wire[:2][::-1]),  # a replay, as other bytes: every entry already held
    ]
    for data in over_quota + garbage:
        await hostile.publish(TOPIC, data)
    await trio.sleep(2)  # virtual time: every hop long arrived

    # nothing of it reached the nodes behind the target, neither delivered nor forwarded
    for n in (c, d):
        assert n.node.gossip_received == received[n.node.peer_id]  # nothing new arrived
        assert n.rejects == Counter(), n.rejects
    # refused at the target, each refusal counted once there
    refused_entries = 200
    assert target.rejects["gossip:quota"] == refused_entries, target.rejects
    assert target.replica.rejected["quota"] == refused_entries
    assert target.rejects["gossip:malformed"] == 1 + 2  # the random bytes, the two entries
    assert target.rejects["gossip:bad_version"] == 1
    assert target.rejects["gossip:bad_signature"] == 1
    assert target.replicator.stats["gossip_refused"] == len(over_quota) + len(garbage)
    assert target.node.gossip_refused == len(over_quota) + len(garbage)
    for n in (target, c, d):
        assert sorted(k for k in n.replica.entries if k[1].startswith("fill")) == sorted(held)
    # and cheaply: the over-quota entries were refused before any signature check
    assert verified[mallory.peer_id] == 0, verified
    assert len(over_quota) * QUOTA_STRIKES <= refused_entries

    # honest gossip still crosses the line both ways, hop by hop
    written = await d.replicator.write("components", "from-d", {"name": "d", "version": "1"})
    await wait_for(lambda: target.replica.get("components", "from-d") == written, 5, "d->target")
    written = await target.replicator.write("components", "from-t", {"name": "t", "version": "1"})
    await wait_for(lambda: d.replica.get("components", "from-t") == written, 5, "target->d")


async def test_the_validator_counts_a_refused_message_as_the_handler_would():
    """Twin replicas: one sees each message through the validator only (refused there, so
    never handled), the other through the handler only; their counts are equal."""
    author = NodeIdentity.generate()
    clock_ms = 1_800_000_000_000
    twins = []
    for _ in range(2):
        counts: Counter[str] = Counter()
        replica, repl = _offline(clock_ms, counts, Limits(author_max_entries=3))
        twins.append((replica, repl, counts))
    entries = [signed(author, f"k{i}", clock_ms, i).to_wire() for i in range(12)]
    taken = message(entries[:3])
    for _, repl, _ in twins:
        await repl.on_gossip("peer", taken)  # the author's quota, held by both
    stranger = NodeIdentity.generate()
    badsig = dict(signed(stranger, "s", clock_ms, 1).to_wire(), sig=bytes(64))
    # each refused message, and whether it is held against its origin (REJECT) or is only
    # old news here (IGNORE: what honest peers' gossip is all the time)
    refused = [
        (message(entries[3:12]), REJECT),  # over quota, past QUOTA_STRIKES
        (message([badsig, {"kind": 1}, *entries[3:5]]), REJECT),
        (message(entries[:3]), IGNORE),  # held already: refused, nothing counted
        (message([dict(entries[0], value={"name": 1})]), REJECT),  # a schema error
        (codec.encode({"v": 1, "entries": "x"}), REJECT),
        (b"\xc1", REJECT),
    ]
    (validated, via_validator, counts_v), (handled, via_handler, counts_h) = twins
    for data, verdict in refused:
        assert via_validator.validate_gossip("peer", data) is verdict
        await via_handler.on_gossip("peer", data)
    assert counts_v == counts_h, (counts_v, counts_h)
    assert validated.rejected == handled.rejected
    assert counts_v["gossip:quota"] == 9 + 2 and counts_v["gossip:bad_signature"] == 1
    assert counts_v["gossip:schema"] == 1
    assert validated.entries == handled.entries
    assert validated._size_memo == {}  # the validator keeps nothing of what it refused
    # and one entry it would take is enough to pass a message on
    fresh = signed(stranger, "t", clock_ms, 2).to_wire()
    assert via_validator.validate_gossip("peer", message([*entries[3:8], fresh])) is ACCEPT


def test_each_refusal_honest_writes_meet_is_ignored_and_each_harmful_one_rejected():
    """One message per refusal reason, each signed by its author: what honest gossip meets in
    passing (an older version, a cluster not known here yet, a raced claim, a write that
    lost its authority, a write a newer admission rule refuses) is IGNOREd, counted under its
    reason and held against no one; what only a faulty or hostile author writes is
    REJECTed (HARMFUL_REASONS)."""
    clock_ms = 1_800_000_000_000
    counts: Counter[str] = Counter()
    replica, repl = _offline(clock_ms, counts)
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()

    def write(
        who: NodeIdentity, kind: str, key: str, value: Any, ts: Timestamp, **kw: Any
    ) -> dict[str, Any]:
        created = kw.pop("created", ts)
        owner = kw.pop("owner", who.peer_id)
        return sign_entry(
            who, kind=kind, key=key, value=value, ts=ts, created=created, owner=owner
        ).to_wire()

    now = Timestamp(clock_ms, 0)
    first = Timestamp(clock_ms, 1)
    held = write(alice, "components", "held", VALUE, Timestamp(clock_ms, 5), created=first)
    taken = message([held])
    trio.run(repl.on_gossip, "peer", taken)
    assert ("components", "held") in replica.entries
    hour_ago = Timestamp(clock_ms - 3_600_000, 0)
    cases = {
        "older_version": (write(alice, "components", "held", VALUE, first), None),
        "unknown_cluster": (
            write(alice, "components", "c", dict(VALUE, cluster_id="nowhere"), now),
            "unknown_cluster",
        ),
        "stale_claim": (
            write(bob, "components", "held", VALUE, Timestamp(clock_ms, 9), created=hour_ago),
            "stale_claim",
        ),
        "unauthorized": (
            write(bob, "components", "alices", VALUE, now, owner=alice.peer_id),
            "unauthorized",
        ),
        "admission": (
            write(
                bob,
                "endpoints",
                "e",
                {"url": "https://x.example", "protocol": "http", "peer_id": "other"},
                now,
            ),
            "admission",
        ),
    }
    for name, (entry, reason) in cases.items():
        counts.clear()
        assert repl.validate_gossip("peer", message([entry])) is IGNORE, name
        expected = Counter({f"gossip:{reason}": 1}) if reason else Counter()
        assert counts == expected, (name, counts)
    assert len(replica.entries) == 1  # none of them changed anything
    # (quota: test_the_validator_counts_a_refused_message_as_the_handler_would)
    harmful = {
        "bad_signature": dict(write(bob, "components", "b", VALUE, now), sig=bytes(64)),
        "schema": write(bob, "components", "s", {"name": 1}, now),
        "unknown_kind": write(bob, "no-such-kind", "k", VALUE, now),
        "bad_timestamp": write(bob, "components", "t", VALUE, Timestamp(clock_ms + 3_600_000, 0)),
    }
    for reason, entry in harmful.items():
        counts.clear()
        assert repl.validate_gossip("peer", message([entry])) is REJECT, reason
        assert counts[f"gossip:{reason}"] == 1, (reason, counts)


async def test_a_flood_of_replayed_entries_costs_no_signature_check_and_goes_nowhere(
    autojump_clock, verified
):
    """A peer that replays entries the target holds (honest ones, signed by their authors,
    in messages of its own) earns an IGNORE each: held against no one, never forwarded,
    nothing written, and not one signature checked (a held entry is recognised by equality
    before any check)."""
    hub = MemoryNetwork(seed=5)
    mallory = NodeIdentity.generate()
    hostile = hub.add_node(mallory.peer_id)
    target, c = (_replicated(hub, NodeIdentity.generate()) for _ in range(2))
    await hostile.connect(target.node.peer_id)
    await c.node.connect(target.node.peer_id)

    async def ignore(origin: str, data: bytes) -> None:
        pass

    await hostile.subscribe(TOPIC, ignore)
    for n in (target, c):
        await n.replicator.start()
    honest = [await c.replicator.write("components", f"h{i}", VALUE) for i in range(8)]
    await wait_for(
        lambda: all(target.replica.get(e.kind, e.key) == e for e in honest), 5, "honest writes"
    )
    await trio.sleep(1)
    received_at_c = c.node.gossip_received
    applied = target.replicator.stats["gossip_applied"]
    verified.clear()
    replays = [e.to_wire() for e in honest]
    rng = random.Random(7)
    # each message other bytes (other entries or another order): no seen-message cache
    # recognises them, the validator sees every one
    flood = {message(rng.sample(replays, k=rng.randint(2, 8))) for _ in range(300)}
    for data in flood:
        await hostile.publish(TOPIC, data)
    await trio.sleep(2)
    assert target.node.gossip_refused == len(flood) > 250
    assert target.replicator.stats["gossip_applied"] == applied  # nothing written
    assert c.node.gossip_received == received_at_c  # nothing forwarded
    assert sum(verified.values()) == 0, verified  # no signature checked
    assert target.rejects == Counter(), target.rejects  # old news: no refusal counted


def test_a_message_with_an_author_over_its_gossip_budget_is_not_taken_for_anothers_entry():
    """An attacker whose identity is past its gossip budget cannot have its entries relayed
    by putting one fresh entry of a second identity beside them: the message is taken for
    none of its entries (IGNORE, not held against anyone), and comes by anti-entropy."""
    clock_ms = 1_800_000_000_000
    counts: Counter[str] = Counter()
    settings = ReplicationSettings(network_id="validator", gossip_author_bytes_burst=8 << 10)
    _, repl = _offline(clock_ms, counts, settings=settings)  # frozen: no budget comes back
    filler, accomplice = NodeIdentity.generate(), NodeIdentity.generate()
    first = [signed(filler, f"f{i}", clock_ms, i).to_wire() for i in range(3)]  # ~6 KB
    assert repl.validate_gossip("peer", message(first)) is ACCEPT  # within its burst
    trio.run(repl.on_gossip, "peer", message(first))
    more = [signed(filler, f"g{i}", clock_ms, i).to_wire() for i in range(3)]
    assert repl.validate_gossip("peer", message(more)) is IGNORE  # past it
    counts.clear()
    fresh = signed(accomplice, "a", clock_ms, 1).to_wire()
    assert repl.validate_gossip("peer", message([*more, fresh])) is IGNORE
    assert counts == Counter({"gossip:rate_limited": 3}), counts
    # the accomplice's entry alone is taken
    assert repl.validate_gossip("peer", message([fresh])) is ACCEPT
