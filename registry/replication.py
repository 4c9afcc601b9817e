"""Replication of a `Replica` over a `Network`: gossip for new entries, anti-entropy for the rest.

- Every write that changes the local replica is published on the network's registry topic;
  receivers apply it (the gossip layer never echoes a message to its sender).
- Every `sync_interval_s`, anti-entropy with one random known peer (`registry.sync`): digests
  out, listing back, then pull what the peer has better and push what we have better. This is
  how a node that was offline, partitioned or just started catches up; bulk transfer goes over
  request/response, never gossip.
- The digests and pull requests of a round are hedged: one still unanswered after a few round
  trips (`Replicator.hedge_delay`) is sent to another random peer as well, up to `sync_hedges`
  more, and the first answer wins. A lost message then costs about a round trip, not
  `sync_timeout_s`; a node that missed a write's gossip catches up in its next round even on a
  lossy network, and only requests that are slow cost extra bytes.
Malformed gossip or sync messages are dropped and counted; they never reach the replica.
"""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import trio

from p2p import codec
from p2p.network import Network, NetworkError
from registry import sync
from registry.entry import Entry, EntryError, entry_from_wire
from registry.replica import Replica

log = logging.getLogger(__name__)

SYNC_PROTOCOL = "/gridmesh/registry/sync/1.0.0"
WIRE_VERSION = 1
MAX_GOSSIP_BYTES = 512 * 1024
MAX_GOSSIP_ENTRIES = 64
MAX_SYNC_BYTES = 4 << 20


def topic_for(network_id: str) -> str:
    return f"/gridmesh/{network_id}/registry/1"


@dataclass(frozen=True)
class ReplicationSettings:
    network_id: str
    sync_interval_s: float = 1.0
    # one request of a round; a round whose requests all go unanswered this long fails, and
    # another peer is tried
    sync_timeout_s: float = 0.5
    # extra peers a round's digests or pull request may also go to while it goes unanswered
    sync_hedges: int = 2
    # the least wait before a hedge (the wait follows the measured round-trip time)
    hedge_min_s: float = 0.05
    # entries pulled by anti-entropy are gossiped on only if written this recently (older ones
    # are what a returning or new node catches up on: re-flooding them helps no one)
    reannounce_window_s: float = 5.0
    gc_interval_s: float = 60.0
    tombstone_horizon_s: float = 7 * 24 * 3600.0


