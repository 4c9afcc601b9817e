"""Pings over libp2p that do not fail because another ping is under way.

py-libp2p's `PingService.ping` keeps one outbound stream per peer and shares it between
callers; a second ping to a peer while the first is in flight raised (0.8.1:
`stream.is_closed()` on a bool attribute), and a ping cancelled at its deadline left its
half-used stream behind for the next one. Liveness, peer tracking and the dead-connection
check all ping, so on a busy node their pings overlapped and an idle, healthy peer missed
"3 pings in a row" and was taken for gone every few tens of seconds (bench/abuse.py's
baseline). Here every ping is one fresh stream (the spec's exchange: 32 random bytes echoed),
reset on any failure or cancellation, and the pings to one peer take turns: a caller that
waited while another's ping was answered takes that answer instead of sending its own.
The responder stays py-libp2p's (`/ipfs/ping/1.0.0`, at most 2 streams per peer).
"""

from __future__ import annotations

import secrets
import time
from contextlib import suppress
from typing import Any

import trio
from libp2p.host.ping import ID as PING_PROTOCOL
from libp2p.io.utils import read_exactly
from libp2p.peer.id import ID

PING_LENGTH = 32


class PingMismatch(Exception):
    """The peer echoed something other than what was sent."""


class Pinger:
    """`ping(peer)`: the round trip in milliseconds; raises on no (or a wrong) answer.

    The caller bounds the wait (`trio.fail_after`); a cancelled ping resets its stream."""

    def __init__(self, host: Any) -> None:
        self._host = host
        self._turns: dict[ID, trio.Lock] = {}  # peers with a ping under way or waiting
        self._answered: dict[ID, tuple[float, float]] = {}  # peer -> (when, rtt ms)

    async def ping(self, peer_id: ID) -> float:
        asked = trio.current_time()
        turn = self._turns.setdefault(peer_id, trio.Lock())
        try:
            async with turn:
                answered = self._answered.get(peer_id)
                if answered is not None and answered[0] >= asked:
                    return answered[1]  # answered while we waited: alive, as of now
                rtt_ms = await self._once(peer_id)
                self._answered[peer_id] = (trio.current_time(), rtt_ms)
                return rtt_ms
        finally:
            if not turn.locked() and turn.statistics().tasks_waiting == 0:
                self._turns.pop(peer_id, None)  # nobody else: forget the peer
                self._answered.pop(peer_id, None)

    async def _once(self, peer_id: ID) -> float:
        stream = await self._host.new_stream(peer_id, [PING_PROTOCOL])
        try:
            payload = secrets.token_bytes(PING_LENGTH)
            started = time.perf_counter()
            await stream.write(payload)
            echoed = await read_exactly(stream, PING_LENGTH)
            rtt_ms = (time.perf_counter() - started) * 1000
            if echoed != payload:
                raise PingMismatch(f"sent {payload.hex()}, got {echoed.hex()}")
        except BaseException:
            # (the connection may be gone already)
            with trio.CancelScope(shield=True), trio.move_on_after(1), suppress(Exception):
                await stream.reset()
            raise
        # done: half-close, so that the responder sees the end and lets its stream go
        with trio.move_on_after(1), suppress(Exception):
            await stream.close()
        return rtt_ms
