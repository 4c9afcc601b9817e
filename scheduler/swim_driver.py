"""Runs SWIM cores (`scheduler.swim`) on the `p2p.network` seam.

One request/response protocol (`SWIM_PROTOCOL`) serves every cluster this node belongs to;
each message names its cluster. A Ping, PingReq or Gossip travels as a request and its Ack or
Nack comes back as the response: a Ping's and a Gossip's at once, a PingReq's once the relay's
own ping of the target is answered or its nack timer runs out. Everything else the core asks
for is sent as a request of its own (bounded by the timeout the core gives), whose response
goes back into the core.

Time is trio's clock (`trio.current_time()`: monotonic, and virtual under a MockClock, which
is the in-memory network's clock): the core is called with it, and one timer task per cluster
sleeps until the core's `next_deadline()`.

Messages that do not decode, name a cluster this node does not run, or come from a peer that
is not a member are refused, counted in `stats` (and the core's) and answered with an empty
response; they never reach a core or stop the driver.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache

import trio
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2p import identity
from p2p.network import NetworkError, Requests
from scheduler import swim_wire as wire
from scheduler.swim import Effect, Send, StateChanged, Swim, SwimSettings

SWIM_PROTOCOL = "/gridmesh/swim/1.0.0"
# how long a relay's answer to a PingReq may be awaited beyond the core's own nack timer
REPLY_GRACE_S = 1.0


@lru_cache(maxsize=4096)
def _public_key(peer_id: str) -> Ed25519PublicKey | None:
    try:
        return Ed25519PublicKey.from_public_bytes(identity.public_key_from_peer_id(peer_id))
    except (identity.IdentityError, ValueError):
        return None


@lru_cache(maxsize=8192)
def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """`p2p.identity.verify`, with the peer's decoded key and the answers cached: every core
    of this process (one per cluster, or a whole simulated cluster) checks the same alive
    claims and accusations, and an answer never changes."""
    key = _public_key(peer_id)
    if key is None:
        return False
    try:
        key.verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


def new_core(
    ident: identity.NodeIdentity,
    cluster: str,
    settings: SwimSettings,
    members: Iterable[str],
    *,
    rng: random.Random | None = None,
) -> Swim:
    """A core for this node in `cluster`, to run with `SwimDriver.run`. Its incarnation
    starts at this node's wall clock in milliseconds: above any incarnation of an earlier
    life of this node (one refutation per millisecond would be needed to catch up), so a
    restarted node need not store it. It is only ever compared with this node's own
    incarnations, never with another node's clock."""
    return Swim(
        ident.peer_id,
        cluster,
        settings,
        sign=ident.sign,
        verify=verify,
        incarnation=max(1, time.time_ns() // 1_000_000),
        now=trio.current_time(),
        members=members,
        rng=rng,
    )


@dataclass
class _Cluster:
    core: Swim
    on_change: Callable[[StateChanged], None]
    nursery: trio.Nursery
    timer: trio.CancelScope | None = None
    # PingReqs being relayed: (requester, seq) -> where the answer goes
    waiting: dict[tuple[str, int], trio.MemorySendChannel[wire.Message]] = field(
        default_factory=dict
    )


class SwimDriver:
    """The SWIM protocol handler of one node and the timers of its clusters' cores."""

    def __init__(self, net: Requests, *, protocol: str = SWIM_PROTOCOL) -> None:
        self.net = net
        self.protocol = protocol
        self.stats: Counter[str] = Counter()
        self._clusters: dict[str, _Cluster] = {}
        net.set_request_handler(protocol, self._on_request)

    def core(self, cluster: str) -> Swim | None:
        entry = self._clusters.get(cluster)
        return None if entry is None else entry.core

    async def run(
        self,
        core: Swim,
        on_change: Callable[[StateChanged], None] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Drive `core` until cancelled; `on_change` hears every member state change."""
        if core.cluster in self._clusters:
            raise ValueError(f"cluster {core.cluster!r} is already driven")
        async with trio.open_nursery() as nursery:
            entry = _Cluster(core, on_change or (lambda change: None), nursery)
            self._clusters[core.cluster] = entry
            try:
                task_status.started()
                while True:
                    with trio.CancelScope(deadline=core.next_deadline()) as timer:
                        entry.timer = timer
                        await trio.sleep_forever()
                    entry.timer = None
                    self._dispatch(entry, core.on_tick(trio.current_time()))
            finally:
                if self._clusters.get(core.cluster) is entry:
                    del self._clusters[core.cluster]
                nursery.cancel_scope.cancel()

    # -- effects -------------------------------------------------------------------------

    def _dispatch(
        self, entry: _Cluster, effects: list[Effect], reply_to: tuple[str, int] | None = None
    ) -> wire.Message | None:
        """Carry out a core's effects; returns the reply to `reply_to` if among them."""
        reply = None
        for effect in effects:
            if isinstance(effect, StateChanged):
                entry.on_change(effect)
                continue
            message = effect.message
            if isinstance(message, wire.REPLIES):
                key = (effect.to, message.seq)
                if key == reply_to and reply is None:
                    reply = message
                elif key in entry.waiting:
                    entry.waiting.pop(key).send_nowait(message)
                else:
                    self.stats["late_replies"] += 1
            else:
                entry.nursery.start_soon(self._request, entry, effect)
        if entry.timer is not None:
            entry.timer.deadline = entry.core.next_deadline()
        return reply

    async def _request(self, entry: _Cluster, send: Send) -> None:
        self.stats["sent"] += 1
        try:
            raw = await self.net.request(
                send.to, self.protocol, wire.encode(send.message), timeout_s=send.timeout_s
            )
        except NetworkError:
            self.stats["unanswered"] += 1
            return  # the core's own timers handle a probe that was not answered
        if not raw:
            self.stats["refused_by_peer"] += 1
            return
        try:
            message = wire.decode(raw)
        except wire.WireError as exc:
            self.stats[f"refused_reply_{exc.reason}"] += 1
            return
        if not isinstance(message, wire.REPLIES) or message.seq != send.message.seq:
            self.stats["refused_reply_unexpected"] += 1
            return
        if self._clusters.get(entry.core.cluster) is not entry:
            return  # this cluster stopped meanwhile
        self._dispatch(entry, entry.core.on_message(send.to, message, trio.current_time()))

    # -- requests ------------------------------------------------------------------------

    async def _on_request(self, sender: str, payload: bytes) -> bytes:
        try:
            message = wire.decode(payload)
        except wire.WireError as exc:
            self.stats[f"refused_{exc.reason}"] += 1
            return b""
        if not isinstance(message, wire.REQUESTS):
            self.stats["refused_not_a_request"] += 1
            return b""
        entry = self._clusters.get(message.cluster)
        if entry is None:
            self.stats["refused_unknown_cluster"] += 1
            return b""
        core = entry.core
        if sender not in core.members:
            self.stats["refused_non_member"] += 1
            core.stats["refused_non_member"] += 1
            return b""
        key = (sender, message.seq)
        reply = self._dispatch(entry, core.on_message(sender, message, trio.current_time()), key)
        if reply is None and isinstance(message, wire.PingReq) and core.relaying(*key):
            send, receive = trio.open_memory_channel[wire.Message](1)
            entry.waiting[key] = send
            limit = core.scaled(core.settings.probe_timeout_s) + REPLY_GRACE_S
            try:
                with trio.move_on_after(limit):
                    reply = await receive.receive()
            finally:  # the asker may give up first (its request cancelled)
                if entry.waiting.get(key) is send:
                    del entry.waiting[key]
        if reply is None:
            return b""
        return wire.encode(reply)
