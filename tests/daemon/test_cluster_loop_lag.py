"""The event loop's lag (daemon.cluster.loop_lag): measured in real time around a task that
blocks the loop, exported in /metrics as gridmesh_event_loop_lag_seconds, and the slow task
named by GRIDMESH_SLOW_STEPS."""

from __future__ import annotations

import logging
import time

import trio

from daemon.cluster.loop_lag import BUCKETS, LoopLag, SlowSteps, slow_steps_from_env
from daemon.metrics import Metrics


async def block_the_loop(seconds: float) -> None:
    await trio.sleep(0.12)
    time.sleep(seconds)  # noqa: ASYNC251 - holds the loop, as a GIL-heavy call on it would


async def test_a_task_that_blocks_the_loop_shows_as_lag():
    lag = LoopLag(interval_s=0.02)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lag.run)
        await block_the_loop(0.3)
        await trio.sleep(0.1)
        nursery.cancel_scope.cancel()
    assert 0.25 <= lag.max_s < 1.0
    snap = lag.snapshot()
    assert snap["count"] == lag.count >= 5 and snap["sum"] >= 0.25
    buckets = snap["buckets"]
    assert list(buckets) == [*map(str, BUCKETS), "+Inf"] and buckets["+Inf"] == lag.count
    assert buckets["0.25"] < buckets["0.5"]  # the blocked wake-up, in (0.25, 0.5]
    assert buckets["0.05"] >= lag.count - 2  # the others woke on time


def test_the_lag_is_a_histogram_in_metrics():
    lag = LoopLag()
    for seconds in (0.001, 0.002, 0.3):
        lag.observe(seconds)
    metrics = Metrics()
    metrics.watch_clusters(lambda: {"clusters": {}, "loop_lag": lag.snapshot()})
    text = metrics.render().decode()
    assert 'gridmesh_event_loop_lag_seconds_bucket{le="0.005"} 2.0' in text
    assert 'gridmesh_event_loop_lag_seconds_bucket{le="+Inf"} 3.0' in text
    assert "gridmesh_event_loop_lag_seconds_sum 0.303" in text


async def slow_steps_logged(caplog, slow: SlowSteps, task, seconds: float) -> list[str]:
    """What `slow` logs while `task(seconds)` runs."""
    trio.lowlevel.add_instrument(slow)
    try:
        with caplog.at_level(logging.INFO, logger="daemon.cluster.loop_lag"):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(task, seconds)
    finally:
        trio.lowlevel.remove_instrument(slow)
    return [r.getMessage() for r in caplog.records if "held the event loop" in r.getMessage()]


def cpu_of(message: str) -> float:
    return float(message.split("(")[1].split(" s of CPU")[0])


async def test_slow_steps_names_the_task_that_held_the_loop(caplog, monkeypatch):
    monkeypatch.setenv("GRIDMESH_SLOW_STEPS", "0.1")
    slow = slow_steps_from_env()
    assert isinstance(slow, SlowSteps) and slow.threshold_s == 0.1
    monkeypatch.setenv("GRIDMESH_SLOW_STEPS", "no")
    assert slow_steps_from_env() is None
    held = await slow_steps_logged(caplog, slow, block_the_loop, 0.2)
    assert len(held) == 1 and "block_the_loop" in held[0]
    # a sleep holds the loop without work: the CPU part tells waiting from computing
    assert cpu_of(held[0]) < 0.05, held[0]


async def spin_the_loop(seconds: float) -> None:
    await trio.sleep(0.12)
    until = time.thread_time() + seconds
    while time.thread_time() < until:  # CPU work on the loop's thread, as a decode would
        pass


async def test_slow_steps_tells_work_from_waiting(caplog):
    held = await slow_steps_logged(caplog, SlowSteps(0.1), spin_the_loop, 0.2)
    assert len(held) == 1 and "spin_the_loop" in held[0]
    assert cpu_of(held[0]) >= 0.19, held[0]
