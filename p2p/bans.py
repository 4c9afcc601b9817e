"""Peers that keep breaking the host's limits are disconnected and refused for a while.

A rate limit alone still lets a flooding peer cost its target the work of every message it
refuses: a stream's protocol negotiation, a frame's decryption, a gossip message's parse. At
1,000 refused streams a second that is most of a core of Python (bench/abuse.py measured honest
`nodes_find` p99 at 11-44x its baseline during DHT and stream floods). So each refusal for
abuse (a stream or DHT message over the peer's rate limit, a gossip message with a bad
signature) is a strike; a peer with
more than `ban_strikes` within about `ban_window_s` is banned for `ban_s`: its connections are
closed, new ones are closed as soon as its identity is known, and its streams are reset unread.
Honest peers never come near: they stay under the rate limits, so they collect no strikes.
Gossip over a rate or size limit is no strike: an honest forwarder relays its whole mesh's
rate (one busy writer would get every forwarder banned), and may run with larger limits.
Slower misbehaviour (invalid or stale records, refused gossip) lowers the peer's score
(p2p.scoring, `penalize`); a peer whose score falls below its threshold is banned the same way.
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict
from collections.abc import Callable

from p2p.limits import RateLimiter
from p2p.scoring import PeerScores


class PeerBans:
    """Strikes per peer (a token bucket: `strikes` of burst, refilled over `window_s`) and the
    peers banned until a deadline. `on_ban(peer)` is called once per ban."""

    def __init__(
        self,
        strikes: int,
        window_s: float,
        ban_s: float,
        max_peers: int,
        on_ban: Callable[[str], None],
        clock: Callable[[], float] = time.monotonic,
        *,
        score_threshold: float = -100.0,
        score_half_life_s: float = 30.0,
        own: str | None = None,
    ) -> None:
        """`own`: this node's peer id, never struck, penalized or banned (a copy of our own
        message relayed back, refused, must not ban us from ourselves)."""
        self._own = own
        self._strikes = RateLimiter(strikes / window_s, strikes, max_peers, clock)
        self.scores = PeerScores(score_threshold, score_half_life_s, max_peers, self._on_low, clock)
        self.low_score_bans = 0  # bans for a score below the threshold
        self._ban_s = ban_s
        self._max_peers = max_peers
        self._on_ban = on_ban
        self._clock = clock
        self._until: OrderedDict[str, float] = OrderedDict()
        self.bans = 0  # bans so far
        self.last_why = ""  # what the latest ban was for (PeerBans.why)
        # per peer, what its strikes and penalties were for (the ban's log line says why)
        self._why: OrderedDict[str, Counter[str]] = OrderedDict()

    def strike(self, peer: str, reason: str = "other") -> None:
        """One refusal for abuse; the strike over the limit bans the peer (`ban_s` 0: never)."""
        if self._ban_s <= 0 or peer == self._own or self.is_banned(peer):
            return
        self._note(peer, f"strike: {reason}")
        if not self._strikes.allow(peer):
            self.ban(peer)

    def penalize(self, peer: str, reason: str, events: int = 1) -> None:
        """`events` events of `reason` (p2p.scoring.PENALTIES) against `peer`'s score; below
        the threshold it is banned (`ban_s` 0: never)."""
        if self._ban_s <= 0 or peer == self._own or self.is_banned(peer):
            return
        self._note(peer, reason)
        self.scores.penalize(peer, reason, events)

    def _note(self, peer: str, reason: str) -> None:
        counts = self._why.pop(peer, None) or Counter()
        if len(counts) < 32 or reason in counts:
            counts[reason] += 1
        self._why[peer] = counts
        while len(self._why) > self._max_peers:
            self._why.popitem(last=False)

    def why(self, peer: str) -> str:
        """What was held against `peer` since its last ban, most frequent first."""
        counts = self._why.get(peer) or Counter()
        return ", ".join(f"{reason} x{n}" for reason, n in counts.most_common(5)) or "nothing"

    def _on_low(self, peer: str, score: float) -> None:
        self.low_score_bans += 1
        self.ban(peer)

    def ban(self, peer: str) -> None:
        if peer == self._own:
            return
        self.last_why = self.why(peer)  # for on_ban to tell
        self._why.pop(peer, None)
        self._until.pop(peer, None)
        self._until[peer] = self._clock() + self._ban_s
        while len(self._until) > self._max_peers:
            self._until.popitem(last=False)
        self.bans += 1
        self._on_ban(peer)

    def is_banned(self, peer: str) -> bool:
        until = self._until.get(peer)
        if until is None:
            return False
        if self._clock() < until:
            return True
        del self._until[peer]
        return False

    def banned(self) -> list[str]:
        """The peers banned now."""
        return [peer for peer in list(self._until) if self.is_banned(peer)]
