"""A hostile peer for fault tests and manual chaos: run it against a live daemon.

    python -m daemon.tools.hostile_peer garbage TARGET_MULTIADDR NETWORK_ID
        random bytes on every protocol the target advertises, and forged DHT records
    python -m daemon.tools.hostile_peer registry TARGET_MULTIADDR NETWORK_ID KIND KEY
        forged registry entries (someone else's entry, tampered signature), random bytes on
        the registry topic, and malformed sync requests
    python -m daemon.tools.hostile_peer flood KIND TARGET_MULTIADDR NETWORK_ID [--seconds S]
        one flood at the highest rate this process manages, for S seconds (default 10),
        bounded in count as well; KIND is one of
        badsig   registry gossip whose entries carry bad signatures (64 per message)
        gossip   garbage on the registry topic: random bytes and malformed structures
        dht      forged DHT puts (tampered, stale, foreign, oversized records) to the target
        streams  many streams held open on every protocol the target advertises, with churn,
                 and idle TCP connections that never finish the handshake
        frames   huge never-finished frames and floods of garbage frames on every framed
                 gridmesh protocol, and shard sessions opened up to the target's limits
        fill     a registry fill by one author: many valid, maximum-size entries (sync push
                 and gossip)
        idle     (a control) connected, sending nothing
        With --announce the hostile peer first puts a valid record of its own on the target,
        as an ordinary peer does. Other options bound the flood (see FloodLimits).
        It prints one line of counts, then `RESULT {json}` for scripts (bench/abuse.py).

Every attack must be rejected and counted by the target, which keeps serving. The flood
talks only to the target: it dials nothing else (the DHT puts go to the target alone).
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import random
import re
import struct
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any

import multiaddr
import trio
import trio.lowlevel
from libp2p.peer.id import ID

from p2p import codec, identity, records
from p2p.host import Libp2pNetwork, quiet_libp2p_logs
from registry.entry import Entry, entry_from_wire, sign_entry
from registry.hlc import Timestamp
from registry.replication import SYNC_PROTOCOL, WIRE_VERSION, topic_for

BASELINE_PROTOCOLS = ["/ipfs/kad/1.0.0", "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"]


class AcceptAnything:
    """A DHT validator that lets us put forged records (the target's validator must not)."""

    def validate(self, key: str, value: bytes) -> None:
        pass

    def select(self, key: str, values: list[bytes]) -> int:
        return len(values) - 1


async def poll(condition: Callable[[], Any], timeout_s: float) -> Any:
    """The condition's first truthy value within `timeout_s`, else its last value."""
    with trio.move_on_after(timeout_s):
        while not (result := condition()):  # noqa: ASYNC110 - libp2p state has no event
            await trio.sleep(0.05)
        return result
    return condition()


def hostile_network(network_id: str, ident: identity.NodeIdentity | None = None) -> Libp2pNetwork:
    return Libp2pNetwork(
        ident or identity.NodeIdentity.generate(),
        network_id=network_id,
        listen=["/ip4/127.0.0.1/tcp/0"],
        dht_namespace=records.NAMESPACE,
        dht_validator=AcceptAnything(),
        dht_timeout_s=5,
    )


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


async def registry(target_addr: str, network_id: str, kind: str, key: str) -> None:
    net = hostile_network(network_id)
    me = net._ident
    topic = topic_for(network_id)
    async with net.run():

        async def ignore(sender: str, data: bytes) -> None:
            pass

        await net.subscribe(topic, ignore)
        target = await net.connect(target_addr)
        pull = {"v": WIRE_VERSION, "op": "pull", "ids": [[kind, key]]}
        pulled = codec.decode(await net.request(target, SYNC_PROTOCOL, codec.encode(pull)))
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
        # publish once the gossip mesh includes us (GossipSub heartbeat is 1 s)
        await poll(lambda: net.gossipsub.mesh.get(topic), 10)
        for _ in range(3):
            await net.publish(topic, codec.encode({"v": WIRE_VERSION, "entries": forged}))
            await net.publish(topic, os.urandom(512))
        for message in (
            {"v": WIRE_VERSION, "op": "push", "entries": forged},
            {"v": WIRE_VERSION, "op": "digests", "digests": {"blocks": ["x"]}},
            {"v": 99, "op": "digests"},
        ):
            reply = codec.decode(await net.request(target, SYNC_PROTOCOL, codec.encode(message)))
            print("sync reply", reply)
        try:
            await net.request(target, SYNC_PROTOCOL, os.urandom(300))
        except Exception as exc:
            print("garbage sync", type(exc).__name__)
        print("done")


# ----------------------------------------------------------------------------------- floods

FLOODS = ("badsig", "gossip", "dht", "streams", "frames", "fill")
IDLE = "idle"  # the control: connected, sending nothing
SHARD_PROTOCOL = "/gridmesh/shard/1.0.0"  # daemon.shards.SHARD_PROTOCOL (that imports torch)
_LEN = struct.Struct(">I")
GOSSIP_ENTRIES = 64  # registry.replication.MAX_GOSSIP_ENTRIES: a message the target must open
FILL_STRINGS = 15  # 15 strings of 4,000 characters: just under the 64 KiB value limit


@dataclass
class FloodStats:
    """What one flood did. `refused`: the target said no, reset or closed; `accepted`: the
    target took it (a DHT put stored, a registry entry applied, a session opened); `failed`:
    it failed on our side or timed out; `bytes`: payload bytes sent."""

    kind: str
    sent: int = 0
    refused: int = 0
    accepted: int = 0
    failed: int = 0
    bytes: int = 0
    seconds: float = 0.0

    def line(self) -> str:
        return (
            f"flood {self.kind}: {self.sent} sent, {self.refused} refused, {self.accepted} "
            f"accepted, {self.failed} failed, {self.bytes / 1e6:.1f} MB in {self.seconds:.1f} s"
        )


@dataclass(frozen=True)
class FloodLimits:
    """Bounds on a flood, so that no run can grow without limit (ours or the target's)."""

    seconds: float = 10.0
    max_messages: int = 200_000  # gossip messages, DHT puts, streams opened, frames sent
    concurrency: int = 8  # parallel senders
    max_held_streams: int = 1000  # streams held open at once (the oldest are reset beyond)
    max_idle_conns: int = 256  # raw TCP connections that never finish the handshake
    frame_mb: int = 32  # MB sent into each never-finished frame
    fill_entries: int = 2000  # registry entries of the fill (about 60 KB each)
    # stay connected this long after the flood, sending nothing, so the target gets to what
    # it has queued (a peer's unread gossip is dropped when it disconnects)
    linger_s: float = 2.0
    # first put a valid resource record of our own on the target, as an ordinary peer does
    # (without one, the target's look-ups of this silent peer are a cost of their own)
    announce: bool = False


class Flood:
    """One hostile peer connected to one target, sending one kind of flood."""

    def __init__(
        self,
        net: Libp2pNetwork,
        me: identity.NodeIdentity,
        target: str,
        target_addr: str,
        network_id: str,
        limits: FloodLimits,
        stats: FloodStats,
    ) -> None:
        self.net = net
        self.me = me
        self.target = target
        self.target_id = ID.from_base58(target)
        self.target_addr = target_addr
        self.network_id = network_id
        self.topic = topic_for(network_id)
        self.limits = limits
        self.stats = stats
        self.rng = random.Random()
        self._last_dial = -1.0
        self.exhausted = False  # a flood with a fixed supply (the fill) has sent it all

    async def reconnect(self) -> None:
        """Dial the target again if it dropped us (at most every half second), as a real
        attacker would."""
        if self.target in self.net.connected_peers():
            return
        now = trio.current_time()
        if now - self._last_dial < 0.5:
            await trio.sleep(0.05)
            return
        self._last_dial = now
        with suppress(Exception):
            await self.net.connect(self.target_addr, timeout_s=3)

    def budget(self) -> bool:
        """Whether another message may be sent."""
        return self.stats.sent < self.limits.max_messages and not self.exhausted

    async def workers(self, work: Callable[[], Awaitable[None]], n: int | None = None) -> None:
        """Run `work` in `n` parallel loops until the message budget is spent (the caller's
        deadline ends it otherwise); our own errors are counted, never raised."""

        async def loop() -> None:
            while self.budget():
                try:
                    await work()
                except trio.Cancelled:
                    raise
                except Exception:
                    self.stats.failed += 1
                    await trio.sleep(0.01)
                    await self.reconnect()
                await trio.lowlevel.checkpoint()

        async with trio.open_nursery() as nursery:
            for _ in range(n or self.limits.concurrency):
                nursery.start_soon(loop)

    async def protocols(self) -> list[str]:
        """The protocols the target advertises (identify; `connected` waited for them)."""
        store = self.net.host.get_peerstore()
        found = await poll(lambda: [str(p) for p in store.get_protocols(self.target_id)], 1)
        return sorted(set(found) | set(BASELINE_PROTOCOLS))

    async def publish(self, data: bytes) -> bool:
        """Publish on the registry topic; False if the target is not connected (then gossip
        would go to no one)."""
        if self.target not in self.net.connected_peers():
            await self.reconnect()
            return False
        self.stats.sent += 1
        self.stats.bytes += len(data)
        await self.net.publish(self.topic, data)
        return True

    async def idle(self) -> None:
        """No flood: what a connected hostile peer costs by being there."""
        await trio.sleep_forever()

    async def announce(self) -> None:
        record = records.make_record(
            self.me,
            network_id=self.network_id,
            now=self.net.now(),
            valid_for=records.MAX_VALIDITY_S,
            addrs=[],  # nobody else is to dial us: the flood goes to the target alone
            resources={},
        )
        key = records.record_key(self.network_id, self.me.peer_id).encode()
        with trio.move_on_after(5):
            await self.net.dht.value_store._store_at_peer(self.target_id, key, record)

    # -- (a) gossip with bad signatures ------------------------------------------------

    async def badsig(self) -> None:
        now_ms = int(time.time() * 1000)
        template = sign_entry(
            self.me,
            kind="components",
            key="x",
            value={"name": "forged", "version": "1"},
            ts=Timestamp(now_ms, 0),
            created=Timestamp(now_ms, 0),
            owner=self.me.peer_id,
        ).to_wire()

        async def one() -> None:
            entries = []
            for i in range(GOSSIP_ENTRIES):
                entry = dict(template)
                entry["key"] = f"forged-{self.rng.getrandbits(64):x}"
                # half claim to be the target's, half ours: both with a signature of neither
                entry["author"] = entry["owner"] = self.target if i % 2 else self.me.peer_id
                entry["sig"] = self.rng.randbytes(64)
                entries.append(entry)
            await self.publish(codec.encode({"v": WIRE_VERSION, "entries": entries}))

        await self.workers(one, 2)

    # -- (b) garbage gossip ------------------------------------------------------------

    async def gossip(self) -> None:
        malformed = [
            {"v": WIRE_VERSION, "entries": "not a list"},
            {"v": WIRE_VERSION, "entries": [{"kind": 1}] * GOSSIP_ENTRIES},
            {"v": 99, "entries": []},
            _nested(40),  # deeper than the decoder allows
            {"v": WIRE_VERSION, "entries": [None] * 5000},
        ]

        async def one() -> None:
            if self.rng.random() < 0.5:
                data = os.urandom(self.rng.choice((64, 1024, 16 * 1024, 64 * 1024)))
            else:
                data = codec.encode(self.rng.choice(malformed))
            await self.publish(data)

        await self.workers(one, 2)

    # -- (c) forged DHT puts -----------------------------------------------------------

    async def dht(self) -> None:
        now = self.net.now()
        good = records.make_record(
            self.me, network_id=self.network_id, now=now, valid_for=60.0, addrs=[], resources={}
        )
        tampered = codec.decode(good)
        tampered["body"]["resources"] = {"gpus": [{"name": "H100"}] * 8}
        stale = records.make_record(
            self.me,
            network_id=self.network_id,
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
        store = self.net.dht.value_store

        async def one() -> None:
            value = self.rng.choice(values)
            if self.rng.random() < 0.2:
                key = f"/foreign/{self.rng.getrandbits(128):x}"  # outside the namespace
            else:
                key = f"/{records.NAMESPACE}/{self.rng.getrandbits(256):064x}"
            self.stats.sent += 1
            self.stats.bytes += len(value)
            # straight to the target: a DHT put would also look up and dial its neighbours;
            # an answer that takes longer than 2 s is not waited for
            with trio.move_on_after(2) as scope:
                stored = await store._store_at_peer(self.target_id, key.encode(), value)
            if scope.cancelled_caught:
                self.stats.failed += 1
            elif stored:
                self.stats.accepted += 1
            else:
                self.stats.refused += 1

        await self.workers(one, 4 * self.limits.concurrency)

    # -- (d) stream flood ---------------------------------------------------------------

    async def streams(self) -> None:
        protocols = await self.protocols()
        held: collections.deque[Any] = collections.deque()

        async def one() -> None:
            protocol = self.rng.choice(protocols)
            self.stats.sent += 1
            try:
                with trio.fail_after(5):
                    stream = await self.net.host.new_stream(self.target_id, [protocol])
                    # a frame that never arrives: a length prefix, then nothing
                    await stream.write(_LEN.pack(1000))
                    self.stats.bytes += _LEN.size
            except trio.TooSlowError:
                self.stats.failed += 1
                return
            except Exception:
                self.stats.refused += 1
                await self.reconnect()
                return
            held.append(stream)
            while len(held) > self.limits.max_held_streams:
                old = held.popleft()
                with suppress(Exception):
                    await old.reset()

        async def idle_conns() -> None:
            host, port = _tcp_of(self.target_addr)
            # on loopback, from another address than the honest daemons' 127.0.0.1, as an
            # attacker on another host would (per-address limits must not hit honest peers)
            local = "127.0.0.2" if host == "127.0.0.1" else None
            sockets = []
            try:
                for _ in range(self.limits.max_idle_conns):
                    try:
                        with trio.fail_after(2):
                            sockets.append(
                                await trio.open_tcp_stream(host, port, local_address=local)
                            )
                    except (OSError, trio.TooSlowError):
                        self.stats.refused += 1
                await trio.sleep_forever()
            finally:
                for sock in sockets:
                    sock.socket.close()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(idle_conns)
                await self.workers(one)
                nursery.cancel_scope.cancel()
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                for stream in held:
                    with suppress(Exception):
                        await stream.reset()

    # -- (d) frame flood ----------------------------------------------------------------

    async def frames(self) -> None:
        framed = [p for p in await self.protocols() if p.startswith("/gridmesh/")]

        async def never_finished(protocol: str, max_bytes: int) -> None:
            """Announce a frame of the protocol's largest size, send part of it, stall."""
            self.stats.sent += 1
            try:
                stream = await self.net.host.new_stream(self.target_id, [protocol])
                await stream.write(_LEN.pack(max_bytes))
                chunk = os.urandom(256 * 1024)
                left = min(self.limits.frame_mb << 20, max_bytes - 1)  # never the whole frame
                while left > 0:
                    await stream.write(chunk[:left])
                    self.stats.bytes += min(left, len(chunk))
                    left -= len(chunk)
                await trio.sleep_forever()
            except trio.Cancelled:
                raise
            except Exception:
                self.stats.refused += 1

        async def never_finished_loop(protocol: str, max_bytes: int) -> None:
            while self.budget():
                await never_finished(protocol, max_bytes)
                await trio.sleep(0.05)
                await self.reconnect()

        async def garbage_frames(protocol: str) -> None:
            """Complete frames of garbage as fast as the target answers them."""
            try:
                with trio.fail_after(5):
                    stream = await self.net.host.new_stream(self.target_id, [protocol])
            except Exception:
                self.stats.refused += 1
                await trio.sleep(0.01)
                await self.reconnect()
                return

            async def drain() -> None:
                while await stream.read(65536):
                    pass

            try:
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(drain)
                    while self.budget():
                        frame = os.urandom(self.rng.choice((16, 1024, 64 * 1024)))
                        await stream.write(_LEN.pack(len(frame)) + frame)
                        self.stats.sent += 1
                        self.stats.bytes += len(frame)
                    nursery.cancel_scope.cancel()
            except trio.Cancelled:
                raise
            except Exception:
                self.stats.refused += 1  # the target reset the stream: a new one
                await trio.sleep(0.01)
                await self.reconnect()

        async def garbage_loop(protocol: str) -> None:
            while self.budget():
                await garbage_frames(protocol)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.sessions)
            for protocol in framed:
                big = (256 << 20) - 1 if protocol == SHARD_PROTOCOL else (4 << 20)
                for _ in range(4 if protocol == SHARD_PROTOCOL else 1):
                    nursery.start_soon(never_finished_loop, protocol, big)
                nursery.start_soon(garbage_loop, protocol)

    async def sessions(self) -> None:
        """Open shard sessions on the blocks the target announces, as many as it lets us."""
        try:
            raw = await self.net.dht_get(records.record_key(self.network_id, self.target))
            body = codec.open_envelope(raw or b"").body
            blocks = body.get("resources", {}).get("blocks") or []
        except Exception:
            return
        failures = 0
        for block in blocks[:4]:
            header = {
                "op": "open",
                "model": block.get("model"),
                "start": block.get("start"),
                "end": block.get("end"),
                "max_length": 1 << 20,
            }
            for _ in range(256):  # bounded: the target's session limit should stop us first
                if not self.budget():
                    return
                self.stats.sent += 1
                try:
                    with trio.fail_after(5):
                        stream = await self.net.host.new_stream(self.target_id, [SHARD_PROTOCOL])
                        packed = codec.encode(header)
                        await stream.write(
                            _LEN.pack(_LEN.size + len(packed)) + _LEN.pack(len(packed)) + packed
                        )
                        reply = await _read_shard_reply(stream)
                except Exception:
                    self.stats.failed += 1
                    failures += 1
                    if failures >= 20:  # the target keeps dropping us: the other attacks go on
                        return
                    await self.reconnect()
                    continue
                failures = 0
                if reply.get("op") == "opened":
                    self.stats.accepted += 1  # kept open (the stream) until the flood ends
                    continue
                self.stats.refused += 1
                limit = re.search(r"max_length must be 1\.\.(\d+)", str(reply.get("message")))
                if limit:
                    header["max_length"] = int(limit.group(1))
                elif "busy" in str(reply):
                    break

    # -- (e) a registry fill by one author -------------------------------------------------

    async def fill(self) -> None:
        filler = {f"b{i}": "x" * 4000 for i in range(FILL_STRINGS)}
        made = 0

        def entries(n: int) -> list[dict[str, Any]]:
            nonlocal made
            out = []
            for _ in range(min(n, self.limits.fill_entries - made)):
                made += 1
                now_ms = int(time.time() * 1000)
                key = f"fill-{self.me.peer_id[-8:]}-{made}"
                out.append(
                    sign_entry(
                        self.me,
                        kind="components",
                        key=key,
                        value={"name": key, "version": "1", "config": filler},
                        ts=Timestamp(now_ms, made),
                        created=Timestamp(now_ms, made),
                        owner=self.me.peer_id,
                    ).to_wire()
                )
            return out

        async def push() -> None:
            batch = entries(32)  # about 2 MB: under the sync protocol's 4 MiB
            if not batch:
                self.exhausted = True
                return
            payload = codec.encode({"v": WIRE_VERSION, "op": "push", "entries": batch})
            self.stats.sent += len(batch)
            self.stats.bytes += len(payload)
            reply = codec.decode(
                await self.net.request(self.target, SYNC_PROTOCOL, payload, timeout_s=10)
            )
            applied = reply.get("applied", 0) if isinstance(reply, dict) else 0
            applied = applied if isinstance(applied, int) else 0
            self.stats.accepted += applied
            self.stats.refused += len(batch) - applied

        async def gossip() -> None:
            batch = entries(8)  # about 500 KB: under the gossip limit
            if not batch:
                self.exhausted = True
                return
            if await self.publish(codec.encode({"v": WIRE_VERSION, "entries": batch})):
                self.stats.sent += len(batch) - 1  # entries, not messages

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self.workers, push, 2)
            nursery.start_soon(self.workers, gossip, 1)


