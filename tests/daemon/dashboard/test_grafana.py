"""configs/grafana: every metric the board's panels query is one a daemon exports, read from
a whole in-memory daemon's own /metrics text (its collectors included), and the board and the
scrape example are well formed."""

from __future__ import annotations

import json
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from daemon.config import REPO_CONFIGS
from tests.daemon.harness import inline_threads, memory_cluster

BOARD = REPO_CONFIGS / "grafana" / "gridmesh.json"
SCRAPE = REPO_CONFIGS / "grafana" / "prometheus.yml"
SUFFIXES = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
METRIC = re.compile(r"\bgridmesh_[a-z0-9_]+")


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


def exported(text: str) -> set[str]:
    """Every series name the text can hold: a family with no sample yet counts too."""
    names = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names.update(family.name + s for s in SUFFIXES.get(family.type, []))
        names.update(s.name for s in family.samples)
    return names


def queried(board: dict) -> dict[str, set[str]]:
    """Panel title -> the metric names its queries use."""
    out: dict[str, set[str]] = {}
    for panel in board["panels"]:
        if panel["type"] == "row":
            continue
        exprs = [t["expr"] for t in panel["targets"]]
        assert exprs and all(exprs), panel["title"]
        out[panel["title"]] = {m for e in exprs for m in METRIC.findall(e)}
    return out


GROUPING = re.compile(r"\b(?:by|without) \(([^)]*)\)")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"")
ANY_SERIES = {"instance", "job", "le", "quantile"}  # set by Prometheus or by the histogram


def labels_used(expr: str) -> set[tuple[str, str]]:
    """(metric, label) for each label a query groups by or matches on: those of a `by (...)`
    apply to each metric in the expression, a matcher to the metric it follows."""
    used = set()
    grouped = {x.strip() for g in GROUPING.findall(expr) for x in g.split(",") if x.strip()}
    for name in set(METRIC.findall(expr)):
        used |= {(name, label) for label in grouped}
    for name, matchers in re.findall(r"(gridmesh_[a-z0-9_]+)\{([^}]*)\}", expr):
        used |= {(name, label) for label in MATCHER.findall(matchers)}
    return {(n, label) for n, label in used if label not in ANY_SERIES}


def label_names(registry, text: str) -> dict[str, set[str]]:
    """Series name -> its label names: declared by the daemon's own metrics (even before a
    sample), or seen on a sample of a collector's family."""
    out: dict[str, set[str]] = {}
    for collector, names in registry._collector_to_names.items():
        declared = getattr(collector, "_labelnames", None)
        for name in names if declared is not None else ():
            out[name] = set(declared)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, set()).update(sample.labels)
    return out


async def test_the_panels_query_metrics_the_daemon_exports(autojump_clock, tmp_path):
    board = json.loads(BOARD.read_text())
    panels = queried(board)
    assert len(panels) >= 20 and all(panels.values())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "instance"}
    for panel in board["panels"]:
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"])
        for target in panel.get("targets", []):
            assert target["datasource"]["uid"] == "${datasource}"
    async with memory_cluster(tmp_path, 1) as net:
        daemon = net.daemons[0].daemon
        # a cluster of one, elected: the cluster collectors' series show their labels
        await net.daemons[0].call("cluster_create", {"name": "lab", "admission": "open"})

        async def elected() -> bool:
            return daemon.clusters.coordinator("lab")[0] is not None

        await net.wait_for(elected, 60, "the cluster of one to elect itself")
        names = exported(daemon.metrics.render().decode())
        declared = label_names(daemon.metrics.registry, daemon.metrics.render().decode())
    assert len(names) > 40  # the daemon's own metrics and its collectors' families
    unknown = {title: used - names for title, used in panels.items() if used - names}
    assert unknown == {}, f"panels query metrics no daemon exports: {unknown}"
    # the labels a query groups or filters by are labels of the metric it names (a wrong one
    # silently merges every series, or shows none)
    wrong = {}
    for panel in board["panels"]:
        for target in panel.get("targets", []):
            for name, label in labels_used(target["expr"]):
                if name in declared and label not in declared[name]:
                    wrong.setdefault(panel["title"], set()).add((name, label))
    assert wrong == {}, f"panels use labels their metrics do not have: {wrong}"
    checked = {
        n for p in board["panels"] for t in p.get("targets", []) for n in METRIC.findall(t["expr"])
    }
    # all but the shard servers' (no model here) and a few refusal counters' are checked
    assert len(checked & set(declared)) >= 35, sorted(checked - set(declared))
    # the topics the board is for: requests, tokens, latencies, batches, cache, gossip drops,
    # elections, registry replication, settlements, generations' failovers
    used = set().union(*panels.values())
    for needed in [
        "gridmesh_rpc_requests_total",
        "gridmesh_serving_tokens_total",
        "gridmesh_serving_time_to_first_token_seconds_bucket",
        "gridmesh_shard_batch_size_bucket",
        "gridmesh_shard_kv_cache_used_bytes",
        "gridmesh_rejected_messages_total",
        "gridmesh_cluster_elections_started_total",
        "gridmesh_registry_entries_total",
        "gridmesh_registry_sync_rounds_total",
        "gridmesh_registry_sync_failures_total",
        "gridmesh_registry_replication_events_total",
        "gridmesh_settlements_total",
        "gridmesh_settled_amount_total",
        "gridmesh_generations_total",
        "gridmesh_generation_failovers_total",
    ]:
        assert needed in used, needed


def test_the_scrape_example_targets_the_metrics_path():
    yaml = pytest.importorskip("yaml")
    (job,) = yaml.safe_load(SCRAPE.read_text())["scrape_configs"]
    assert job["job_name"] == "gridmesh" and job["metrics_path"] == "/metrics"
    (targets,) = job["static_configs"]
    assert all(re.fullmatch(r"127\.0\.0\.1:\d+", t) for t in targets["targets"])


def test_a_misnamed_metric_is_caught():
    """The check itself: a name the daemon does not export is reported."""
    text = "# TYPE gridmesh_x counter\ngridmesh_x_total 1\n# TYPE gridmesh_h histogram\n"
    names = exported(text)
    assert {"gridmesh_x_total", "gridmesh_h_bucket", "gridmesh_h_sum"} <= names
    board = {
        "panels": [
            {
                "type": "timeseries",
                "title": "t",
                "targets": [{"expr": "rate(gridmesh_y_total[5m])"}],
            }
        ]
    }
    assert queried(board)["t"] - names == {"gridmesh_y_total"}
    expr = 'sum by (model, le) (rate(gridmesh_x_total{instance=~"$i", route="a"}[5m]))'
    assert labels_used(expr) == {("gridmesh_x_total", "model"), ("gridmesh_x_total", "route")}
