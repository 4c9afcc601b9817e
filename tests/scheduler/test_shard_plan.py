"""Shard planning: capacity weighting, memory limits, ends, replicas, errors, determinism."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.shard_plan import (
    Assignment,
    Candidate,
    ModelSpec,
    Plan,
    PlanError,
    plan_shards,
    plan_with_nodes,
)

MB = 1000


def model(layers: int = 30, layer: int = MB, embed: int = 0, head: int = 0, cache: int = 0):
    return ModelSpec("m", layers, layer, embed, head, cache)


def used_bytes(spec: ModelSpec, a: Assignment) -> int:
    extra = (spec.embed_bytes if a.start == 0 else 0) + (
        spec.head_bytes if a.end == spec.num_layers else 0
    )
    return a.layers * spec.per_layer_bytes + extra


def check_plan(spec: ModelSpec, cands: list[Candidate], plan: Plan, fraction: float) -> None:
    """Every chain is contiguous over [0, n), nodes are disjoint, budgets are respected."""
    free = {c.peer_id: c.free_bytes for c in cands}
    peers = [a.peer_id for a in plan.assignments]
    assert len(peers) == len(set(peers)), "a node holds at most one range"
    chains = plan.chains()
    assert len(chains) == plan.replicas >= 1
    for chain in chains:
        assert chain[0].start == 0 and chain[-1].end == spec.num_layers
        for left, right in zip(chain, chain[1:], strict=False):
            assert left.end == right.start
        for a in chain:
            assert a.start < a.end
            assert used_bytes(spec, a) <= math.floor(fraction * free[a.peer_id])
    assert plan.min_coverage() == plan.replicas


def test_twice_the_memory_gets_twice_the_layers():
    spec = model(layers=30)
    cands = [Candidate("small", 20 * MB, 1.0), Candidate("big", 40 * MB, 1.0)]
    plan = plan_shards(spec, cands, memory_fraction=1.0)
    layers = {a.peer_id: a.layers for a in plan.assignments}
    assert layers == {"big": 20, "small": 10}
    check_plan(spec, cands, plan, 1.0)


def test_memory_weighting_is_approximate_with_rounding():
    spec = model(layers=32)
    cands = [
        Candidate("a", 100 * MB, 1.0),
        Candidate("b", 50 * MB, 1.0),
        Candidate("c", 50 * MB, 1),
    ]
    plan = plan_shards(spec, cands)
    layers = {a.peer_id: a.layers for a in plan.assignments}
    assert sum(layers.values()) == 32
    assert abs(layers["a"] - 2 * layers["b"]) <= 1 and abs(layers["b"] - layers["c"]) <= 1


def test_faster_node_gets_more_layers_when_memory_allows():
    spec = model(layers=30)
    cands = [Candidate("slow", 100 * MB, 1.0), Candidate("fast", 100 * MB, 2.0)]
    layers = {a.peer_id: a.layers for a in plan_shards(spec, cands).assignments}
    assert layers == {"fast": 20, "slow": 10}


def test_faster_node_is_capped_by_its_memory():
    spec = model(layers=30)
    cands = [Candidate("slow", 100 * MB, 1.0), Candidate("fast", 12 * MB, 10.0)]
    plan = plan_shards(spec, cands, memory_fraction=1.0)
    layers = {a.peer_id: a.layers for a in plan.assignments}
    assert layers == {"fast": 12, "slow": 18}
    check_plan(spec, cands, plan, 1.0)


def test_memory_fraction_is_respected():
    spec = model(layers=10)
    # 10 layers need 10 MB; with 0.9 each node can use 9 MB: one can't hold it alone.
    cands = [Candidate("a", 10 * MB, 1.0), Candidate("b", 10 * MB, 1.0)]
    with pytest.raises(PlanError):
        plan_with_nodes(spec, cands, 1)
    plan = plan_shards(spec, cands, memory_fraction=0.9)
    check_plan(spec, cands, plan, 0.9)
    assert len(plan.assignments) == 2


def test_kv_cache_reserve_counts_per_layer():
    spec = model(layers=10, cache=MB)  # 2 MB per layer on the server
    cands = [Candidate("a", 12 * MB, 1.0), Candidate("b", 12 * MB, 1.0)]
    plan = plan_shards(spec, cands, memory_fraction=1.0)
    assert [a.layers for a in plan.assignments] == [5, 5]
    with pytest.raises(PlanError, match="KV-cache"):
        plan_shards(spec, cands[:1], memory_fraction=1.0)


def test_embedding_and_head_are_counted_on_the_ends():
    spec = model(layers=10, embed=8 * MB, head=6 * MB)
    cands = [
        Candidate("big", 14 * MB, 1.0),  # embedding + up to 6 layers
        Candidate("mid", 9 * MB, 1.0),  # head + up to 3 layers, or 9 middle layers
        Candidate("tiny", 3 * MB, 1.0),  # can't hold an end
    ]
    plan = plan_shards(spec, cands, memory_fraction=1.0)
    check_plan(spec, cands, plan, 1.0)
    chain = plan.chains()[0]
    assert chain[0].peer_id == "big" and chain[-1].peer_id == "mid"
    assert [a.peer_id for a in chain] == ["big", "tiny", "mid"]


def test_a_node_too_small_for_its_end_is_kept_in_the_middle():
    spec = model(layers=6, embed=5 * MB, head=5 * MB)
    cands = [Candidate("a", 7 * MB, 1.0), Candidate("b", 7 * MB, 1.0), Candidate("c", 2 * MB, 1.0)]
    chain = plan_shards(spec, cands, memory_fraction=1.0).chains()[0]
    assert chain[1].peer_id == "c"
    assert {chain[0].peer_id, chain[-1].peer_id} == {"a", "b"}


def test_single_node_holds_embedding_and_head():
    spec = model(layers=4, embed=3 * MB, head=3 * MB)
    assert plan_with_nodes(spec, [Candidate("a", 10 * MB, 1.0)], 1, memory_fraction=1.0)
    with pytest.raises(PlanError):
        plan_with_nodes(spec, [Candidate("a", 9 * MB, 1.0)], 1, memory_fraction=1.0)


def test_replicas_on_disjoint_nodes():
    spec = model(layers=12)
    cands = [Candidate(f"n{i}", 8 * MB, 1.0) for i in range(4)]
    plan = plan_shards(spec, cands, replicas=2)
    assert plan.replicas == 2
    chains = plan.chains()
    assert {a.peer_id for a in chains[0]}.isdisjoint({a.peer_id for a in chains[1]})
    assert plan.coverage() == [2] * 12
    check_plan(spec, cands, plan, 0.9)


def test_replicas_fall_back_to_one_copy():
    spec = model(layers=12)
    cands = [Candidate(f"n{i}", 8 * MB, 1.0) for i in range(3)]  # 21 layers of room: one copy
    plan = plan_shards(spec, cands, replicas=2)
    assert plan.replicas == 1 and plan.min_coverage() == 1
    assert len(plan.assignments) == 3
    check_plan(spec, cands, plan, 0.9)


def test_replicas_use_memory_order_when_preference_order_fails():
    spec = model(layers=10)
    # "fast" ranks first by memory x speed but a copy needs the two big ones split apart.
    cands = [
        Candidate("fast", 3 * MB, 100.0),
        Candidate("big1", 12 * MB, 1.0),
        Candidate("big2", 12 * MB, 1.0),
        Candidate("small", 2 * MB, 1.0),
    ]
    plan = plan_shards(spec, cands, replicas=2, memory_fraction=1.0)
    assert plan.replicas == 2
    check_plan(spec, cands, plan, 1.0)


def test_plan_error_says_needed_and_available():
    spec = ModelSpec("llama", 10, 1000, 500, 500)
    cands = [Candidate("a", 5000, 1.0), Candidate("b", 5000, 1.0)]
    with pytest.raises(PlanError) as info:
        plan_shards(spec, cands)
    msg = str(info.value)
    assert "'llama' needs 11000 bytes" in msg
    assert "10 layers x 1000" in msg and "embedding 500 + head 500" in msg
    assert "2 candidate(s) offer 9000 bytes" in msg


def test_plan_error_with_no_candidates_and_bad_candidates():
    spec = model(layers=4)
    with pytest.raises(PlanError, match="0 candidate"):
        plan_shards(spec, [])
    bad = [
        Candidate("nan", 100 * MB, math.nan),
        Candidate("neg", -5, 1.0),
        Candidate("", 100 * MB, 1.0),
        Candidate("bool", True, 1.0),  # type: ignore[arg-type]
        Candidate("zero", 100 * MB, 0.0),
        Candidate("inf", 100 * MB, math.inf),
        "not a candidate",  # type: ignore[list-item]
        Candidate(["list"], 100 * MB, 1.0),  # type: ignore[arg-type]
    ]
    with pytest.raises(PlanError, match="8 candidate"):
        plan_shards(spec, bad)


def test_odd_candidates_are_skipped_not_fatal():
    spec = model(layers=4)
    cands = [
        Candidate("nan", 100 * MB, math.nan),
        Candidate("ok", 10 * MB, 1.0, rtt_ms=math.nan),
        Candidate("huge", 2**70, 1.0),
        None,  # type: ignore[list-item]
    ]
    plan = plan_shards(spec, cands)
    assert [a.peer_id for a in plan.assignments] == ["ok"]


def test_duplicate_peer_keeps_the_smaller_claim():
    spec = model(layers=10)
    cands = [Candidate("a", 100 * MB, 1.0), Candidate("a", 5 * MB, 1.0), Candidate("b", 8 * MB, 1)]
    plan = plan_shards(spec, cands, memory_fraction=1.0)
    assert plan.by_peer()["a"].layers <= 5
    check_plan(spec, [cands[1], cands[2]], plan, 1.0)


def test_bad_arguments_raise_plan_error():
    spec = model()
    cands = [Candidate("a", 100 * MB, 1.0)]
    for kwargs in ({"replicas": 0}, {"replicas": 1.5}, {"memory_fraction": 0}, {"max_nodes": 0}):
        with pytest.raises(PlanError):
            plan_shards(spec, cands, **kwargs)
    with pytest.raises(PlanError):
        plan_shards(ModelSpec("m", 0, 1, 0, 0), cands)
    with pytest.raises(PlanError):
        plan_shards(ModelSpec("m", 3, -1, 0, 0), cands)
    with pytest.raises(PlanError, match="at most one per layer"):
        plan_with_nodes(model(layers=2), cands * 3, 3)


def test_deterministic_whatever_the_input_order():
    spec = model(layers=40, embed=3 * MB, head=2 * MB)
    cands = [
        Candidate(f"p{i}", (10 + (i * 7) % 13) * MB, 1.0 + (i % 3), rtt_ms=float(i % 4))
        for i in range(12)
    ]
    cands.append(Candidate("tie", cands[0].free_bytes, cands[0].throughput, cands[0].rtt_ms))
    expected = plan_shards(spec, cands, replicas=3)
    rng = random.Random(7)
    for _ in range(20):
        shuffled = cands[:]
        rng.shuffle(shuffled)
        assert plan_shards(spec, shuffled, replicas=3) == expected


def test_max_nodes_gives_exactly_that_many_contiguous_ranges():
    spec = model(layers=24)
    cands = [Candidate(f"n{i}", (20 + i) * MB, 1.0) for i in range(6)]
    plan = plan_shards(spec, cands, max_nodes=3)
    assert len(plan.assignments) == 3
    check_plan(spec, cands, plan, 0.9)
    # the three largest are chosen
    assert {a.peer_id for a in plan.assignments} == {"n3", "n4", "n5"}
    assert plan_with_nodes(spec, cands, 3) == plan


def test_plan_with_nodes_is_strict():
    spec = model(layers=8)
    cands = [Candidate("a", 100 * MB, 1.0), Candidate("b", 100 * MB, 1.0)]
    with pytest.raises(PlanError, match="exactly 3"):
        plan_with_nodes(spec, cands, 3)
    assert len(plan_with_nodes(spec, cands, 2).assignments) == 2
    assert len(plan_with_nodes(spec, cands, 1).assignments) == 1


def test_max_nodes_too_few_for_the_model():
    spec = model(layers=20)
    cands = [Candidate(f"n{i}", 8 * MB, 1.0) for i in range(4)]
    assert plan_shards(spec, cands).replicas == 1
    with pytest.raises(PlanError, match="the 2 largest hold only"):
        plan_shards(spec, cands, max_nodes=2)


def test_plan_json_round_trip_and_validation():
    spec = model(layers=12)
    cands = [Candidate(f"n{i}", 8 * MB, 1.0) for i in range(4)]
    plan = plan_shards(spec, cands, replicas=2)
    assert Plan.from_json(plan.to_json()) == plan
    bad = plan.to_json()
    bad["assignments"][0]["end"] = 99
    with pytest.raises(PlanError, match="start < end"):
        Plan.from_json(bad)
    for raw in (None, [], {"model": "m"}, {**plan.to_json(), "assignments": "x"}):
        with pytest.raises(PlanError):
            Plan.from_json(raw)
    dup = plan.to_json()
    dup["assignments"][1]["peer_id"] = dup["assignments"][0]["peer_id"]
    with pytest.raises(PlanError, match="two ranges"):
        Plan.from_json(dup)


def test_coverage_infers_layers_without_num_layers():
    plan = Plan("m", [Assignment("a", 0, 3), Assignment("b", 2, 5)], 1)
    assert plan.coverage() == [1, 1, 2, 1, 1]
    assert plan.min_coverage() == 1
    assert Plan("m", [], 1).min_coverage() == 0


candidates_st = st.lists(
    st.builds(
        Candidate,
        peer_id=st.sampled_from([f"p{i}" for i in range(10)]),
        free_bytes=st.integers(0, 60),
        throughput=st.floats(0.1, 10.0),
        rtt_ms=st.one_of(st.none(), st.floats(0, 100)),
    ),
    max_size=10,
)


@settings(max_examples=300, deadline=None)
@given(
    layers=st.integers(1, 12),
    layer=st.integers(0, 5),
    embed=st.integers(0, 12),
    head=st.integers(0, 12),
    cache=st.integers(0, 2),
    cands=candidates_st,
    replicas=st.integers(1, 3),
    max_nodes=st.one_of(st.none(), st.integers(1, 4)),
    fraction=st.sampled_from([0.5, 0.9, 1.0]),
)
def test_property_plans_are_valid(
    layers, layer, embed, head, cache, cands, replicas, max_nodes, fraction
):
    spec = ModelSpec("m", layers, layer, embed, head, cache)
    # keep the smallest claim per peer id, as the planner does
    kept: dict[str, Candidate] = {}
    for c in cands:
        old = kept.get(c.peer_id)
        if old is None or (c.free_bytes, c.throughput) < (old.free_bytes, old.throughput):
            kept[c.peer_id] = c
    budgets = {p: math.floor(fraction * c.free_bytes) for p, c in kept.items()}
    try:
        plan = plan_shards(
            spec, cands, replicas=replicas, max_nodes=max_nodes, memory_fraction=fraction
        )
    except PlanError as exc:
        assert "needs" in str(exc)
        # Not even one copy: then no single node could have held it all.
        assert all(b < spec.total_bytes for b in budgets.values())
        return
    check_plan(spec, list(kept.values()), plan, fraction)
    assert plan.replicas <= replicas
    if max_nodes is not None:
        assert all(len(chain) <= max_nodes for chain in plan.chains())
    shuffled = cands[::-1]
    assert (
        plan_shards(
            spec, shuffled, replicas=replicas, max_nodes=max_nodes, memory_fraction=fraction
        )
        == plan
    )
