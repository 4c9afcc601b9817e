"""A hostile peer, run as its own process by test_procs: connects to a daemon, then sends
random bytes on every protocol the daemon advertises and stores forged DHT records at it.

usage: python garbage_peer.py FULL_MULTIADDR
"""

from __future__ import annotations

import os
import sys

import trio

from p2p import codec, identity, records
from p2p.host import Libp2pNetwork, quiet_libp2p_logs

BASELINE_PROTOCOLS = ["/ipfs/kad/1.0.0", "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"]


class AcceptAnything:
    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


async def main(target_addr: str) -> None:
    quiet_libp2p_logs()
    me = identity.NodeIdentity.generate()
    network_id = sys.argv[2] if len(sys.argv) > 2 else "proctest"
    net = Libp2pNetwork(
        me,
        network_id=network_id,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=AcceptAnything(),
        dht_timeout_s=5,
    )
    async with net.run():
        target = await net.connect(target_addr)
        from libp2p.peer.id import ID

        target_id = ID.from_base58(target)
        protocols: list[str] = []
        with trio.move_on_after(5):
            while not protocols:
                try:
                    protocols = [str(p) for p in net.host.get_peerstore().get_protocols(target_id)]
                except Exception:
                    protocols = []
                await trio.sleep(0.05)
        for protocol in sorted(set(protocols) | set(BASELINE_PROTOCOLS)):
            try:
                with trio.move_on_after(3):
                    stream = await net.host.new_stream(target_id, [protocol])
                    await stream.write(os.urandom(64 * 1024))
                    await stream.close()
            except Exception as exc:
                print(f"{protocol}: {type(exc).__name__}")
        # forged records: tampered body, wrong key, stale, and plain garbage
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


if __name__ == "__main__":
    trio.run(main, sys.argv[1])
