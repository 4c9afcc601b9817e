"""Resource discovery over the DHT: publish our signed record, find everyone else's.

Sans-IO in the sense of DESIGN.md: it only talks to a `Network`, so the same code runs over
libp2p in the daemon and over `p2p.memnet` in simulations on trio's virtual clock.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import trio

from p2p import identity, records
from p2p.network import Network

log = logging.getLogger(__name__)

# (reason) -> None; the daemon counts these in /metrics
RejectHook = Callable[[str], None]
# () -> (listen addrs, resources) as they are now
Describe = Callable[[], tuple[list[str], dict[str, Any]]]


@dataclass(frozen=True)
class DiscoverySettings:
    network_id: str
    record_validity_s: float = 90.0
    publish_interval_s: float = 30.0
    max_clock_skew_s: float = 10.0
    dht_timeout_s: float = 5.0
    max_parallel_gets: int = 16
    find_timeout_s: float = 1.0
    # a peer whose last look-up found no record (or did not finish) gets only this long in
    # find() until `absent_retry_s` have passed: a record-less or silent peer (a hostile one
    # answering no DHT queries) must not make every find() wait `find_timeout_s`
    absent_lookup_s: float = 0.05
    absent_retry_s: float = 30.0


class RecordValidator:
    """The DHT validator for our namespace: every node runs it on every value it stores."""

    def __init__(
        self, settings: DiscoverySettings, now: Callable[[], float], on_reject: RejectHook
    ) -> None:
        self._settings = settings
        self._now = now
        self._on_reject = on_reject

    def validate(self, key: str, value: bytes) -> None:
        try:
            records.validate_record(
                key,
                value,
                now=self._now(),
                network_id=self._settings.network_id,
                max_skew=self._settings.max_clock_skew_s,
            )
        except records.RecordError as exc:
            if exc.reason != "stale":  # expired copies are normal traffic, not an attack
                self._on_reject(exc.reason)
            raise

    def select(self, key: str, values: list[bytes]) -> int:
        return records.select_newest(values)


class ResourceDirectory:
    def __init__(
        self,
        net: Network,
        ident: identity.NodeIdentity,
        settings: DiscoverySettings,
        describe: Describe,
        on_reject: RejectHook | None = None,
    ) -> None:
        self._net = net
        self._ident = ident
        self._settings = settings
        self._describe = describe
        self._on_reject = on_reject or (lambda reason: None)
        self.validator = RecordValidator(settings, net.now, self._on_reject)
        self._cache: dict[str, records.ResourceRecord] = {}
        self._absent: dict[str, float] = {}  # peer id -> when to look it up in full again
        self.published = 0
        self.publish_failures = 0

    def key_for(self, peer_id: str) -> str:
        return records.record_key(self._settings.network_id, peer_id)

    def make_own_record(self) -> bytes:
        addrs, resources = self._describe()
        return records.make_record(
            self._ident,
            network_id=self._settings.network_id,
            now=self._net.now(),
            valid_for=self._settings.record_validity_s,
            addrs=addrs,
            resources=resources,
        )

    async def publish_once(self) -> bool:
        """Put our record; True when the put finished within the deadline."""
        value = self.make_own_record()
        with trio.move_on_after(self._settings.dht_timeout_s):
            try:
                await self._net.dht_put(self.key_for(self._ident.peer_id), value)
            except Exception as exc:  # a failed put is retried at the next interval
                log.debug("publishing resource record failed: %r", exc)
                self.publish_failures += 1
                return False
            self.published += 1
            return True
        self.publish_failures += 1
        return False

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Publish now and then every `publish_interval_s`, well before the record expires."""
        await self.publish_once()
        task_status.started()
        while True:
            await trio.sleep(self._settings.publish_interval_s)
            await self.publish_once()

    async def lookup(self, peer_id: str) -> records.ResourceRecord | None:
        """Fetch and verify one node's record; None if absent, invalid, expired or too slow."""
        key = self.key_for(peer_id)
        value: bytes | None = None
        with trio.move_on_after(self._settings.dht_timeout_s):
            try:
                value = await self._net.dht_get(key)
            except Exception as exc:
                log.debug("DHT get for %s failed: %r", peer_id, exc)
        if value is None:
            return None
        try:
            record = records.validate_record(
                key,
                value,
                now=self._net.now(),
                network_id=self._settings.network_id,
                max_skew=self._settings.max_clock_skew_s,
            )
        except records.RecordError as exc:
            if exc.reason != "stale":  # stale copies in local stores are expected, not hostile
                self._on_reject(exc.reason)
            return None
        return record if record.peer_id == peer_id else None

    async def find(
        self, predicate: Callable[[records.ResourceRecord], bool] | None = None
    ) -> list[records.ResourceRecord]:
        """Valid records of this node and every node it knows, filtered, sorted by peer id.

        Look-ups run in parallel for at most `find_timeout_s`: one slow or frozen peer must not
        stall the answer. A peer whose look-up is still running then is answered from the last
        record we verified for it, as long as that record has not expired.
        """
        candidates = sorted(self._net.known_peers() | {self._ident.peer_id})
        limiter = trio.CapacityLimiter(self._settings.max_parallel_gets)
        started = self._net.now()
        self._absent = {p: t for p, t in self._absent.items() if t > started}

        async def one(peer_id: str) -> None:
            absent = peer_id in self._absent and peer_id != self._ident.peer_id
            if not absent:  # until its look-up succeeds
                self._absent[peer_id] = started + self._settings.absent_retry_s
            limit = self._settings.absent_lookup_s if absent else math.inf
            record = None
            with trio.move_on_after(limit):
                async with limiter:
                    record = await self.lookup(peer_id)
            if record is not None:
                self._cache[peer_id] = record
                self._absent.pop(peer_id, None)

        with trio.move_on_after(self._settings.find_timeout_s):
            async with trio.open_nursery() as nursery:
                for peer_id in candidates:
                    nursery.start_soon(one, peer_id)
        now = self._net.now()
        for peer_id, record in list(self._cache.items()):
            if record.expires_at < now:
                del self._cache[peer_id]
        matching = [r for r in self._cache.values() if predicate is None or predicate(r)]
        return sorted(matching, key=lambda r: r.peer_id)
