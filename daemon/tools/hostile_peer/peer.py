"""The hostile peer itself: a libp2p network that accepts any DHT record, connected to one
target only, and `Flood`, what every flood family shares (its bounds, counts, parallel
senders, reconnecting). The families are the modules beside this one."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import trio
import trio.lowlevel
from libp2p.peer.id import ID

from p2p import identity, records
from p2p.host import Libp2pNetwork
from registry.replication import topic_for

BASELINE_PROTOCOLS = ["/ipfs/kad/1.0.0", "/ipfs/id/1.0.0", "/ipfs/ping/1.0.0"]
OUTBOUND_QUEUED = 2  # gossip messages queued to the target before a paced flood waits


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
    fill_pushers: int = 2  # parallel sync pushes of the fill (0: it gossips only)
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

    async def outbound_room(self, queued: int = OUTBOUND_QUEUED) -> None:
        """Wait until our gossip queue to the target holds fewer than `queued` messages, as
        an attacker who wants its flood read paces it: what py-libp2p's queue cannot take it
        drops, and signing entries only for them to be dropped starved our own event loop
        (session 15: the target read ~13 MB of 830 MB made; our pongs went unanswered and
        the target cut us off as gone, so the fill landed nothing)."""
        queues = self.net.gossipsub.pubsub.peer_queues if self.net.gossipsub.pubsub else {}
        while True:  # (polled: py-libp2p's queue tells no one when it empties)
            queue = queues.get(self.target_id)
            if queue is None or len(queue) < queued:
                return
            await trio.sleep(0.005)

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
        _gossip_to(net, target_id)
        store = net.host.get_peerstore()  # identify tells the target's protocols
        await poll(lambda: store.get_protocols(target_id), 10)
        if gossip:  # publish once the target grafted us (GossipSub heartbeat is 1 s)
            await poll(lambda: target_id in net.gossipsub.mesh.get(topic, ()), 10)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_target_only, net, target)
            yield net, me, target
            nursery.cancel_scope.cancel()


def _gossip_to(net: Libp2pNetwork, target: ID) -> None:
    """Our gossip (publishes, IWANT answers, control) goes to the target alone. Honest nodes
    that learn our address dial us, and until `_target_only` hangs up on them (up to 0.2 s,
    again at every redial) our router sends them what it sends the target: in one abuse
    bench run (session 15) the node beside the target read 8.5 MB of the fill from us, as
    much as half of what the target read, so the flood's rows measured two targets."""
    router = net.gossipsub
    send, flush, recent = (
        router.send_rpc,
        router.flush_pending_messages,
        router.send_recent_messages,
    )

    def send_rpc(peer_id: ID, rpc: Any, priority: bool = False) -> None:
        if peer_id == target:
            send(peer_id, rpc, priority)

    async def flush_pending_messages(peer_id: ID) -> None:
        if peer_id == target:
            await flush(peer_id)

    async def send_recent_messages(peer_id: ID, topic: str) -> None:
        if peer_id == target:  # (a new peer is sent the recent messages at once)
            await recent(peer_id, topic)

    router.send_rpc = send_rpc  # type: ignore[method-assign]
    router.flush_pending_messages = flush_pending_messages  # type: ignore[method-assign]
    router.send_recent_messages = send_recent_messages  # type: ignore[method-assign]


async def _target_only(net: Libp2pNetwork, target: str) -> None:
    """Hang up on every peer but the target (the DHT may dial peers the target names): the
    flood is the target's to handle, not its neighbours'."""
    while True:
        for peer in net.connected_peers() - {target}:
            with suppress(Exception):
                await net.host.disconnect(ID.from_base58(peer))
        await trio.sleep(0.2)
