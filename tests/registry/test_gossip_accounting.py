"""Every bad gossip message a hostile peer gets onto the wire is counted by the target, with a
reason: real libp2p hosts in one process (127.0.0.1), the target running the registry's
Replicator, the hostile peer publishing on the registry topic as any peer can.

Where gossip is dropped, and who counts it:
- the sender's own py-libp2p drops a publish when its outbound queue to a peer (32 RPCs) is
  full; such a message never reaches the target, which cannot count it (the test counts those
  drops on the hostile side, and the target's count must equal what actually left);
- the target's host: over the size limit (`pubsub`/`too_large`), over the forwarder's rate
  (`rate_limited`), a bad pubsub signature (`bad_signature`), py-libp2p's other refusals
  (`refused`), a full subscription queue (`queue_full`); a message id seen before (py-libp2p's
  dedup) is not counted: every message arrives once per mesh link, so that is no attack;
- the registry (`gossip`): a message that does not decode, once per message; a message that
  decodes, once per refused entry in it.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from collections.abc import Callable

import libp2p.pubsub.gossipsub as gossipsub_module
import libp2p.pubsub.pubsub as pubsub_module
import trio

from p2p import codec, identity
from registry.entry import sign_entry
from registry.hlc import Timestamp
from registry.replica import Replica
from registry.replication import ReplicationSettings, Replicator, topic_for
from tests.registry.real_hosts import unbanning_host

NET = "accounting"
TOPIC = topic_for(NET)
MAX_GOSSIP = 64 * 1024


def _gossip(rejects: Counter[str]) -> int:
    return sum(n for label, n in rejects.items() if label.split(":")[0] in ("pubsub", "gossip"))


async def _until(condition, limit_s: float, what: str) -> None:
    with trio.fail_after(limit_s):
        while not condition():  # noqa: ASYNC110 - real sockets: poll the counters
            await trio.sleep(0.02)
    assert condition(), what


def _counter(rejects: Counter[str]) -> Callable[[str, str], None]:
    return lambda source, reason: rejects.update([f"{source}:{reason}"])


async def test_every_bad_gossip_message_that_leaves_a_hostile_peer_is_counted(monkeypatch):
    sent_drops: Counter[str] = Counter()  # publishes the hostile's own py-libp2p dropped

    def counting(original):
        def drop_rpc(peer_id, rpc) -> None:
            sent_drops[str(peer_id)] += len(rpc.publish)
            original(peer_id, rpc)

        return drop_rpc

    monkeypatch.setattr(pubsub_module, "drop_rpc", counting(pubsub_module.drop_rpc))
    monkeypatch.setattr(gossipsub_module, "drop_rpc", counting(gossipsub_module.drop_rpc))

    target_ident, mallory = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()
    target_rejects: Counter[str] = Counter()
    hostile_rejects: Counter[str] = Counter()
    target, hostile = (  # a ban would stop the count half way: this test is about counting
        unbanning_host(target_ident, NET, _counter(target_rejects), max_gossip_bytes=MAX_GOSSIP),
        unbanning_host(mallory, NET, _counter(hostile_rejects), max_gossip_bytes=MAX_GOSSIP),
    )

    def count(source: str, reason: str) -> None:
        target_rejects.update([f"{source}:{reason}"])

    now_ms = int(time.time() * 1000)
    forged = sign_entry(
        mallory,
        kind="components",
        key="forged",
        value={"name": "f", "version": "1"},
        ts=Timestamp(now_ms, 0),
        created=Timestamp(now_ms, 0),
        owner=mallory.peer_id,
    ).to_wire()
    forged["sig"] = bytes(64)

    async def publish_one(i: int) -> None:
        kind = i % 6
        if kind == 0:
            data = os.urandom(64 + i)  # not msgpack, or not a map
        elif kind == 1:
            data = codec.encode({"v": 99, "entries": [], "n": i})
        elif kind == 2:
            data = codec.encode({"v": 1, "entries": "not a list", "n": i})
        elif kind == 3:
            data = codec.encode({"v": 1, "entries": [{**forged, "key": f"forged-{i}"}]})
        elif kind == 4:
            data = os.urandom(MAX_GOSSIP + 1024)  # over the target's gossip size limit
        else:
            hostile.pubsub.strict_signing = False  # published unsigned
            try:
                await hostile.publish(TOPIC, b"unsigned %d" % i)
            finally:
                hostile.pubsub.strict_signing = True
            return
        await hostile.publish(TOPIC, data)

    async with target.run(), hostile.run():
        replica = Replica(target_ident, on_reject=count)
        replicator = Replicator(target, replica, ReplicationSettings(NET), on_reject=count)
        await replicator.start()

        async def ignore(sender: str, data: bytes) -> None:
            pass

        await hostile.subscribe(TOPIC, ignore)
        await hostile.connect(target.listen_addrs()[0])
        with trio.fail_after(15):  # until the mesh carries the hostile's gossip
            while not _gossip(target_rejects):
                await hostile.publish(TOPIC, codec.encode({"v": 99}))
                await trio.sleep(0.2)
        await _until(lambda: target_rejects["gossip:bad_version"] >= 1, 5, "the warm-up")
        before, before_drops = Counter(target_rejects), sent_drops.total()

        sent = 0
        for burst in range(10):  # bursts of 24 back to back, as a flood would send them
            for i in range(24):
                await publish_one(burst * 24 + i)
                sent += 1
            left = sent - (sent_drops.total() - before_drops)
            await _until(
                lambda left=left: _gossip(target_rejects - before) >= left,
                20,
                "the target counting every message that left the hostile peer",
            )
        counted = target_rejects - before
        left = sent - (sent_drops.total() - before_drops)
        assert left > sent // 2, (sent, left)  # most went out: this tests the target
        assert _gossip(counted) == left, (sent, left, counted)
        # each kind of bad message, with its reason
        for label in (
            "gossip:malformed",
            "gossip:bad_version",
            "gossip:bad_signature",
            "pubsub:too_large",
            "pubsub:bad_signature",
        ):
            assert counted[label] >= 1, counted
        assert replica.entries == {}
