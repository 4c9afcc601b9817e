"""The live numbers of the dashboard's event feed, read from this daemon's own metrics.

Each feed keeps the previous sample and turns counters into rates: tokens per second
generated through the OpenAI endpoint, steps per second this node's shard servers computed
(one step is one token through the layers served here, so during a generation it is the
generation's tokens per second), time to first token over the last interval, and gauges
(sessions, KV cache, queue, peers).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

Sample = dict[str, float]

# (sample key, metric sample name, label that must match or None)
_SUMS: list[tuple[str, str, tuple[str, str] | None]] = [
    ("tokens_out", "gridmesh_serving_tokens_total", ("direction", "out")),
    ("tokens_in", "gridmesh_serving_tokens_total", ("direction", "in")),
    ("steps", "gridmesh_shard_batch_size_sum", None),
    ("passes", "gridmesh_shard_batch_size_count", None),
    ("ttft_sum", "gridmesh_serving_time_to_first_token_seconds_sum", None),
    ("ttft_count", "gridmesh_serving_time_to_first_token_seconds_count", None),
    ("requests", "gridmesh_serving_requests_total", None),
    ("sessions", "gridmesh_shard_sessions", None),
    ("kv_used_bytes", "gridmesh_shard_kv_cache_used_bytes", None),
    ("kv_budget_bytes", "gridmesh_shard_kv_cache_budget_bytes", None),
    ("waiting_steps", "gridmesh_shard_waiting_steps", None),
    ("queued", "gridmesh_serving_queue_length", None),
    ("peers_connected", "gridmesh_peers", ("state", "connected")),
    ("rejected", "gridmesh_rejected_messages_total", None),
    ("client_gone", "gridmesh_rejected_messages_total", ("reason", "client_gone")),
]


def sample(text: str) -> Sample:
    """The sums the feed reports, from Prometheus text (absent metrics count 0)."""
    wanted: dict[str, list[tuple[str, tuple[str, str] | None]]] = {}
    for key, name, label in _SUMS:
        wanted.setdefault(name, []).append((key, label))
    out: Sample = dict.fromkeys((k for k, _, _ in _SUMS), 0.0)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            for key, label in wanted.get(s.name, ()):
                if label is None or s.labels.get(label[0]) == label[1]:
                    out[key] += float(s.value)
    return out


# per model: (column, metric sample name, label that must match or None)
_PER_MODEL: list[tuple[str, str, tuple[str, str] | None]] = [
    ("sessions", "gridmesh_shard_sessions", None),
    ("kv_used_bytes", "gridmesh_shard_kv_cache_used_bytes", None),
    ("waiting_steps", "gridmesh_shard_waiting_steps", None),
    ("steps", "gridmesh_shard_batch_size_sum", None),
    ("passes", "gridmesh_shard_batch_size_count", None),
    ("tokens_in", "gridmesh_serving_tokens_total", ("direction", "in")),
    ("tokens_out", "gridmesh_serving_tokens_total", ("direction", "out")),
    ("ttft_sum", "gridmesh_serving_time_to_first_token_seconds_sum", None),
    ("ttft_count", "gridmesh_serving_time_to_first_token_seconds_count", None),
    ("queued", "gridmesh_serving_queue_length", None),
]
MAX_MODELS = 64  # rows in the per-model table (the metrics cap their model labels too)


def per_model(text: str) -> list[dict[str, Any]]:
    """Per model, since this daemon started: shard sessions, KV cache, steps and forward
    passes (their ratio: the mean batch size), OpenAI tokens and mean time to first token."""
    wanted: dict[str, list[tuple[str, tuple[str, str] | None]]] = {}
    for key, name, label in _PER_MODEL:
        wanted.setdefault(name, []).append((key, label))
    rows: dict[str, dict[str, float]] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            model = s.labels.get("model")
            for key, label in wanted.get(s.name, ()) if model is not None else ():
                if label is None or s.labels.get(label[0]) == label[1]:
                    if model not in rows and len(rows) >= MAX_MODELS:
                        continue
                    row = rows.setdefault(model, dict.fromkeys((k for k, _, _ in _PER_MODEL), 0.0))
                    row[key] += float(s.value)
    out = []
    for model, row in sorted(rows.items()):
        passes, ttft_n = row.pop("passes"), row.pop("ttft_count")
        ttft_sum = row.pop("ttft_sum")
        out.append(
            {
                "model": model,
                **{k: int(v) for k, v in row.items()},
                "mean_batch": round(row["steps"] / passes, 2) if passes else None,
                "ttft_avg_s": round(ttft_sum / ttft_n, 4) if ttft_n else None,
            }
        )
    return out


def rates(prev: Sample | None, now: Sample, seconds: float) -> dict[str, Any]:
    """What one live event carries: gauges as they are, counters as per-second rates over
    `seconds` since `prev` (0 for the first sample: nothing to compare with)."""

    def per_s(key: str) -> float:
        if prev is None or seconds <= 0:
            return 0.0
        return round(max(0.0, now[key] - prev[key]) / seconds, 3)

    ttft_n = 0.0 if prev is None else now["ttft_count"] - prev["ttft_count"]
    ttft = (now["ttft_sum"] - prev["ttft_sum"]) / ttft_n if prev and ttft_n > 0 else None
    return {
        "tokens_per_s": per_s("tokens_out"),
        "steps_per_s": per_s("steps"),
        "passes_per_s": per_s("passes"),
        "requests_per_s": per_s("requests"),
        "ttft_s": None if ttft is None else round(ttft, 4),
        "ttft_avg_s": round(now["ttft_sum"] / now["ttft_count"], 4) if now["ttft_count"] else None,
        "tokens_out_total": int(now["tokens_out"]),
        "steps_total": int(now["steps"]),
        "sessions": int(now["sessions"]),
        "kv_used_bytes": int(now["kv_used_bytes"]),
        "kv_budget_bytes": int(now["kv_budget_bytes"]),
        "waiting_steps": int(now["waiting_steps"]),
        "queued": int(now["queued"]),
        "peers_connected": int(now["peers_connected"]),
        "rejected_total": int(now["rejected"]),
        "client_gone_total": int(now["client_gone"]),
    }


class Sampler:
    """One feed's view of the metrics: `next()` is the next live event's data."""

    def __init__(
        self, metrics: Callable[[], bytes], clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.metrics, self.clock = metrics, clock
        self.prev: Sample | None = None
        self.prev_at = 0.0

    def next(self) -> dict[str, Any]:
        try:
            now = sample(self.metrics().decode("utf-8", "replace"))
        except Exception:  # a broken collector must not end the feed
            log.exception("dashboard: reading metrics failed")
            return {"error": "metrics unavailable"}
        at = self.clock()
        data = rates(self.prev, now, at - self.prev_at)
        self.prev, self.prev_at = now, at
        data["at"] = round(time.time(), 3)
        return data
