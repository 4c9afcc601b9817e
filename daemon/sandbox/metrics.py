"""The sandbox pool's numbers as Prometheus metrics, read at each scrape: register
`SandboxCollector(pool.snapshot)` on the daemon's registry (daemon.metrics)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric


class SandboxCollector:
    """Calls, results, failures by kind, workers killed, crashed and started, workers by
    state, and each isolation layer (1 on, 0 off). Kinds and layer names are the code's own
    (a bounded set)."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        for name, help_text in (
            ("calls", "Policy calls made through the sandbox"),
            ("ok", "Policy calls that returned a result"),
            (
                "kills",
                "Sandbox workers killed by the pool (deadline, oversized or malformed "
                "reply, failed load)",
            ),
            ("crashes", "Sandbox workers that died by themselves (a limit, a signal)"),
            ("started", "Sandbox workers started"),
        ):
            yield CounterMetricFamily(f"gridmesh_sandbox_{name}", help_text, value=snap[name])
        failures = CounterMetricFamily(
            "gridmesh_sandbox_failures",
            "Policy calls that failed, by kind (policy_error, timeout, crashed, too_large, "
            "invalid, dependency, isolation, closed)",
            labels=["kind"],
        )
        for kind, count in sorted(snap["failures"].items()):
            failures.add_metric([kind], count)
        yield failures
        workers = GaugeMetricFamily(
            "gridmesh_sandbox_workers", "Sandbox workers by state", labels=["state"]
        )
        for state, count in snap["workers"].items():
            workers.add_metric([state], count)
        yield workers
        layers = GaugeMetricFamily(
            "gridmesh_sandbox_layer", "1 where the isolation layer is on", labels=["layer"]
        )
        for layer, state in snap["layers"].items():
            layers.add_metric([layer], 1 if state.startswith("on") else 0)
        yield layers
