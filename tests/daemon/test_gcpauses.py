"""The collector's pauses are timed per generation, and a freeze takes what start-up built out
of full collections' reach (daemon.gcpauses)."""

from __future__ import annotations

import gc
import weakref

from daemon import gcpauses
from daemon.metrics import Metrics


def _count(snapshot: dict, generation: int) -> int:
    return snapshot["generations"][str(generation)]["buckets"]["+Inf"]


def test_every_collection_is_timed_in_its_generation_until_uninstalled():
    pauses = gcpauses.GcPauses()
    pauses.install()
    pauses.install()  # once only: a second install adds no second callback
    try:
        gc.collect(0)
        gc.collect(2)
        gc.collect(2)
        snap = pauses.snapshot()
        assert _count(snap, 0) >= 1
        assert _count(snap, 2) >= 2
        assert snap["generations"]["2"]["sum"] > 0
        assert snap["max_s"] > 0
    finally:
        pauses.uninstall()
    seen = _count(pauses.snapshot(), 2)
    gc.collect(2)
    assert _count(pauses.snapshot(), 2) == seen
    assert gcpauses.GcPauses()._on_gc not in gc.callbacks


def test_a_freeze_collects_first_then_puts_what_is_alive_beyond_full_collections():
    class Node:
        def __init__(self) -> None:
            self.me = self  # a cycle: only the collector frees it

    kept = [Node() for _ in range(5000)]
    garbage = [Node() for _ in range(5000)]
    gone = weakref.ref(garbage[0])
    del garbage  # unreachable cycles: a freeze must not keep them forever
    assert gone() is not None
    pauses = gcpauses.GcPauses()
    try:
        pauses.freeze("a test")
        assert pauses.frozen >= 5000
        full_walk = {id(o) for o in gc.get_objects(generation=2)}
        assert not any(id(node) in full_walk for node in kept)
        assert gone() is None
    finally:
        gc.unfreeze()
    tracked = {id(o) for o in gc.get_objects()}
    assert all(id(node) in tracked for node in kept)


def test_the_metrics_export_pauses_per_generation_and_the_frozen_count():
    pauses = gcpauses.GcPauses()
    pauses.install()
    try:
        gc.collect(1)
    finally:
        pauses.uninstall()
    metrics = Metrics()
    metrics.watch_gc(pauses.snapshot)
    text = metrics.render().decode()
    assert 'gridmesh_gc_pause_seconds_count{generation="1"} ' in text
    count = next(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith('gridmesh_gc_pause_seconds_count{generation="1"}')
    )
    assert count >= 1
    assert "gridmesh_gc_frozen_objects " in text
