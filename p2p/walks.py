"""Meeting nodes beyond the ones a node knows: sweeps and walks of the DHT.

A node's routing table holds O(K log N) peers (k-buckets). To meet the others, `Walker` walks
the DHT (`Network.dht_find_peers`, an iterative Kademlia FIND_NODE) toward chosen targets:
each walk returns the (at most) K nodes closest to its target.

- A sweep walks toward one target in each of the 2**b subtrees of the key space (the nodes
  whose DHT ids share the same first b bits), b chosen so that a subtree holds about K/2 of
  the nodes this node knows of (N is unknown; what it knows is the estimate). A walk returns
  every node of its subtree when the subtree holds at most K, so one sweep meets about every
  node in about 2N/K walks; random targets would need about (N/K) ln N (the coupon
  collector: 350 instead of 100 walks at N = 1,000). A target is hashed by every transport
  (py-libp2p and the in-memory network alike place it at sha256(target)), so a target in a
  subtree is found by hashing counters (`sweep_targets`). A sweep that met enough new nodes
  to call for a finer one is followed by it at once, as is one called for by nodes that
  made themselves known since (a node that joined early knew few); else one sweep every
  `sweep_interval_s`.
- Between sweeps, one walk toward a random target every `interval_s`: a bucket refresh that
  also meets newcomers (who also make themselves known: their own walks and their record's
  puts reach many nodes).

Walks run one at a time, so a node's work is at most one walk in flight, and a sweep is at
most 2 * max_peers / K walks (410 with the defaults).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import math
import random
from collections.abc import Callable

import trio

from p2p.network import Network

log = logging.getLogger(__name__)

K = 20  # Kademlia's K (py-libp2p's and the in-memory network's): a walk returns at most this
MAX_SWEEP_BITS = 16
BETWEEN_WALKS_S = 0.01  # a pause between the walks of a sweep: never a busy loop


@functools.lru_cache(maxsize=MAX_SWEEP_BITS + 1)
def sweep_targets(bits: int) -> tuple[bytes, ...]:
    """One walk target in each of the 2**bits subtrees, in subtree order: target j hashes
    (sha256) to an id whose first `bits` bits are j."""
    if not 0 <= bits <= MAX_SWEEP_BITS:
        raise ValueError(f"a sweep has 0..{MAX_SWEEP_BITS} bits, not {bits}")
    targets: list[bytes | None] = [None] * (1 << bits)
    missing, counter = 1 << bits, 0
    while missing:
        target = b"sweep" + counter.to_bytes(8, "big")
        subtree = int.from_bytes(hashlib.sha256(target).digest()[:4], "big") >> (32 - bits)
        if targets[subtree] is None:
            targets[subtree] = target
            missing -= 1
        counter += 1
    return tuple(t for t in targets if t is not None)


def sweep_bits(nodes: int, max_nodes: int) -> int:
    """Subtree bits for a sweep of a network of about `nodes` nodes (at most `max_nodes`
    counted): about K/2 nodes per subtree."""
    wanted = 2 * min(max(nodes, 1), max_nodes) / K
    return min(MAX_SWEEP_BITS, max(1, math.ceil(math.log2(max(wanted, 2)))))


class Walker:
    """Walks the DHT; `met` holds the nodes its walks returned, and when (the network's
    clock). `view()` is how many nodes the node knows of in all (the estimate of N);
    `on_new(nodes)` is called after a walk met `nodes`, not met before nor in `known()`."""

    def __init__(
        self,
        net: Network,
        *,
        timeout_s: float,
        interval_s: float,
        sweep_interval_s: float,
        max_nodes: int,
        known: Callable[[str], bool],
        view: Callable[[], int],
        on_new: Callable[[list[str]], None],
    ) -> None:
        self._net = net
        self._self_id = net.peer_id
        self._timeout_s = timeout_s
        self._interval_s = interval_s
        self._sweep_interval_s = sweep_interval_s
        self._max_nodes = max_nodes
        self._known = known
        self._view = view
        self._on_new = on_new
        self._rng = random.Random()
        self.met: dict[str, float] = {}
        self.walks = 0
        self.walk_failures = 0  # walks that returned nobody (timed out, failed, alone)
        self.sweeps = 0

    async def walk_once(self, target: bytes | None = None) -> int:
        """Walk toward `target` (random if None); how many nodes it met that were unknown."""
        if target is None:
            target = self._rng.getrandbits(256).to_bytes(32, "big")
        self.walks += 1
        found: list[str] = []
        with trio.move_on_after(self._timeout_s):
            try:
                found = await self._net.dht_find_peers(target)
            except Exception as exc:  # a walk is retried later; nothing depends on one
                log.debug("a DHT walk failed: %r", exc)
        if not found:
            self.walk_failures += 1
        now = self._net.now()
        new: list[str] = []
        for peer_id in found[: 2 * K]:  # more than K would be a transport's bug: bounded
            if not isinstance(peer_id, str) or peer_id == self._self_id or len(peer_id) > 128:
                continue
            if peer_id not in self.met and not self._known(peer_id):
                new.append(peer_id)
            self.met[peer_id] = now
        if new:
            self._on_new(new)
        return len(new)

    async def sweep(self, bits: int) -> int:
        """One sweep of 2**bits walks (see the module); how many unknown nodes it met."""
        self.sweeps += 1
        targets = list(sweep_targets(bits))
        start = self._rng.randrange(len(targets))  # nodes sweep from different places
        new = 0
        for target in targets[start:] + targets[:start]:
            new += await self.walk_once(target)
            await trio.sleep(BETWEEN_WALKS_S)
        return new

    async def run(self) -> None:
        """Sweep whenever what this node knows of calls for a finer sweep than the last one
        (at once after a sweep that met many, within `interval_s` after others made
        themselves known), and every `sweep_interval_s`; between sweeps, walk toward a
        random target every `interval_s`."""
        swept_bits, next_sweep = 0, -math.inf
        while True:
            bits = sweep_bits(self._view(), self._max_nodes)
            if bits > swept_bits or trio.current_time() >= next_sweep:
                await self.sweep(bits)
                swept_bits, next_sweep = bits, trio.current_time() + self._sweep_interval_s
                continue
            await trio.sleep(self._interval_s)
            await self.walk_once()

    def forget(self, older_than: float, keep: Callable[[str], bool]) -> None:
        """Drop nodes last met before `older_than` unless `keep(node)`."""
        self.met = {p: t for p, t in self.met.items() if t >= older_than or keep(p)}

    def drop(self, peer_id: str) -> None:
        self.met.pop(peer_id, None)
