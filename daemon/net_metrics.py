"""The network's liveness and peer-score metrics, read from the network at each scrape
(`daemon.metrics.Metrics.watch_network`).

What is exported depends on what the network has: the peers' pings (every network), the
liveness of record holders (`p2p.liveness.Liveness`, given by discovery), and, on a libp2p
host only, peer scores and bans (`p2p.bans.PeerBans`), dark connections dropped
(`p2p.deadconn.DeadConnections`), connections open and inbound bytes held (p2p.caps,
p2p.buffers), peers the auto-connector gave up on (`p2p.peers.AutoDialBound`). Every label
value is the code's own (a bounded set).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

# a peer's application score (p2p.scoring): 0 is clean, the default ban threshold is -100
SCORE_BUCKETS = (-100.0, -75.0, -50.0, -25.0, -10.0, -5.0, -1.0, 0.0)
# Liveness counters -> the event label they are exported under
LIVENESS_EVENTS = {
    "lost_total": "gone",  # taken for gone (closed and not redialled, or pings missed)
    "revived_total": "back",  # a gone peer seen alive again
    "rounds_spared": "round_spared",  # a round whose misses were not counted (ours)
    "heard_spared": "ping_spared",  # a missed ping of a peer heard from meanwhile
    "rechecks_total": "recheck",  # a gone peer dialled again (less and less often)
    "forgotten_total": "forgotten",  # a gone peer no longer dialled (its rechecks spent)
}


class NetworkCollector:
    """Liveness, pings, scores, bans and disconnects of one node's network."""

    def __init__(self, net: Any, liveness: Any = None) -> None:
        self.net = net
        self.liveness = liveness

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only

    def collect(self) -> Iterator[Metric]:
        yield from self._pings()
        yield from self._held()
        if self.liveness is not None:
            yield from self._liveness()
        bans = getattr(self.net, "bans", None)
        if bans is not None:
            yield from _scores(bans)
        yield from self._disconnects(bans)
        yield from self._auto_dials()

    def _pings(self) -> Iterator[Metric]:
        missed = GaugeMetricFamily(
            "gridmesh_peer_missed_pings",
            "Pings missed in a row by connected peers now, summed (p2p.peers.track_peers; a "
            "peer silent for long is disconnected as frozen)",
        )
        peers = dict(getattr(self.net, "peers", {}) or {})
        missed.add_metric([], sum(getattr(p, "missed_pings", 0) for p in peers.values()))
        yield missed

    def _held(self) -> Iterator[Metric]:
        """Connections open and inbound bytes held unread (a libp2p host's caps, p2p.caps
        and p2p.buffers)."""
        host = getattr(self.net, "host", None)
        if host is not None:
            # (read here, not through p2p.caps: metrics must not import libp2p, CLI start-up)
            per_peer = [len(c) for c in dict(host.get_network().connections).values()]
            conns = GaugeMetricFamily(
                "gridmesh_connections",
                "Connections open now: in total, and to the peer holding the most",
                labels=["scope"],
            )
            conns.add_metric(["total"], sum(per_peer))
            conns.add_metric(["busiest_peer"], max(per_peer, default=0))
            yield conns
        inbound = getattr(self.net, "inbound", None)
        if inbound is not None:
            held = GaugeMetricFamily(
                "gridmesh_inbound_buffered_bytes",
                "Inbound stream bytes held unread now ([p2p] max_buffered_bytes bounds them)",
            )
            held.add_metric([], inbound.held)
            yield held

    def _liveness(self) -> Iterator[Metric]:
        gone = GaugeMetricFamily(
            "gridmesh_peers_gone",
            "Record holders taken for gone now (not listed by nodes_find until back)",
        )
        gone.add_metric([], len(self.liveness.lost()))
        events = CounterMetricFamily(
            "gridmesh_liveness_events",
            "Liveness of record holders: gone (connection closed and redial failed, or pings "
            "missed), back, round_spared (a round's misses not counted: the trouble was this "
            "node's), ping_spared (a missed ping of a peer heard from meanwhile), recheck (a "
            "gone peer dialled again, the gaps doubling), forgotten (a gone peer no longer "
            "dialled after its last recheck, until it shows itself)",
            labels=["event"],
        )
        for attr, event in LIVENESS_EVENTS.items():
            events.add_metric([event], getattr(self.liveness, attr, 0))
        yield from (gone, events)

    def _auto_dials(self) -> Iterator[Metric]:
        auto_dials = getattr(self.net, "auto_dials", None)
        if auto_dials is None:
            return
        forgotten = CounterMetricFamily(
            "gridmesh_auto_dial_forgotten",
            "Peers py-libp2p's auto-connector no longer dials: its dials failed 6 times in a row "
            "(p2p.peers.AutoDialBound; dialled again once they connect)",
        )
        forgotten.add_metric([], auto_dials.forgotten_total)
        yield forgotten

    def _disconnects(self, bans: Any) -> Iterator[Metric]:
        dark = getattr(self.net, "dark", None)
        if bans is None and dark is None:
            return
        disconnects = CounterMetricFamily(
            "gridmesh_peer_disconnects",
            "Peers this node disconnected, by reason: banned (strikes or a low score, "
            "p2p.bans), dark (answered neither a request nor two pings, p2p.deadconn), frozen "
            "(missed pings and was not heard from for 20 s, p2p.peers)",
            labels=["reason"],
        )
        if bans is not None:
            disconnects.add_metric(["banned"], bans.bans)
        if dark is not None:
            disconnects.add_metric(["dark"], dark.dropped)
            disconnects.add_metric(["frozen"], dark.frozen)
            checks = CounterMetricFamily(
                "gridmesh_dark_connection_checks",
                "Peers pinged after a request to them timed out, by outcome: alive (answered "
                "a ping), spared (missed the pings, but its frames arrived), dropped",
                labels=["outcome"],
            )
            alive = max(0, dark.checks - dark.dropped - dark.spared)
            for outcome, count in (("alive", alive), ("spared", dark.spared)):
                checks.add_metric([outcome], count)
            checks.add_metric(["dropped"], dark.dropped)
            yield checks
        yield disconnects


