"""A gone peer's rechecks and its being forgotten (p2p.liveness, p2p.peers.AutoDialBound)
reach /metrics (daemon.net_metrics), read at each scrape."""

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


def test_peers_the_auto_connector_forgot_are_exported() -> None:
    net = SimpleNamespace(peers={}, auto_dials=SimpleNamespace(forgotten_total=3))
    (family,) = [
        m for m in NetworkCollector(net).collect() if m.name == "gridmesh_auto_dial_forgotten"
    ]
    assert [s.value for s in family.samples if s.name.endswith("_total")] == [3]
