from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from daemon import metrics as metrics_mod
from daemon.metrics import Metrics, sanitize_label

GIB = 1024**3


def samples(m: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Parse render() back, keyed by (sample name, labels)."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(m.render().decode()):
        for s in family.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(metric: str, /, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (metric, frozenset(labels.items()))


def resources(*gpus: dict[str, Any]) -> dict[str, Any]:
    return {
        "cpu": {"model": "Xeon", "cores": 16, "arch": "x86_64"},
        "memory": {"total_bytes": 64 * GIB, "available_bytes": 40 * GIB},
        "disk": {"path": "/home/n", "total_bytes": 500 * GIB, "free_bytes": 123 * GIB},
        "gpus": list(gpus),
        "gpu_driver": "550.54.15" if gpus else None,
        "gpu_error": None,
    }


def gpu(index: int, name: str, util: int | None, power: float | None) -> dict[str, Any]:
    return {
        "index": index,
        "name": name,
        "uuid": f"GPU-{index}",
        "memory_total_bytes": 80 * GIB,
        "memory_free_bytes": 70 * GIB,
        "utilization_pct": util,
        "power_w": power,
    }


def test_counters_histogram_and_peers_render():
    m = Metrics()
    m.set_peers(connected=3, known=10)
    m.observe_dht("put", "ok", 0.004)
    m.observe_dht("put", "ok", 0.2)
    m.observe_dht("get", "timeout", 10.0)
    m.record_published(True)
    m.record_published(False)
    m.records_published.labels("ok").inc()
    s = samples(m)
    assert s[key("gridmesh_peers", state="connected")] == 3
    assert s[key("gridmesh_peers", state="known")] == 10
    assert s[key("gridmesh_dht_operations_total", op="put", outcome="ok")] == 2
    assert s[key("gridmesh_dht_operations_total", op="get", outcome="timeout")] == 1
    assert s[key("gridmesh_dht_operation_seconds_count", op="put")] == 2
    assert abs(s[key("gridmesh_dht_operation_seconds_sum", op="put")] - 0.204) < 1e-9
    assert s[key("gridmesh_dht_operation_seconds_bucket", op="put", le="0.001")] == 0
    assert s[key("gridmesh_dht_operation_seconds_bucket", op="put", le="0.005")] == 1
    assert s[key("gridmesh_dht_operation_seconds_bucket", op="put", le="0.25")] == 2
    assert s[key("gridmesh_dht_operation_seconds_bucket", op="get", le="5.0")] == 0
    assert s[key("gridmesh_dht_operation_seconds_bucket", op="get", le="10.0")] == 1
    assert s[key("gridmesh_records_published_total", outcome="ok")] == 2
    assert s[key("gridmesh_records_published_total", outcome="failed")] == 1
    text = m.render().decode()
    assert 'gridmesh_peers{state="connected"} 3.0' in text
    assert "# TYPE gridmesh_dht_operation_seconds histogram" in text


def test_each_instance_has_its_own_registry():
    a, b = Metrics(), Metrics()
    a.reject("dht", "bad_signature")
    assert key("gridmesh_rejected_messages_total", source="dht", reason="bad_signature") in (
        samples(a)
    )
    assert not any(name == "gridmesh_rejected_messages_total" for name, _ in samples(b))


def test_reject_labels_are_sanitized_and_truncated():
    m = Metrics()
    m.reject("DHT", "Bad Signature!")
    m.reject("dht", "bad-signature")
    m.reject("rpc", "x" * 200)
    m.reject("", "{}")
    s = samples(m)
    assert s[key("gridmesh_rejected_messages_total", source="dht", reason="bad_signature")] == 2
    assert s[key("gridmesh_rejected_messages_total", source="rpc", reason="x" * 64)] == 1
    assert s[key("gridmesh_rejected_messages_total", source="unknown", reason="unknown")] == 1
    assert sanitize_label("Ünïcode/peer 12D3Koo") == "n_code_peer_12d3koo"


def test_reject_series_are_bounded(monkeypatch):
    monkeypatch.setattr(metrics_mod, "MAX_REJECT_SERIES", 3)
    m = Metrics()
    for i in range(10):
        m.reject("pubsub", f"reason_{i}")
    m.reject("pubsub", "reason_1")
    s = samples(m)
    rejected = {
        dict(labels)["reason"]: value
        for (name, labels), value in s.items()
        if name == "gridmesh_rejected_messages_total"
    }
    assert rejected == {"reason_0": 1, "reason_1": 2, "reason_2": 1, "other": 7}


def test_unknown_rpc_methods_are_mapped():
    m = Metrics(known_methods={"nodes_find", "node.info"})
    m.rpc_outcome("nodes_find", "ok")
    m.rpc_outcome("node.info", "error")
    m.rpc_outcome("no_such_method_" + "a" * 500, "error")
    m.rpc_outcome("../etc/passwd", "error")
    m.known_methods.add("late_method")
    m.rpc_outcome("late_method", "ok")
    s = samples(m)
    rpc = {
        (dict(labels)["method"], dict(labels)["outcome"]): value
        for (name, labels), value in s.items()
        if name == "gridmesh_rpc_requests_total"
    }
    assert rpc == {
        ("nodes_find", "ok"): 1,
        ("node.info", "error"): 1,
        ("unknown", "error"): 2,
        ("late_method", "ok"): 1,
    }


def test_set_resources_and_gpus_that_disappear():
    m = Metrics()
    m.set_resources(resources(gpu(0, "NVIDIA H100", 37, 312.5), gpu(1, "RTX 4090", None, None)))
    s = samples(m)
    assert s[key("gridmesh_cpu_cores")] == 16
    assert s[key("gridmesh_memory_total_bytes")] == 64 * GIB
    assert s[key("gridmesh_memory_available_bytes")] == 40 * GIB
    assert s[key("gridmesh_disk_free_bytes")] == 123 * GIB
    assert s[key("gridmesh_gpu_count")] == 2
    assert s[key("gridmesh_gpu_memory_total_bytes", index="0", name="NVIDIA H100")] == 80 * GIB
    assert s[key("gridmesh_gpu_memory_total_bytes", index="1", name="RTX 4090")] == 80 * GIB
    assert s[key("gridmesh_gpu_memory_free_bytes", index="1")] == 70 * GIB
    assert s[key("gridmesh_gpu_utilization_ratio", index="0")] == 0.37
    assert s[key("gridmesh_gpu_power_watts", index="0")] == 312.5
    # Unsupported readings are absent, not a misleading 0.
    assert key("gridmesh_gpu_utilization_ratio", index="1") not in s
    assert key("gridmesh_gpu_power_watts", index="1") not in s

    m.set_resources(resources(gpu(1, "RTX 4090", 50, 100.0)))
    s = samples(m)
    assert s[key("gridmesh_gpu_count")] == 1
    gpu_series = {
        (name, labels)
        for name, labels in s
        if name.startswith("gridmesh_gpu_") and name != "gridmesh_gpu_count"
    }
    assert gpu_series == {
        key("gridmesh_gpu_memory_total_bytes", index="1", name="RTX 4090"),
        key("gridmesh_gpu_memory_free_bytes", index="1"),
        key("gridmesh_gpu_utilization_ratio", index="1"),
        key("gridmesh_gpu_power_watts", index="1"),
    }
    assert s[key("gridmesh_gpu_utilization_ratio", index="1")] == 0.5

    m.set_resources(resources())
    s = samples(m)
    assert s[key("gridmesh_gpu_count")] == 0
    assert not [n for n, _ in s if n.startswith("gridmesh_gpu_") and n != "gridmesh_gpu_count"]


def test_set_resources_tolerates_partial_records():
    m = Metrics()
    m.set_resources({"gpus": "nonsense", "cpu": None})
    s = samples(m)
    assert s[key("gridmesh_cpu_cores")] == 0
    assert s[key("gridmesh_gpu_count")] == 0