class Replicator:
    def __init__(
        self,
        net: Network,
        replica: Replica,
        settings: ReplicationSettings,
        *,
        rng: random.Random | None = None,
        on_reject: Callable[[str, str], None] | None = None,
    ) -> None:
        self.net = net
        self.replica = replica
        self.settings = settings
        self.topic = topic_for(settings.network_id)
        self._rng = rng or random.Random()
        self._on_reject = on_reject or (lambda source, reason: None)
        self.stats: Counter[str] = Counter()
        # smoothed round-trip time of answered sync requests and its mean deviation (as TCP's
        # retransmission timer keeps them); None until the first answer
        self._srtt: float | None = None
        self._rttvar = 0.0

    # -- outgoing ----------------------------------------------------------------------

    async def write(self, kind: str, key: str, value: dict[str, Any] | None) -> Entry:
        """A local write: applied durably first, then gossiped. Returns once acknowledged."""
        entry = await self.replica.put(kind, key, value)
        await self.announce([entry])
        return entry

    async def announce(self, entries: Iterable[Entry]) -> None:
        batch = [e.to_wire() for e in entries]
        for start in range(0, len(batch), MAX_GOSSIP_ENTRIES):
            data = codec.encode(
                {"v": WIRE_VERSION, "entries": batch[start : start + MAX_GOSSIP_ENTRIES]}
            )
            try:
                await self.net.publish(self.topic, data)
                self.stats["gossip_sent"] += 1
            except NetworkError as exc:  # anti-entropy delivers it later
                log.debug("gossip publish failed: %s", exc)

    # -- incoming ----------------------------------------------------------------------

    def _reject(self, source: str, reason: str) -> None:
        self.stats[f"rejected_{source}"] += 1
        self._on_reject(source, reason)

    def _entries(self, raw: Any, source: str) -> list[Entry] | None:
        if not isinstance(raw, list) or len(raw) > sync.MAX_TRANSFER:
            self._reject(source, "malformed")
            return None
        out = []
        for item in raw:
            try:
                out.append(entry_from_wire(item))
            except EntryError as exc:
                self._reject(source, exc.reason)
        return out

    async def on_gossip(self, sender: str, data: bytes) -> None:
        try:
            msg = codec.decode(data, max_bytes=MAX_GOSSIP_BYTES)
        except codec.CodecError as exc:
            self._reject("gossip", exc.reason)
            return
        if not isinstance(msg, dict) or msg.get("v") != WIRE_VERSION:
            self._reject("gossip", "bad_version")
            return
        entries = self._entries(msg.get("entries"), "gossip")
        if entries:
            changed = await self.replica.apply(entries, "gossip")
            self.stats["gossip_applied"] += len(changed)

    async def on_sync(self, sender: str, payload: bytes) -> bytes:
        """Serve one anti-entropy step for a peer."""
        try:
            msg = codec.decode(payload, max_bytes=MAX_SYNC_BYTES)
            if not isinstance(msg, dict) or msg.get("v") != WIRE_VERSION:
                raise sync.SyncError("unsupported sync message version")
            op = msg.get("op")
            if op == "digests":
                theirs = sync.parse_digests(msg)
                mine = sync.digests(self.replica.entries.values())
                buckets = sync.differing_buckets(mine, theirs)
                reply: dict[str, Any] = sync.encode_listing(
                    sync.listing(self.replica.entries, buckets)
                )
            elif op == "pull":
                ids = msg.get("ids")
                if not isinstance(ids, list) or len(ids) > sync.MAX_TRANSFER:
                    raise sync.SyncError("pull ids must be a bounded list")
                found = []
                for item in ids:
                    if isinstance(item, list) and len(item) == 2:
                        entry = self.replica.entries.get((str(item[0]), str(item[1])))
                        if entry is not None:
                            found.append(entry.to_wire())
                reply = {"entries": found}
            elif op == "push":
                entries = self._entries(msg.get("entries"), "sync")
                changed = await self.replica.apply(entries or [], "sync")
                self.stats["sync_applied"] += len(changed)
                reply = {"applied": len(changed)}
            else:
                raise sync.SyncError(f"unknown sync op {str(op)[:32]!r}")
        except (codec.CodecError, sync.SyncError) as exc:
            self._reject("sync", getattr(exc, "reason", "malformed"))
            return codec.encode({"v": WIRE_VERSION, "error": str(exc)[:200]})
        reply["v"] = WIRE_VERSION
        return codec.encode(reply)

    def hedge_delay(self) -> float:
        """How long a sync request may go unanswered before it also goes to another peer: a
        few smoothed round trips (srtt + 4 * rttvar), at least `hedge_min_s`, at most half
        of `sync_timeout_s` (that half too before any request was answered)."""
        cap = self.settings.sync_timeout_s / 2
        if self._srtt is None:
            return cap
        return min(cap, max(self.settings.hedge_min_s, self._srtt + 4 * self._rttvar))

    def _observe_rtt(self, sample: float) -> None:
        if self._srtt is None:
            self._srtt, self._rttvar = sample, sample / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - sample)
            self._srtt = 0.875 * self._srtt + 0.125 * sample

    async def _call(self, peer_id: str, message: dict[str, Any]) -> dict[str, Any]:
        message["v"] = WIRE_VERSION
        sent = trio.current_time()
        try:
            with trio.fail_after(self.settings.sync_timeout_s):
                raw = await self.net.request(peer_id, SYNC_PROTOCOL, codec.encode(message))
        except trio.TooSlowError:
            raise NetworkError(f"sync {message.get('op')} to {peer_id} timed out") from None
        self._observe_rtt(trio.current_time() - sent)
        reply = codec.decode(raw, max_bytes=MAX_SYNC_BYTES)
        if not isinstance(reply, dict) or reply.get("v") != WIRE_VERSION:
            raise sync.SyncError("malformed sync reply")
        if "error" in reply:
            raise sync.SyncError(f"peer refused: {str(reply['error'])[:200]}")
        return reply

    async def _call_any(self, peers: list[str], message: dict[str, Any]) -> tuple[str, Any]:
        """`message` to `peers[0]`, then to each next peer too once no answer came within
        `hedge_delay()`, or at once when a request failed: (the first peer to answer, its
        answer); the other requests are cancelled. Raises the last error if all failed."""
        send, receive = trio.open_memory_channel[tuple[str, Any]](len(peers))

        async def attempt(peer_id: str) -> None:
            try:
                outcome: Any = await self._call(peer_id, dict(message))
            except (NetworkError, sync.SyncError, codec.CodecError) as exc:
                outcome = exc
            send.send_nowait((peer_id, outcome))

        waiting = list(peers)
        running = 0
        error: Exception = NetworkError("no peer to ask")
        async with trio.open_nursery() as nursery:
            while waiting or running:
                if waiting:
                    if running:
                        self.stats["sync_hedged"] += 1
                    nursery.start_soon(attempt, waiting.pop(0))
                    running += 1
                with trio.move_on_after(self.hedge_delay() if waiting else math.inf):
                    peer_id, outcome = await receive.receive()
                    running -= 1
                    if not isinstance(outcome, Exception):
                        nursery.cancel_scope.cancel()
                        return peer_id, outcome
                    error = outcome
        raise error

    async def sync_with(self, peer_id: str, hedges: list[str] | None = None) -> tuple[int, int]:
        """One anti-entropy round with `peer_id`: (entries pulled and applied, entries pushed).

        Its digests and pull requests are hedged to the peers in `hedges` (`_call_any`); the
        round goes on with the first peer that answers the digests."""
        hedges = [p for p in hedges or [] if p != peer_id]
        peer_id, reply = await self._call_any(
            [peer_id, *hedges], sync.encode_digests(sync.digests(self.replica.entries.values()))
        )
        pull_ids, push = sync.plan(self.replica.entries, sync.parse_listing(reply))
        applied = 0
        if pull_ids:
            # another peer that answers first may lack some: they come in a later round
            others = [p for p in hedges if p != peer_id]
            _, got = await self._call_any(
                [peer_id, *others], {"op": "pull", "ids": [list(i) for i in pull_ids]}
            )
            entries = self._entries(got.get("entries"), "sync") or []
            changed = await self.replica.apply(entries, "sync")
            applied = len(changed)
            recent_ms = self.replica.clock.now().wall_ms - self.settings.reannounce_window_s * 1000
            fresh = [e for e in changed if e.ts.wall_ms >= recent_ms]
            if fresh:  # a write that gossip missed here was likely missed elsewhere too
                await self.announce(fresh)
        if push:
            await self._call(peer_id, {"op": "push", "entries": [e.to_wire() for e in push]})
        self.stats["sync_rounds"] += 1
        return applied, len(push)

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Register the handlers; call once the network runs, before writes arrive."""
        self.net.set_request_handler(SYNC_PROTOCOL, self.on_sync)
        await self.net.subscribe(self.topic, self.on_gossip)

    async def run_anti_entropy(self) -> None:
        """One round per interval with a random peer (hedged to `sync_hedges` other random
        ones); a failed round is retried at once with other peers (a lost message must not
        cost a whole interval)."""
        failed_last = False
        while True:
            interval = self.settings.sync_interval_s
            await trio.sleep((0.05 if failed_last else interval) * (0.5 + self._rng.random()))
            peers = sorted(self.net.known_peers())
            if not peers:
                continue
            peer, *hedges = self._rng.sample(peers, min(len(peers), 1 + self.settings.sync_hedges))
            try:
                await self.sync_with(peer, hedges)
                failed_last = False
            except (NetworkError, sync.SyncError, codec.CodecError) as exc:
                self.stats["sync_failed"] += 1
                failed_last = not failed_last  # retry once quickly, then back to the interval
                log.debug("anti-entropy with %s failed: %s", peer, exc)

    async def run_gc(self) -> None:
        while True:
            await trio.sleep(self.settings.gc_interval_s)
            await self.replica.collect_garbage(int(self.settings.tombstone_horizon_s * 1000))
