"""The live feed's numbers from Prometheus text: counters become per-second rates over the
interval, gauges pass through, time to first token is the interval's mean, and the per-model
table sums each model's series."""

from __future__ import annotations

from daemon.dashboard.live import per_model, rates, sample

TEXT = """# TYPE gridmesh_serving_tokens_total counter
gridmesh_serving_tokens_total{{model="a",direction="out"}} {out}
gridmesh_serving_tokens_total{{model="a",direction="in"}} 7
# TYPE gridmesh_shard_batch_size histogram
gridmesh_shard_batch_size_bucket{{model="a",le="+Inf"}} {passes}
gridmesh_shard_batch_size_count{{model="a"}} {passes}
gridmesh_shard_batch_size_sum{{model="a"}} {steps}
# TYPE gridmesh_serving_time_to_first_token_seconds histogram
gridmesh_serving_time_to_first_token_seconds_count{{model="a"}} {ttft_n}
gridmesh_serving_time_to_first_token_seconds_sum{{model="a"}} {ttft_s}
# TYPE gridmesh_shard_sessions gauge
gridmesh_shard_sessions{{model="a"}} 2
gridmesh_shard_sessions{{model="b"}} 1
# TYPE gridmesh_peers gauge
gridmesh_peers{{state="connected"}} 3
gridmesh_peers{{state="known"}} 9
"""


def text(out=0, passes=0, steps=0, ttft_n=0, ttft_s=0.0) -> str:
    return TEXT.format(out=out, passes=passes, steps=steps, ttft_n=ttft_n, ttft_s=ttft_s)


def test_counters_become_rates_and_gauges_pass_through():
    first = sample(text(out=10, passes=4, steps=8, ttft_n=1, ttft_s=0.5))
    assert rates(None, first, 0)["tokens_per_s"] == 0.0  # nothing to compare with yet
    later = sample(text(out=30, passes=9, steps=28, ttft_n=3, ttft_s=1.1))
    live = rates(first, later, 2.0)
    assert live["tokens_per_s"] == 10.0 and live["steps_per_s"] == 10.0
    assert live["passes_per_s"] == 2.5
    assert live["ttft_s"] == 0.3  # (1.1 - 0.5) / 2 over the interval
    assert live["sessions"] == 3 and live["peers_connected"] == 3
    restarted = rates(later, first, 2.0)  # counters that went back never read negative
    assert restarted["tokens_per_s"] == 0.0 and restarted["ttft_s"] is None


def test_per_model_rows():
    rows = {r["model"]: r for r in per_model(text(out=5, passes=4, steps=10, ttft_n=2, ttft_s=1))}
    assert rows["a"]["tokens_out"] == 5 and rows["a"]["tokens_in"] == 7
    assert rows["a"]["mean_batch"] == 2.5 and rows["a"]["ttft_avg_s"] == 0.5
    assert rows["b"] == {**rows["b"], "sessions": 1, "mean_batch": None, "ttft_avg_s": None}
