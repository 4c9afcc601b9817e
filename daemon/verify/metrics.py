"""The verifier's numbers as Prometheus metrics, read at each scrape: register
`VerifyCollector(verifier)` on the daemon's registry (daemon.node does, with [verify] on)."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from daemon.verify.verifier import Verifier


class VerifyCollector:
    """Checks by outcome, replica steps, canaries and exclusions (`Verifier.counters`: the
    code's own names, a bounded set), and the providers known by standing."""

    def __init__(self, verifier: Verifier) -> None:
        self.verifier = verifier

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration

    def collect(self) -> Iterator[Metric]:
        events = CounterMetricFamily(
            "gridmesh_verify_events",
            "Spot-check events of this requester: checks_<outcome>, compare_<how>, "
            "replica_steps, checks_skipped, canaries_sent, exclusions, ...",
            labels=["event"],
        )
        for name, count in sorted(self.verifier.counters.items()):
            events.add_metric([name], count)
        yield events
        standing = GaugeMetricFamily(
            "gridmesh_verify_providers",
            "Providers this requester knows, by standing (probation, good, excluded)",
            labels=["standing"],
        )
        counts = {"probation": 0, "good": 0, "excluded": 0}
        try:
            providers = self.verifier.to_json()["providers"]
        except RuntimeError:  # scraped outside trio: the verifier's clock is trio's
            providers = {}
        for record in providers.values():
            state = record.get("state")
            if state in counts:
                counts[state] += 1
        for state, count in counts.items():
            standing.add_metric([state], count)
        yield standing