def _scores(bans: Any) -> Iterator[Metric]:
    scores = bans.scores
    current = scores.current()
    histogram = HistogramMetricFamily(
        "gridmesh_peer_score",
        "Application scores (p2p.scoring) of the peers something is held against, now: 0 is "
        "clean, a peer below the threshold is banned",
    )
    buckets = [(str(edge), sum(1 for s in current if s <= edge)) for edge in SCORE_BUCKETS]
    buckets.append(("+Inf", len(current)))
    histogram.add_metric([], buckets, None)  # no sum with negative buckets (Prometheus)
    lowest = GaugeMetricFamily("gridmesh_peer_score_lowest", "The lowest peer score now")
    lowest.add_metric([], min(current, default=0.0))
    penalties = CounterMetricFamily(
        "gridmesh_peer_penalties",
        "Events held against a peer's score, by reason (bad_signature, invalid_record, "
        "malformed, stale, rate_limited, over_budget)",
        labels=["reason"],
    )
    for reason, count in sorted(scores.by_reason.items()):
        penalties.add_metric([reason], count)
    banned = GaugeMetricFamily("gridmesh_peers_banned", "Peers banned now")
    banned.add_metric([], len(bans.banned()))
    total = CounterMetricFamily(
        "gridmesh_peer_bans",
        "Peers banned (disconnected and refused for ban_s), by why: strikes (refusals for "
        "abuse within the window) or low_score (below the score threshold)",
        labels=["reason"],
    )
    total.add_metric(["strikes"], max(0, bans.bans - bans.low_score_bans))
    total.add_metric(["low_score"], bans.low_score_bans)
    yield from (histogram, lowest, penalties, banned, total)
