"""Each peer's application score: what it sent that an honest node would not, decaying.

Rate limits and strikes (p2p.bans) catch floods; some misbehaviour is slow and still costly:
records with forged signatures, gossip that fails our validators, stale records replayed.
Each such event lowers the sender's score by its weight (`PENALTIES`); the score recovers
toward 0 with a half-life of `half_life_s`, so an honest peer's rare stale copy (records
expire in transit) never adds up, while a peer that keeps sending invalid data crosses
`threshold` within a few dozen messages and is then disconnected and refused for the
back-off period (`PeerBans.ban`). The same score is gossipsub's application-specific score
(P6): below the graylist threshold py-libp2p ignores the peer's gossip control messages.
"""

from __future__ import annotations

import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

from libp2p.pubsub.score import ScoreParams

# how much one event lowers the sender's score
PENALTIES: dict[str, float] = {
    "bad_signature": 10.0,  # forged or corrupted: only a hostile peer sends it
    "invalid_record": 10.0,  # someone else's key, another network, garbage
    # gossip our validators refuse (from its signing origin), a frame that does not decode:
    # a newer minor version's message may be refused too, so it takes two hundred within a
    # half-life (a flood of them meets the rate limits and strikes first)
    "malformed": 0.5,
    # an expired or future record: honest peers send one now and then (a copy expiring in
    # transit, a clock off by seconds), so it takes a thousand at once to reach the threshold
    "stale": 0.1,
    # a stream or DHT message over its rate limit (honest peers stay far below): a hundred
    # within a half-life bans, even where strikes are set out of reach
    "rate_limited": 1.0,
    # a tenth of a second a peer already read at the floor rate (p2p.inbound) was held back
    # for sending past it: throttling makes a flooder's refusals rare, this keeps it on the
    # way to its ban (10 a second: a flood pinned at the floor is banned within seconds)
    "over_budget": 1.0,
}


class PeerScores:
    """Decaying per-peer scores (at most `max_peers`, least recently penalized forgotten);
    `on_low(peer, score)` is called when a penalty takes a peer below `threshold`."""

    def __init__(
        self,
        threshold: float,
        half_life_s: float,
        max_peers: int,
        on_low: Callable[[str, float], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threshold >= 0 or half_life_s <= 0:
            raise ValueError("the threshold must be below 0 and the half-life above 0")
        self.threshold = threshold
        self._decay = math.log(2) / half_life_s
        self._max = max_peers
        self._on_low = on_low
        self._clock = clock
        self._scores: OrderedDict[str, tuple[float, float]] = OrderedDict()  # score, when
        self.penalties = 0  # events counted
        self.by_reason: Counter[str] = Counter()  # events counted, by reason (/metrics)
        self.lows = 0  # times a peer fell below the threshold

    def score(self, peer: str) -> float:
        """The peer's score now (0: nothing held against it; negative: penalized)."""
        value, when = self._scores.get(peer, (0.0, 0.0))
        if not value:
            return 0.0
        return value * math.exp(-self._decay * max(0.0, self._clock() - when))

    def penalize(self, peer: str, reason: str, events: int = 1) -> float:
        """Lower `peer`'s score for `events` events of `reason` (KeyError for an unknown
        reason); its new score. Falling below the threshold calls `on_low` once, and starts
        the peer again from 0 (its ban is the back-off)."""
        value = self.score(peer) - PENALTIES[reason] * events
        self.penalties += events
        self.by_reason[reason] += events
        self._scores.pop(peer, None)
        if value < self.threshold:
            self.lows += 1
            self._on_low(peer, value)
            return value
        self._scores[peer] = (value, self._clock())
        while len(self._scores) > self._max:
            self._scores.popitem(last=False)
        return value

    def current(self) -> list[float]:
        """The score now of every peer something is held against (at most `max_peers`)."""
        return [self.score(peer) for peer in self._scores]

    def lowest(self, count: int = 10) -> list[tuple[str, float]]:
        """The `count` lowest-scored peers now, lowest first (for node_peers and /metrics)."""
        scored = [(peer, self.score(peer)) for peer in self._scores]
        return sorted(scored, key=lambda item: item[1])[:count]


def gossipsub_params(scores: PeerScores) -> ScoreParams:
    """py-libp2p's gossipsub score parameters with our score as the application score (P6):
    a peer half way to its ban is graylisted (its gossip control messages ignored) and no
    longer gossiped to. Every other component keeps py-libp2p's default (weight 0)."""

    def app_score(peer: Any) -> float:
        return scores.score(peer.to_base58())

    return ScoreParams(
        app_specific_score_fn=app_score,
        p6_appl_slack_weight=1.0,
        gossip_threshold=scores.threshold / 2,
        graylist_threshold=scores.threshold / 2,
    )
