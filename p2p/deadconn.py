"""Connections that went dark: drop them so that the next request dials afresh.

A partition (a cable pulled, a bridge port moved, a NAT entry gone) leaves TCP connections
open but black-holed: nothing sent on them arrives and no error comes back. py-libp2p keeps
opening streams on such a connection, so every request to that peer waits for its timeout,
and after the path heals TCP resends only on its retransmission backoff, seconds later
(measured: 5 real daemons cut 4 s apart went on failing requests for 6 s after the heal,
while a fresh dial succeeds at once). So when a request times out, the peer is pinged (a
stream of its own on the same connection, answered by libp2p itself, so a slow handler of
ours does not fail it); a peer that answers neither that nor a second ping a second later has
its connections closed. One check per peer at a time.

A peer we hear from during the check is not dark, whatever its pings do: `heard(peer)` is
called whenever a frame of it arrives (a request of its own, an answer to ours). On a
saturated machine a live peer's pings can go unanswered for seconds (CI, 2 cores, five
daemons loading torch at once) while its other traffic still flows; dropping its connections
then reset a long-lived stream on them (a forwarded `cluster_deploy`), which is worse than
waiting for one more timeout.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any

import trio

log = logging.getLogger(__name__)

# pings, PING_GAP_S apart, that must all go unanswered: on a saturated machine (load 7 on 2
# cores) one ping of a live peer failed now and then, and dropping its connection reset every
# stream on it, which made more requests time out
PINGS = 2
PING_GAP_S = 1.0
MAX_HEARD = 4096  # peers whose last frame is remembered (least recently heard forgotten)


class DeadConnections:
    """`suspect(peer)` after a request to it timed out; `ping(peer)` raises if the peer
    does not answer in time, `drop(peer)` closes its connections."""

    def __init__(
        self,
        ping: Callable[[str], Awaitable[Any]],
        drop: Callable[[str], Awaitable[None]],
    ) -> None:
        self._ping = ping
        self._drop = drop
        self._checking: set[str] = set()
        # peer -> when a frame of it last arrived (the event loop's clock), most recent last
        self._heard: OrderedDict[str, float] = OrderedDict()
        self.checks = 0  # pings after a timed-out request
        self.dropped = 0  # peers whose connections were closed as dark
        self.spared = 0  # peers that missed every ping but were heard from meanwhile
        self.frozen = 0  # peers disconnected as frozen by p2p.peers.track_peers

    async def drop_frozen(self, peer_id: str) -> None:
        """Close the connections of a peer that answers no pings for long (track_peers)."""
        self.frozen += 1
        await self._drop(peer_id)

    def heard(self, peer_id: str) -> None:
        """A frame of `peer_id` arrived: its connection is not dark now."""
        self._heard[peer_id] = trio.current_time()
        self._heard.move_to_end(peer_id)
        if len(self._heard) > MAX_HEARD:
            self._heard.popitem(last=False)

    def heard_at(self, peer_id: str) -> float | None:
        """When (the event loop's clock) a frame of `peer_id` last arrived, if one did."""
        return self._heard.get(peer_id)

    def suspect(self, peer_id: str, nursery: trio.Nursery | None) -> None:
        if nursery is None or peer_id in self._checking:
            return
        self._checking.add(peer_id)
        nursery.start_soon(self._check, peer_id)

    async def _check(self, peer_id: str) -> None:
        self.checks += 1
        started = trio.current_time()
        try:
            for attempt in range(PINGS):
                if attempt:
                    await trio.sleep(PING_GAP_S)
                try:
                    await self._ping(peer_id)
                    return  # alive: the request was slow, not the connection dead
                except Exception:  # a timeout, a reset, no route: all mean no answer
                    pass
            if self._heard.get(peer_id, -1.0) >= started:
                self.spared += 1  # busy, not dark: its frames arrive
                return
            self.dropped += 1
            log.info("peer %s answers neither a request nor a ping: reconnecting", peer_id)
            await self._drop(peer_id)
        finally:
            self._checking.discard(peer_id)
