"""The one-shot attacks: `garbage` (random bytes on every protocol the target advertises,
forged DHT records) and `registry` (forged entries, garbage gossip, malformed sync requests)."""

from __future__ import annotations

import os

import trio
from libp2p.peer.id import ID

from daemon.tools.hostile_peer.peer import BASELINE_PROTOCOLS, hostile_network, poll
from p2p import codec, records
from registry.entry import Entry, entry_from_wire, sign_entry
from registry.hlc import Timestamp
from registry.replication import SYNC_PROTOCOL, WIRE_VERSION, topic_for


async def garbage(target_addr: str, network_id: str) -> None:
    net = hostile_network(network_id)
    me = net._ident
    async with net.run():
        target = await net.connect(target_addr)
        target_id = ID.from_base58(target)
        store = net.host.get_peerstore()
        protocols = await poll(lambda: [str(p) for p in store.get_protocols(target_id)], 5)
        for protocol in sorted(set(protocols) | set(BASELINE_PROTOCOLS)):
            try:
                with trio.move_on_after(3):
                    stream = await net.host.new_stream(target_id, [protocol])
                    await stream.write(os.urandom(64 * 1024))
                    await stream.close()
            except Exception as exc:
                print(f"{protocol}: {type(exc).__name__}")
        now = net.now()
        good = records.make_record(
            me, network_id=network_id, now=now, valid_for=60.0, addrs=[], resources={}
        )
        tampered = codec.decode(good)
        tampered["body"]["resources"] = {"gpus": [{"name": "H100"}] * 8}
        stale = records.make_record(
            me, network_id=network_id, now=now - 600, valid_for=60.0, addrs=[], resources={}
        )
        own_key = records.record_key(network_id, me.peer_id)
        forgeries = [
            (own_key, codec.encode(tampered)),
            (records.record_key(network_id, target), good),
            (own_key, stale),
            (own_key, os.urandom(300)),
        ]
        for key, value in forgeries:
            try:
                await net.dht_put(key, value)
            except Exception as exc:
                print(f"put: {type(exc).__name__}")
        print("done", protocols)


async def registry(target_addrs: str, network_id: str, kind: str, key: str) -> None:
    """Forgeries against every target of `target_addrs` (comma-separated multiaddrs): each
    is dialled and must have grafted us into its gossip mesh before anything is published,
    so that every one of them is attacked directly (none relies on another forwarding)."""
    net = hostile_network(network_id)
    me = net._ident
    topic = topic_for(network_id)
    async with net.run():

        async def ignore(sender: str, data: bytes) -> None:
            pass

        await net.subscribe(topic, ignore)
        targets = [await net.connect(addr) for addr in target_addrs.split(",")]
        pull = {"v": WIRE_VERSION, "op": "pull", "ids": [[kind, key]]}
        pulled = codec.decode(await net.request(targets[0], SYNC_PROTOCOL, codec.encode(pull)))
        real = entry_from_wire(pulled["entries"][0])
        usurp = sign_entry(
            me,
            kind=kind,
            key=key,
            value={**(real.value or {}), "version": "hijacked"},
            ts=Timestamp(real.ts.wall_ms + 1, 0),
            created=real.created,
            owner=real.owner,
        )
        tampered = Entry(**{**real.__dict__, "value": {**(real.value or {}), "version": "x"}})
        forged = [usurp.to_wire(), tampered.to_wire()]
        # publish once every target's gossip mesh includes us (GossipSub heartbeat is 1 s)
        ids = {ID.from_base58(t) for t in targets}
        if not await poll(lambda: ids <= set(net.gossipsub.mesh.get(topic, ())), 20):
            meshed = set(net.gossipsub.mesh.get(topic, ()))
            raise SystemExit(f"not grafted within 20 s by {sorted(map(str, ids - meshed))}")
        for _ in range(3):
            await net.publish(topic, codec.encode({"v": WIRE_VERSION, "entries": forged}))
            await net.publish(topic, os.urandom(512))
        for target in targets:
            for message in (
                {"v": WIRE_VERSION, "op": "push", "entries": forged},
                {"v": WIRE_VERSION, "op": "digests", "digests": {"blocks": ["x"]}},
                {"v": 99, "op": "digests"},
            ):
                request = codec.encode(message)
                reply = codec.decode(await net.request(target, SYNC_PROTOCOL, request))
                print("sync reply", reply)
            try:
                await net.request(target, SYNC_PROTOCOL, os.urandom(300))
            except Exception as exc:
                print("garbage sync", type(exc).__name__)
        print("done")
