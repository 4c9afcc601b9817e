"""Prometheus metrics for one daemon.

Each `Metrics` owns its own `CollectorRegistry` (not the process-global one) so several
daemons can share a test process. Label values that come from the network or from users
are sanitised and bounded, so a hostile peer cannot grow the series count without limit.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

from daemon.net_metrics import NetworkCollector

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_LABEL_CHARS = 64
# Distinct (source, reason) pairs kept before further reasons are counted as "other".
MAX_REJECT_SERIES = 256
DHT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# time to first token and between tokens of the OpenAI endpoint's generations
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
MAX_MODEL_SERIES = 64  # distinct model labels of the serving metrics; then "other"
SERVING_ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models")
MAX_KIND_SERIES = 32  # distinct registry kind labels of the replication counters; then "other"
REPLICATION_VIAS = ("gossip", "sync_pull", "sync_push")
GENERATION_STATES = ("done", "failed", "cancelled")
SETTLE_OUTCOMES = ("settled", "already", "failed")

_NOT_LABEL = re.compile(r"[^a-z0-9_]+")


def sanitize_label(value: Any) -> str:
    """Lowercase, runs of other characters become "_", at most 64 chars, never empty."""
    cleaned = _NOT_LABEL.sub("_", str(value).lower()).strip("_")[:MAX_LABEL_CHARS]
    return cleaned or "unknown"


class Metrics:
    def __init__(self, known_methods: Iterable[str] = ()) -> None:
        """`known_methods`: RPC method names counted under their own label; others are "unknown"."""
        self.known_methods: set[str] = set(known_methods)
        self.registry = CollectorRegistry()
        reg = self.registry
        self.peers = Gauge("gridmesh_peers", "Peers by state", ["state"], registry=reg)
        self.dht_operations = Counter(
            "gridmesh_dht_operations_total",
            "DHT operations by outcome",
            ["op", "outcome"],
            registry=reg,
        )
        self.dht_latency = Histogram(
            "gridmesh_dht_operation_seconds",
            "DHT operation latency",
            ["op"],
            buckets=DHT_BUCKETS,
            registry=reg,
        )
        self.rejected = Counter(
            "gridmesh_rejected_messages_total",
            "Messages rejected, by where they came in and why",
            ["source", "reason"],
            registry=reg,
        )
        self.rpc_requests = Counter(
            "gridmesh_rpc_requests_total",
            "JSON-RPC requests by method and outcome",
            ["method", "outcome"],
            registry=reg,
        )
        self.records_published = Counter(
            "gridmesh_records_published_total",
            "Resource record publications",
            ["outcome"],
            registry=reg,
        )
        self.shard_streams = Counter(
            "gridmesh_shard_streams_total",
            "Shard streams this node opened, by transport (loopback, local socket, libp2p)",
            ["transport"],
            registry=reg,
        )
        self.cpu_cores = Gauge("gridmesh_cpu_cores", "Logical CPU cores", registry=reg)
        self.memory_total = Gauge("gridmesh_memory_total_bytes", "Total RAM", registry=reg)
        self.memory_available = Gauge(
            "gridmesh_memory_available_bytes", "Available RAM", registry=reg
        )
        self.disk_free = Gauge(
            "gridmesh_disk_free_bytes", "Free disk at the node home", registry=reg
        )
        self.gpu_count = Gauge("gridmesh_gpu_count", "NVIDIA GPUs detected", registry=reg)
        self.gpu_memory_total = Gauge(
            "gridmesh_gpu_memory_total_bytes", "GPU memory", ["index", "name"], registry=reg
        )
        self.gpu_memory_free = Gauge(
            "gridmesh_gpu_memory_free_bytes", "Free GPU memory", ["index"], registry=reg
        )
        self.gpu_utilization = Gauge(
            "gridmesh_gpu_utilization_ratio", "GPU utilization, 0 to 1", ["index"], registry=reg
        )
        self.gpu_power = Gauge(
            "gridmesh_gpu_power_watts", "GPU power draw", ["index"], registry=reg
        )
        self._reject_series: set[tuple[str, str]] = set()
        self._serving_series()
        self._work_series()
        # Label tuples currently exported per GPU gauge, so vanished GPUs can be removed.
        self._gpu_series: dict[Gauge, set[tuple[str, ...]]] = {
            self.gpu_memory_total: set(),
            self.gpu_memory_free: set(),
            self.gpu_utilization: set(),
            self.gpu_power: set(),
        }

    def reject(self, source: str, reason: str) -> None:
        labels = (sanitize_label(source), sanitize_label(reason))
        if labels not in self._reject_series:
            if len(self._reject_series) >= MAX_REJECT_SERIES:
                labels = (labels[0], "other")
            self._reject_series.add(labels)
        self.rejected.labels(*labels).inc()

    def _serving_series(self) -> None:
        """The OpenAI endpoint's metrics (daemon.api.openai_http), per model."""
        reg = self.registry
        self.serving_requests = Counter(
            "gridmesh_serving_requests_total",
            "OpenAI endpoint requests by model, route and HTTP status (499: client gone)",
            ["model", "route", "status"],
            registry=reg,
        )
        self.serving_token_count = Counter(
            "gridmesh_serving_tokens_total",
            "Tokens through the OpenAI endpoint: in (prompts), out (generated)",
            ["model", "direction"],
            registry=reg,
        )
        self.serving_ttft = Histogram(
            "gridmesh_serving_time_to_first_token_seconds",
            "From a generation's start (after the queue) to its first token",
            ["model"],
            buckets=TTFT_BUCKETS,
            registry=reg,
        )
        self.serving_itl = Histogram(
            "gridmesh_serving_inter_token_latency_seconds",
            "Between two tokens of one generation",
            ["model"],
            buckets=ITL_BUCKETS,
            registry=reg,
        )
        self.serving_queued = Gauge(
            "gridmesh_serving_queue_length",
            "Requests waiting for a generation slot",
            ["model"],
            registry=reg,
        )
        self._model_labels: set[str] = set()

    def _work_series(self) -> None:
        """Generations this node ran and their failovers, settlements of its paid work, and
        registry entries replicated to it."""
        reg = self.registry
        self.generations = Counter(
            "gridmesh_generations_total",
            "Generations this node ran through shard servers, by how they ended",
            ["outcome"],
            registry=reg,
        )
        self.generation_failovers = Counter(
            "gridmesh_generation_failovers_total",
            "Failovers (a hop re-routed and replayed) of this node's generations",
            registry=reg,
        )
        self.settlements = Counter(
            "gridmesh_settlements_total",
            "Voucher settlements on chain: settled, already (settled before), failed",
            ["outcome"],
            registry=reg,
        )
        self.settled_amount = Counter(
            "gridmesh_settled_amount_total",
            "Amount settled to this provider, in the payment token's smallest unit",
            registry=reg,
        )
        self.registry_entries = Counter(
            "gridmesh_registry_entries_total",
            "Registry entries from peers: received (decoded) and applied (changed the "
            "replica), by kind and how they came (gossip, sync_pull, sync_push)",
            ["via", "stage", "kind"],
            registry=reg,
        )
        self._kind_labels: set[str] = set()

    def generation_ended(self, state: str, failovers: int) -> None:
        """One generation ended (daemon.shards.recent's hook)."""
        self.generations.labels(state if state in GENERATION_STATES else "other").inc()
        self.generation_failovers.inc(max(0, int(failovers)))

    def settlement(self, outcome: str, amount: int = 0) -> None:
        """One settlement of a job's voucher (daemon.payments.provider's hook)."""
        self.settlements.labels(outcome if outcome in SETTLE_OUTCOMES else "other").inc()
        if amount > 0:
            self.settled_amount.inc(amount)

    def registry_replicated(self, via: str, stage: str, kind: str, count: int) -> None:
        """`count` entries of `kind` received or applied (registry.replication's hook)."""
        label = sanitize_label(kind)
        if label not in self._kind_labels:
            if len(self._kind_labels) >= MAX_KIND_SERIES:
                label = "other"
            else:
                self._kind_labels.add(label)
        via = via if via in REPLICATION_VIAS else "other"
        stage = stage if stage in ("received", "applied") else "other"
        self.registry_entries.labels(via, stage, label).inc(max(0, count))

    def _model_label(self, model: str | None) -> str:
        if model is None:
            return "none"
        label = sanitize_label(model)
        if label not in self._model_labels:
            if len(self._model_labels) >= MAX_MODEL_SERIES:
                return "other"
            self._model_labels.add(label)
        return label

    def serving_request(self, model: str | None, route: str, status: int) -> None:
        """One request's outcome; `model` only once it named a model this node serves."""
        route = route if route in SERVING_ROUTES else "other"
        self.serving_requests.labels(self._model_label(model), route, str(int(status))).inc()

    def serving_tokens(self, model: str, direction: str, count: int) -> None:
        self.serving_token_count.labels(self._model_label(model), direction).inc(count)

    def serving_latency(self, model: str, kind: str, seconds: float) -> None:
        """kind: "ttft" (first token) or "itl" (between tokens)."""
        histogram = self.serving_ttft if kind == "ttft" else self.serving_itl
        histogram.labels(self._model_label(model)).observe(max(0.0, float(seconds)))

    def serving_queue(self, model: str, delta: int) -> None:
        self.serving_queued.labels(self._model_label(model)).inc(delta)

    def rpc_outcome(self, method: str, outcome: str) -> None:
        label = method if method in self.known_methods else "unknown"
        self.rpc_requests.labels(label, sanitize_label(outcome)).inc()

    def observe_dht(self, op: str, outcome: str, seconds: float) -> None:
        op = sanitize_label(op)
        self.dht_operations.labels(op, sanitize_label(outcome)).inc()
        self.dht_latency.labels(op).observe(max(0.0, float(seconds)))

    def record_published(self, ok: bool) -> None:
        self.records_published.labels("ok" if ok else "failed").inc()

    def set_peers(self, connected: int, known: int) -> None:
        self.peers.labels("connected").set(connected)
        self.peers.labels("known").set(known)

    def set_resources(self, resources: dict[str, Any]) -> None:
        """Mirror a `daemon.resources.detect_resources` dict; missing parts read as 0."""
        cpu = _section(resources, "cpu")
        memory = _section(resources, "memory")
        disk = _section(resources, "disk")
        self.cpu_cores.set(_num(cpu.get("cores")))
        self.memory_total.set(_num(memory.get("total_bytes")))
        self.memory_available.set(_num(memory.get("available_bytes")))
        self.disk_free.set(_num(disk.get("free_bytes")))
        raw_gpus = resources.get("gpus")
        gpus = [g for g in raw_gpus if isinstance(g, dict)] if isinstance(raw_gpus, list) else []
        self.gpu_count.set(len(gpus))
        wanted: dict[Gauge, dict[tuple[str, ...], float]] = {g: {} for g in self._gpu_series}
        for position, gpu in enumerate(gpus):
            index = str(gpu.get("index", position))
            name = str(gpu.get("name", ""))[: MAX_LABEL_CHARS * 2]
            wanted[self.gpu_memory_total][(index, name)] = _num(gpu.get("memory_total_bytes"))
            wanted[self.gpu_memory_free][(index,)] = _num(gpu.get("memory_free_bytes"))
            if _is_num(gpu.get("utilization_pct")):
                wanted[self.gpu_utilization][(index,)] = _num(gpu["utilization_pct"]) / 100.0
            if _is_num(gpu.get("power_w")):
                wanted[self.gpu_power][(index,)] = _num(gpu["power_w"])
        for gauge, values in wanted.items():
            current = self._gpu_series[gauge]
            for labels in current - values.keys():
                gauge.remove(*labels)
            for labels, value in values.items():
                gauge.labels(*labels).set(value)
            self._gpu_series[gauge] = set(values)

    def watch_clusters(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the cluster runtime's state (`daemon.cluster.runtime.ClusterRuntime.
        snapshot`), read at each scrape."""
        self.registry.register(_ClusterCollector(snapshot))

    def watch_shards(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the shard server's sessions, KV cache and batches per model (`daemon.
        shards.service.ShardService.snapshot`), read at each scrape."""
        self.registry.register(_ShardCollector(snapshot))

    def watch_replication(self, stats: Callable[[], dict[str, int]]) -> None:
        """Export registry replication's own counters (`registry.replication.Replicator.
        stats`: sync rounds and failures, gossip sent, applied and refused...), read at
        each scrape."""
        self.registry.register(_ReplicationCollector(stats))

    def watch_network(self, net: Any, liveness: Any = None) -> None:
        """Export the network's liveness, pings, peer scores, bans and disconnects
        (daemon.net_metrics; `liveness`: discovery's p2p.liveness.Liveness), read at each
        scrape."""
        self.registry.register(NetworkCollector(net, liveness))

    def watch_gc(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        """Export the garbage collector's pauses (`daemon.gcpauses.GcPauses.snapshot`),
        read at each scrape."""
        self.registry.register(_GcCollector(snapshot))

    def render(self) -> bytes:
        """Prometheus text exposition; serve it with `CONTENT_TYPE`."""
        return generate_latest(self.registry)


class _ClusterCollector:
    """Per cluster: its term, whether this node coordinates it, elections started and won,
    members by SWIM state; per node: commands refused by reason, peer messages refused by
    protocol and reason. Cluster names are those this node runs (bounded by
    `[cluster] max_clusters`); reasons are the code's own."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # no scrape at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        term = GaugeMetricFamily(
            "gridmesh_cluster_term", "The cluster's term as this node knows it", labels=["cluster"]
        )
        coordinating = GaugeMetricFamily(
            "gridmesh_cluster_coordinating",
            "1 while this node holds the cluster's coordinator lease",
            labels=["cluster"],
        )
        started = CounterMetricFamily(
            "gridmesh_cluster_elections_started",
            "Elections this node started (after a won pre-vote)",
            labels=["cluster"],
        )
        won = CounterMetricFamily(
            "gridmesh_cluster_elections_won", "Elections this node won", labels=["cluster"]
        )
        members = GaugeMetricFamily(
            "gridmesh_cluster_members",
            "The cluster's members by state, as this node's failure detector sees them",
            labels=["cluster", "state"],
        )
        for name, cluster in snap.get("clusters", {}).items():
            label = [sanitize_label(name)]
            term.add_metric(label, cluster["term"])
            coordinating.add_metric(label, 1 if cluster["coordinating"] else 0)
            started.add_metric(label, cluster["elections_started"])
            won.add_metric(label, cluster["elections_won"])
            for state, count in cluster["members"].items():
                members.add_metric([*label, sanitize_label(state)], count)
        refused = CounterMetricFamily(
            "gridmesh_cluster_commands_refused",
            "Coordinator commands this node refused, by reason (stale_term, replayed_seq, ...)",
            labels=["reason"],
        )
        for reason, count in snap.get("commands_refused", {}).items():
            refused.add_metric([sanitize_label(reason)], count)
        accepted = CounterMetricFamily(
            "gridmesh_cluster_commands_accepted", "Coordinator commands this node accepted"
        )
        accepted.add_metric([], snap.get("commands_accepted", 0))
        messages = CounterMetricFamily(
            "gridmesh_cluster_messages_refused",
            "Cluster messages from peers refused, by protocol (swim, election, command) and why",
            labels=["protocol", "reason"],
        )
        for (protocol, reason), count in snap.get("messages_refused", {}).items():
            messages.add_metric([sanitize_label(protocol), sanitize_label(reason)], count)
        events = CounterMetricFamily(
            "gridmesh_cluster_events",
            "The cluster runtime's own events (commands sent and handled, handlers that failed, "
            "bodies that did not decode, clusters left out or stopped by a failure)",
            labels=["event"],
        )
        for event, count in snap.get("runtime", {}).items():
            events.add_metric([sanitize_label(event)], count)
        yield from (term, coordinating, started, won, members, refused, accepted, messages, events)
        yield from _lapses_and_lag(snap)


def _lapses_and_lag(snap: dict[str, Any]) -> Iterator[Metric]:
    """Leases that ran out while this node led (it stopped commanding and went on with
    heartbeats), and how late the event loop ran its tasks (`daemon.cluster.loop_lag`)."""
    lapses = CounterMetricFamily(
        "gridmesh_cluster_lease_lapses",
        "Times this node's coordinator lease ran out while it still led (commands paused)",
        labels=["cluster"],
    )
    for name, cluster in snap.get("clusters", {}).items():
        lapses.add_metric([sanitize_label(name)], cluster.get("lease_lapses", 0))
    yield lapses
    lag = snap.get("loop_lag")
    if isinstance(lag, dict) and lag.get("buckets"):
        histogram = HistogramMetricFamily(
            "gridmesh_event_loop_lag_seconds",
            "How much later than asked a task sleeping 50 ms woke (time the event loop spent "
            "on other work, or the process not running); every cluster timer is as late",
        )
        histogram.add_metric([], list(lag["buckets"].items()), sum_value=lag["sum"])
        yield histogram


class _GcCollector:
    """The collector's pauses per generation, and the objects frozen out of its reach."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        pauses = HistogramMetricFamily(
            "gridmesh_gc_pause_seconds",
            "How long each garbage collection stopped the daemon (every task, the event loop "
            "included), by generation",
            labels=["generation"],
        )
        for generation, data in snap["generations"].items():
            pauses.add_metric([generation], list(data["buckets"].items()), data["sum"])
        frozen = GaugeMetricFamily(
            "gridmesh_gc_frozen_objects",
            "Objects moved out of the collector's reach after start-up and model loads "
            "(gc.freeze): what full collections no longer walk",
        )
        frozen.add_metric([], snap["frozen"])
        yield from (pauses, frozen)


class _ReplicationCollector:
    """Anti-entropy rounds and failed rounds, and every event the replicator counts (its
    keys are the code's own, a bounded set)."""

    def __init__(self, stats: Callable[[], dict[str, int]]) -> None:
        self.stats = stats

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = dict(self.stats())
        rounds = CounterMetricFamily(
            "gridmesh_registry_sync_rounds", "Anti-entropy rounds this node completed"
        )
        rounds.add_metric([], stats.get("sync_rounds", 0))
        failures = CounterMetricFamily(
            "gridmesh_registry_sync_failures",
            "Anti-entropy rounds that failed (peer unreachable, timed out, bad reply)",
        )
        failures.add_metric([], stats.get("sync_failed", 0))
        events = CounterMetricFamily(
            "gridmesh_registry_replication_events",
            "Registry replication's counters: gossip_sent, gossip_applied, gossip_refused "
            "(dropped by the validator), sync_pages, sync_hedged, sync_applied, ...",
            labels=["event"],
        )
        for event, count in sorted(stats.items()):
            events.add_metric([sanitize_label(event)], count)
        yield from (rounds, failures, events)


def _section(resources: dict[str, Any], key: str) -> dict[str, Any]:
    value = resources.get(key)
    return value if isinstance(value, dict) else {}


def _is_num(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _num(value: Any) -> float:
    return float(value) if _is_num(value) else 0.0


BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class _ShardCollector:
    """Per model served here: live sessions, their KV cache bytes, forward passes by how
    many sessions' steps each held (a histogram: continuous batching at work), steps that
    shared a pass, steps waiting for one; per node: the KV cache budget. Models are those
    loaded on this node."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def describe(self) -> list[Metric]:
        return []  # read at scrape time only: nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        budget = GaugeMetricFamily(
            "gridmesh_shard_kv_cache_budget_bytes", "KV cache all sessions may hold together"
        )
        budget.add_metric([], snap["cache_budget_bytes"])
        yield budget
        sessions = GaugeMetricFamily(
            "gridmesh_shard_sessions", "Live sessions on this shard server", labels=["model"]
        )
        used = GaugeMetricFamily(
            "gridmesh_shard_kv_cache_used_bytes", "KV cache held by live sessions", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            "gridmesh_shard_waiting_steps", "Steps waiting for a forward pass", labels=["model"]
        )
        batched = CounterMetricFamily(
            "gridmesh_shard_batched_steps",
            "Steps that shared a forward pass with another session's",
            labels=["model"],
        )
        sizes = HistogramMetricFamily(
            "gridmesh_shard_batch_size",
            "Forward passes by the number of sessions' steps in each",
            labels=["model"],
        )
        for model, row in sorted(snap["models"].items()):
            label = [sanitize_label(model)]
            sessions.add_metric(label, row["sessions"])
            used.add_metric(label, row["cache_used_bytes"])
            waiting.add_metric(label, row["waiting_steps"])
            batched.add_metric(label, row["batched_steps"])
            counts = row["batch_sizes"]
            buckets = [
                (str(edge), sum(n for size, n in counts.items() if size <= edge))
                for edge in BATCH_BUCKETS
            ]
            buckets.append(("+Inf", sum(counts.values())))
            total = sum(size * n for size, n in counts.items())
            sizes.add_metric(label, buckets, total)
        yield from (sessions, used, waiting, batched, sizes)