def _nested(depth: int) -> list[Any]:
    out: list[Any] = []
    for _ in range(depth):
        out = [out]
    return out


async def _read_shard_reply(stream: Any) -> dict[str, Any]:
    """The header of one shard frame (`u32 frame length | u32 header length | header`)."""
    buf = b""
    while len(buf) < 2 * _LEN.size:
        chunk = await stream.read(2 * _LEN.size - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    (frame_len,) = _LEN.unpack_from(buf)
    rest = buf[_LEN.size :]
    while len(rest) < frame_len:
        chunk = await stream.read(min(frame_len - len(rest), 1 << 16))
        if not chunk:
            raise EOFError("closed")
        rest += chunk
    (header_len,) = _LEN.unpack_from(rest)
    header = codec.decode(rest[_LEN.size : _LEN.size + header_len])
    return header if isinstance(header, dict) else {}


def _tcp_of(addr: str) -> tuple[str, int]:
    maddr = multiaddr.Multiaddr(addr)
    return maddr.value_for_protocol("ip4"), int(maddr.value_for_protocol("tcp"))


@asynccontextmanager
async def connected(
    target_addr: str, network_id: str, *, gossip: bool
) -> AsyncIterator[tuple[Libp2pNetwork, identity.NodeIdentity, str]]:
    """A hostile network connected to the target only (in its gossip mesh if `gossip`)."""
    me = identity.NodeIdentity.generate()
    me.payout_address  # noqa: B018 - derived once (about 1 s of imports), not mid-flood
    net = hostile_network(network_id, me)
    topic = topic_for(network_id)
    # py-libp2p's swarm dials peers it hears of to keep a minimum of connections: not ours
    auto = getattr(net.host.get_network(), "auto_connector", None)
    if auto is not None:

        async def off(*args: Any) -> None:
            return None

        auto.start = off
        auto.run_background_task = off
    async with net.run():

        async def ignore(sender: str, data: bytes) -> None:
            pass

        await net.subscribe(topic, ignore)
        target = await net.connect(target_addr)
        target_id = ID.from_base58(target)
        store = net.host.get_peerstore()  # identify tells the target's protocols
        await poll(lambda: store.get_protocols(target_id), 10)
        if gossip:  # publish once the target grafted us (GossipSub heartbeat is 1 s)
            await poll(lambda: target_id in net.gossipsub.mesh.get(topic, ()), 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_target_only, net, target)
            yield net, me, target
            nursery.cancel_scope.cancel()


async def _target_only(net: Libp2pNetwork, target: str) -> None:
    """Hang up on every peer but the target (the DHT may dial peers the target names): the
    flood is the target's to handle, not its neighbours'."""
    while True:
        for peer in net.connected_peers() - {target}:
            with suppress(Exception):
                await net.host.disconnect(ID.from_base58(peer))
        await trio.sleep(0.2)


async def flood(
    kind: str,
    target_addr: str,
    network_id: str,
    limits: FloodLimits | None = None,
    on_start: Callable[[], None] | None = None,
) -> FloodStats:
    """Run one flood against the target for `limits.seconds` (or until its budget is spent);
    `on_start` is called once connected, when the flood begins."""
    if kind not in (IDLE, *FLOODS):
        raise ValueError(f"unknown flood {kind!r}: one of {IDLE}, {', '.join(FLOODS)}")
    limits = limits or FloodLimits()
    stats = FloodStats(kind)
    async with connected(target_addr, network_id, gossip=kind in ("badsig", "gossip", "fill")) as (
        net,
        me,
        target,
    ):
        attack = Flood(net, me, target, target_addr, network_id, limits, stats)
        if limits.announce:
            await attack.announce()
        started = trio.current_time()
        if on_start is not None:
            on_start()
        with trio.move_on_after(limits.seconds):
            await getattr(attack, kind)()
        stats.seconds = trio.current_time() - started
        await trio.sleep(limits.linger_s)
    return stats


def flood_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m daemon.tools.hostile_peer flood")
    parser.add_argument("kind", choices=(IDLE, *FLOODS))
    parser.add_argument("target")
    parser.add_argument("network_id")
    defaults = FloodLimits()
    for name, value in asdict(defaults).items():
        flag = f"--{name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, action="store_true", default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    limits = FloodLimits(**{name: getattr(args, name) for name in asdict(defaults)})
    stats = trio.run(
        flood,
        args.kind,
        args.target,
        args.network_id,
        limits,
        lambda: print(f"FLOODING {args.kind}", flush=True),
    )
    print(stats.line(), flush=True)
    print("RESULT " + json.dumps(asdict(stats)), flush=True)
    return 0


def main(argv: list[str]) -> int:
    # a flood makes py-libp2p log every refused stream at ERROR: keep only the summary
    quiet_libp2p_logs(logging.CRITICAL if argv[:1] == ["flood"] else logging.ERROR)
    if argv and argv[0] == "flood":
        return flood_main(argv[1:])
    if len(argv) == 3 and argv[0] == "garbage":
        trio.run(garbage, *argv[1:])
    elif len(argv) == 5 and argv[0] == "registry":
        trio.run(registry, *argv[1:])
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
