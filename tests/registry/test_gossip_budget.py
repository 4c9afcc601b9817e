"""A registry fill is not relayed by gossip past its author's gossip budget: real libp2p hosts
in one process (127.0.0.1), a target and an honest neighbour running the registry's
Replicator, and the abuse bench's hostile peer (`daemon.tools.hostile_peer`, flood `fill`)
connected to the target alone, gossiping valid ~60 KB entries of one author (its sync
pushes off, as they hung unanswered in most abuse bench runs).

Why: every gossip message the target takes it relays whole on each mesh link, ahead of what
is queued behind it there. Taken at the author's rate (256 KiB/s: a ~480 KB message every
~2 s), the fill's messages held an honest write's gossip behind them for 100-250 ms on the
way to the bench's untargeted node (its `registry put->visible` p99 over 2x its baseline).
The gossip budget (`ReplicationSettings.gossip_author_bytes_per_s`, burst 512 KiB) takes one
such message; what else of the fill lands comes by anti-entropy, one pull per node.
"""

from __future__ import annotations

from collections import Counter

import trio

from daemon.tools.hostile_peer import FloodLimits, flood
from p2p import identity
from registry import wire
from registry.replica import Replica
from registry.replication import MAX_GOSSIP_BYTES, ReplicationSettings, Replicator
from tests.registry.real_hosts import unbanning_host

NET = "gossipbudget"
FILL_SECONDS = 8.0


async def _until(condition, limit_s: float, what: str) -> None:
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll the state
            await trio.sleep(0.05)
    assert condition(), what


async def test_a_fill_is_relayed_by_gossip_once_then_comes_by_anti_entropy():
    target_ident, neighbour_ident = (
        identity.NodeIdentity.generate(),
        identity.NodeIdentity.generate(),
    )
    target, neighbour = (
        unbanning_host(target_ident, NET),
        unbanning_host(neighbour_ident, NET),
    )  # the fill is valid: nothing here scores or bans it, it is read at the full rate
    # entries of each author the neighbour received by gossip (the target's relays)
    relayed: Counter[str] = Counter()
    async with target.run(), neighbour.run():
        settings = ReplicationSettings(NET)
        target_replica = Replica(target_ident)
        target_repl = Replicator(target, target_replica, settings)
        neighbour_replica = Replica(neighbour_ident)
        neighbour_repl = Replicator(neighbour, neighbour_replica, settings)
        on_gossip = neighbour_repl.on_gossip

        async def counting(sender: str, data: bytes) -> None:
            msg = wire.decode_gossip(data, MAX_GOSSIP_BYTES)
            relayed.update(item.get("author") for item in msg.entries if isinstance(item, dict))
            await on_gossip(sender, data)

        neighbour_repl.on_gossip = counting  # type: ignore[method-assign]
        await target_repl.start()
        await neighbour_repl.start()
        await neighbour.connect(target.listen_addrs()[0])
        # an honest write of the target reaches the neighbour by gossip: the mesh is up
        n = 0

        def honest_arrived() -> bool:
            return neighbour_replica.get("components", f"honest-{n}") is not None

        with trio.fail_after(20):
            while not honest_arrived():
                n += 1
                key = f"honest-{n}"
                await target_repl.write("components", key, {"name": key, "version": "1"})
                with trio.move_on_after(1.0):
                    await _until(honest_arrived, 1.0, "")
        stats = await flood(
            "fill",
            target.listen_addrs()[0],
            NET,
            # gossip alone: in the abuse bench the fill's sync pushes mostly hung unanswered
            # until their 10 s timeout (session 14's run, 6 of 9 runs in session 15): what
            # landed came by gossip
            FloodLimits(seconds=FILL_SECONDS, fill_entries=100_000, fill_pushers=0, linger_s=0.5),
        )
        filler = next(
            (e.author for e in target_replica.entries.values() if e.key.startswith("fill-")),
            None,
        )
        held = sum(1 for e in target_replica.entries.values() if e.author == filler)
        refused = target_repl.stats["gossip_refused"]
        # an honest write still goes by gossip at once
        key = "honest-after"
        await target_repl.write("components", key, {"name": key, "version": "1"})
        await _until(
            lambda: neighbour_replica.get("components", key) is not None, 5, "the honest write"
        )
    # (asserted outside the hosts: a failure inside is buried in their nurseries' groups)
    assert stats.sent > 100, stats  # the fill ran (about 60 KB an entry)
    assert filler is not None, "no fill entry landed on the target: no attack happened"
    # the target took the fill's first message (8 entries, within its author's rate) and
    # refused the rest it read (rate_limited: not relayed, not held against the sender) ...
    assert held >= 8 and refused >= 4, (held, refused, stats)
    # ... and relayed at most that one message by gossip (the gossip burst, 512 KiB), not
    # one every ~2 s at the author's rate (without the gossip budget: 16 here, the rate's
    # burst of two at once; in the bench, one more each time the rate had room for one)
    assert relayed[filler] <= 8, (relayed, held, refused)
    assert relayed[target_ident.peer_id] >= 2, relayed  # the honest writes came by gossip
