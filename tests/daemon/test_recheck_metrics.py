"""A gone peer's rechecks and its being forgotten (p2p.liveness) reach /metrics
(daemon.net_metrics), read from the liveness at each scrape."""

from __future__ import annotations

from types import SimpleNamespace

from daemon.net_metrics import NetworkCollector


def _events(liveness: object) -> dict[str, float]:
    collector = NetworkCollector(SimpleNamespace(peers={}), liveness)
    (family,) = [m for m in collector.collect() if m.name == "gridmesh_liveness_events"]
    return {s.labels["event"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_rechecks_and_forgotten_peers_are_exported() -> None:
    liveness = SimpleNamespace(
        lost=dict, lost_total=2, revived_total=0, rounds_spared=0, heard_spared=0,
        rechecks_total=7, forgotten_total=1,
    )  # fmt: skip
    events = _events(liveness)
    assert events["recheck"] == 7 and events["forgotten"] == 1 and events["gone"] == 2
