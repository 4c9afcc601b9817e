"""Placement over cluster members: coverage, memory, score terms and preference, RTT order."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.placement import (
    NodeFacts,
    Placement,
    PlacementError,
    PlacementRequest,
    PlacementWeights,
    place,
)
from scheduler.shard_plan import ModelSpec

KB = 1000


def spec(layers: int = 8, layer: int = KB, embed: int = 0, head: int = 0) -> ModelSpec:
    return ModelSpec("m", layers, layer, embed, head)


def used_bytes(model: ModelSpec, start: int, end: int) -> int:
    extra = (model.embed_bytes if start == 0 else 0) + (
        model.head_bytes if end == model.num_layers else 0
    )
    return (end - start) * model.per_layer_bytes + extra


def check(model: ModelSpec, nodes: list[NodeFacts], result: Placement, fraction: float) -> None:
    """Every replica covers [start, end) exactly once, contiguously, on disjoint nodes, and
    no node is given more than its budget."""
    free = {n.peer_id: n.free_bytes for n in nodes}
    peers = [a.peer_id for a in result.plan.assignments]
    assert len(peers) == len(set(peers))
    chains = result.plan.chains()
    assert len(chains) == result.plan.replicas >= 1
    for chain in chains:
        assert chain[0].start == result.start and chain[-1].end == result.end
        for left, right in itertools.pairwise(chain):
            assert left.end == right.start
        for a in chain:
            assert a.start < a.end
            assert used_bytes(model, a.start, a.end) <= math.floor(fraction * free[a.peer_id])
    counts = result.plan.coverage()[result.start : result.end]
    assert counts == [result.plan.replicas] * (result.end - result.start)
    chosen = {p for p, s in result.scores.items() if s.chosen}
    assert chosen == set(peers)
    for score in result.scores.values():
        assert math.isclose(score.total, sum(score.terms.values()), abs_tol=1e-9)


def test_memory_weighting_and_breakdown():
    model = spec(layers=9)
    nodes = [NodeFacts("small", 3 * KB, ms_per_layer=1.0), NodeFacts("big", 6 * KB, 1.0)]
    result = place(PlacementRequest(model), nodes, PlacementWeights(memory_fraction=1.0))
    assert {a.peer_id: a.layers for a in result.plan.assignments} == {"big": 6, "small": 3}
    check(model, nodes, result, 1.0)
    big, small = result.scores["big"], result.scores["small"]
    assert big.terms["memory"] == 1.0 and small.terms["memory"] == pytest.approx(0.5)
    assert big.terms["throughput"] == small.terms["throughput"] == 1.0
    assert "rtt_ms" in big.assumed and big.inputs["mean_rtt_ms"] == 50.0  # unknown_rtt_ms
    as_json = result.to_json()
    assert [s["peer_id"] for s in as_json["scores"]] == ["big", "small"]
    assert set(as_json["scores"][0]["terms"]) == {"memory", "throughput", "rtt", "energy", "carbon"}


def test_fewest_best_scored_nodes_are_used():
    model = spec(layers=4)
    nodes = [NodeFacts(f"n{i}", 10 * KB, ms_per_layer=1.0 + i) for i in range(4)]
    result = place(PlacementRequest(model), nodes)
    assert [a.peer_id for a in result.plan.assignments] == ["n0"]  # fastest, holds it alone
    two = place(PlacementRequest(model, replicas=2), nodes)
    assert [a.peer_id for a in two.plan.assignments] == ["n0", "n1"]
    assert [a.replica for a in two.plan.assignments] == [0, 1]


def test_energy_and_carbon_need_gpu_power_and_undeclared_values_are_the_worst():
    model = spec(layers=2)
    base = {"free_bytes": 10 * KB, "ms_per_layer": 1.0, "gpu_power_w": 300.0}
    green = NodeFacts("green", **base, energy_price_per_kwh=0.3, carbon_g_per_kwh=20.0)
    dirty = NodeFacts("dirty", **base, energy_price_per_kwh=0.1, carbon_g_per_kwh=800.0)
    quiet = NodeFacts("quiet", **base)  # declares nothing: assumed the worst declared
    cpu = NodeFacts("cpu", 10 * KB, 1.0, gpu_power_w=0.0)  # no GPUs: no GPU energy
    weights = PlacementWeights(memory=0, throughput=0, rtt=0, energy=0, carbon=1)
    result = place(PlacementRequest(model), [green, dirty, quiet, cpu], weights)
    assert result.plan.assignments[0].peer_id == "cpu"
    scores = result.scores
    assert scores["cpu"].terms["carbon"] == 0.0
    assert scores["green"].terms["carbon"] > scores["dirty"].terms["carbon"] == -1.0
    assert scores["quiet"].terms["carbon"] == -1.0
    assert set(scores["quiet"].assumed) >= {"energy_price_per_kwh", "carbon_g_per_kwh"}
    # green over dirty once the CPU node is gone
    assert (
        place(PlacementRequest(model), [green, dirty, quiet], weights).plan.assignments[0].peer_id
        == "green"
    )
    pricey = PlacementWeights(memory=0, throughput=0, rtt=0, energy=1, carbon=0)
    assert (
        place(PlacementRequest(model), [green, dirty, quiet], pricey).plan.assignments[0].peer_id
        == "dirty"
    )
    # 300 W x 1 ms per layer = 1/12000 Wh; at 0.3 per kWh
    assert scores["green"].inputs["energy_cost_per_layer"] == pytest.approx(
        300 * 1e-3 / 3.6e6 * 0.3
    )


def test_unknown_gpu_power_is_the_worst_known():
    model = spec(layers=2)
    known = NodeFacts("known", 10 * KB, 1.0, gpu_power_w=100.0, carbon_g_per_kwh=100.0)
    unknown = NodeFacts("unknown", 10 * KB, 1.0, gpu_power_w=None, carbon_g_per_kwh=100.0)
    weights = PlacementWeights(memory=0, throughput=0, rtt=0, energy=0, carbon=1)
    result = place(PlacementRequest(model), [known, unknown, NodeFacts("x", 0)], weights)
    assert result.scores["unknown"].inputs["gpu_power_w"] == 100.0
    assert "gpu_power_w" in result.scores["unknown"].assumed
    assert "x" in result.excluded and "too little free memory" in result.excluded["x"]


def test_rtt_between_hops_orders_the_middle_of_a_chain():
    # six nodes that must all be used; a line a-b-c-d-e-f is cheap, anything else dear
    model = spec(layers=6)
    line = "abcdef"
    near = {(x, y) for x, y in itertools.pairwise(line)}
    nodes = []
    for p in line:
        rtt = {q: (1.0 if (p, q) in near or (q, p) in near else 100.0) for q in line if q != p}
        nodes.append(NodeFacts(p, KB, ms_per_layer=1.0, rtt_ms=rtt))
    random.Random(3).shuffle(nodes)
    result = place(PlacementRequest(model), nodes, PlacementWeights(memory_fraction=1.0))
    check(model, nodes, result, 1.0)
    order = [a.peer_id for a in result.plan.chains()[0]]
    first, last = order[0], order[-1]
    # whatever the ends, the middle is the cheapest path between them
    hops = [result.scores[p].next_hop_rtt_ms for p in order[:-1]]
    best = min(
        sum(1.0 if (x, y) in near or (y, x) in near else 100.0 for x, y in itertools.pairwise(p))
        for p in ((first, *m, last) for m in itertools.permutations(set(line) - {first, last}))
    )
    assert sum(hops) == best
    assert result.scores[last].next_hop_rtt_ms is None


def test_measured_rtt_counts_against_a_far_node():
    model = spec(layers=2)
    near_a = NodeFacts("a", 10 * KB, 1.0, rtt_ms={"b": 2.0, "far": 90.0})
    near_b = NodeFacts("b", 10 * KB, 1.0, rtt_ms={"a": 2.0})
    far = NodeFacts("far", 10 * KB, 1.0, rtt_ms={"b": 110.0})
    result = place(PlacementRequest(model), [near_a, near_b, far])
    assert result.scores["far"].inputs["mean_rtt_ms"] == pytest.approx(100.0)
    assert result.scores["far"].terms["rtt"] == -1.0
    assert result.plan.assignments[0].peer_id in {"a", "b"}


def test_a_sub_range_carries_only_its_ends():
    model = spec(layers=10, embed=5 * KB, head=5 * KB)
    # a node with 4 KB can't hold the embedding, but a middle range [3, 7) fits on it
    nodes = [NodeFacts("small", 4 * KB, 1.0)]
    result = place(
        PlacementRequest(model, start=3, end=7), nodes, PlacementWeights(memory_fraction=1.0)
    )
    assert [(a.start, a.end) for a in result.plan.assignments] == [(3, 7)]
    check(model, nodes, result, 1.0)
    with pytest.raises(PlacementError, match="layers 0..4"):
        place(PlacementRequest(model, start=0, end=4), nodes, PlacementWeights(memory_fraction=1.0))
    tail = place(
        PlacementRequest(model, start=8),
        [NodeFacts("t", 7 * KB, 1.0)],
        PlacementWeights(memory_fraction=1.0),
    )
    assert [(a.start, a.end) for a in tail.plan.assignments] == [(8, 10)]


def test_max_nodes_per_chain_and_errors():
    model = spec(layers=6)
    nodes = [NodeFacts(f"n{i}", 2 * KB, 1.0) for i in range(4)]
    with pytest.raises(PlacementError, match="no chain of at most 2"):
        place(PlacementRequest(model), nodes, PlacementWeights(max_nodes_per_chain=2))
    ok = place(PlacementRequest(model), nodes, PlacementWeights(memory_fraction=1.0))
    assert len(ok.plan.assignments) == 3
    with pytest.raises(PlacementError, match="replicas"):
        place(PlacementRequest(model, replicas=0), nodes)
    with pytest.raises(PlacementError, match="start < end"):
        place(PlacementRequest(model, start=4, end=4), nodes)
    with pytest.raises(PlacementError, match="ends past"):
        place(PlacementRequest(model, end=7), nodes)
    with pytest.raises(PlacementError, match="weight rtt"):
        place(PlacementRequest(model), nodes, PlacementWeights(rtt=-1.0))
    with pytest.raises(PlacementError, match="NodeFacts"):
        place(PlacementRequest(model), ["n0"])  # type: ignore[list-item]


def test_odd_facts_are_left_out_with_a_reason():
    model = spec(layers=2)
    good = NodeFacts("good", 10 * KB, 1.0)
    odd = [
        NodeFacts("nan", 10 * KB, float("nan")),
        NodeFacts("neg", -1),
        NodeFacts("zero-ms", 10 * KB, 0.0),
        NodeFacts("huge-power", 10 * KB, 1.0, gpu_power_w=1e12),
        NodeFacts("bool", True),  # type: ignore[arg-type]
        NodeFacts("twice", 10 * KB, 1.0),
        NodeFacts("twice", 10 * KB, 2.0),
        NodeFacts("", 10 * KB, 1.0),
    ]
    result = place(PlacementRequest(model), [good, *odd])
    assert [a.peer_id for a in result.plan.assignments] == ["good"]
    assert set(result.excluded) == {"nan", "neg", "zero-ms", "huge-power", "bool", "twice", ""}
    assert result.excluded["twice"] == "listed twice"
    assert "ms_per_layer" in result.excluded["zero-ms"]
    # odd RTT values are ignored (taken as unmeasured), not trusted
    weird = NodeFacts("w", 10 * KB, 1.0, rtt_ms={"good": float("inf"), 5: 1.0})  # type: ignore[dict-item]
    scored = place(PlacementRequest(model), [good, weird]).scores
    assert scored["w"].inputs["mean_rtt_ms"] == 50.0


facts_st = st.builds(
    NodeFacts,
    peer_id=st.sampled_from([f"p{i}" for i in range(8)]),
    free_bytes=st.integers(0, 40),
    ms_per_layer=st.one_of(st.none(), st.floats(0.01, 100.0)),
    rtt_ms=st.dictionaries(st.sampled_from([f"p{i}" for i in range(8)]), st.floats(0, 200)),
    gpu_power_w=st.one_of(st.none(), st.floats(0, 700)),
    energy_price_per_kwh=st.one_of(st.none(), st.floats(0, 1)),
    carbon_g_per_kwh=st.one_of(st.none(), st.floats(0, 900)),
)
weights_st = st.builds(
    PlacementWeights,
    memory=st.floats(0, 5),
    throughput=st.floats(0, 5),
    rtt=st.floats(0, 5),
    energy=st.floats(0, 5),
    carbon=st.floats(0, 5),
    memory_fraction=st.sampled_from([0.5, 0.9, 1.0]),
    max_nodes_per_chain=st.integers(0, 4),
)


@settings(max_examples=300, deadline=None)
@given(
    layers=st.integers(1, 10),
    layer=st.integers(0, 4),
    embed=st.integers(0, 8),
    head=st.integers(0, 8),
    span=st.tuples(st.integers(0, 9), st.integers(1, 10)),
    nodes=st.lists(facts_st, max_size=8),
    replicas=st.integers(1, 3),
    weights=weights_st,
)
def test_property_every_layer_once_per_replica_within_memory(
    layers, layer, embed, head, span, nodes, replicas, weights
):
    model = ModelSpec("m", layers, layer, embed, head)
    start, end = min(span[0], layers - 1), min(max(span[1], span[0] + 1), layers)
    request = PlacementRequest(model, replicas=replicas, start=start, end=end)
    try:
        result = place(request, nodes, weights)
    except PlacementError as exc:
        assert "need" in str(exc)
        return
    usable = [n for n in nodes if n.peer_id not in result.excluded]
    check(model, usable, result, weights.memory_fraction)
    assert result.plan.replicas <= replicas
    if weights.max_nodes_per_chain:
        assert all(len(c) <= weights.max_nodes_per_chain for c in result.plan.chains())
    assert place(request, nodes[::-1], weights) == result  # the input order doesn't matter


@settings(max_examples=200, deadline=None)
@given(
    term=st.sampled_from(["memory", "throughput", "rtt", "energy", "carbon"]),
    ms=st.floats(0.1, 10.0),
    power=st.floats(1.0, 700.0),
    price=st.floats(0.01, 1.0),
    carbon=st.floats(1.0, 900.0),
    free=st.integers(20, 100),
    factor=st.floats(1.5, 4.0),
    weights=weights_st,
)
def test_property_a_better_scored_node_is_preferred(
    term, ms, power, price, carbon, free, factor, weights
):
    """Two nodes that each hold the whole model, the same but for one term in which one is
    better: the better one gets the chain whenever that term has weight."""
    model = spec(layers=2, layer=1)
    base = {
        "free_bytes": free,
        "ms_per_layer": ms,
        "gpu_power_w": power,
        "energy_price_per_kwh": price,
        "carbon_g_per_kwh": carbon,
    }
    better = dict(base)
    if term == "memory":
        better["free_bytes"] = int(free * factor)
    elif term == "throughput":
        better["ms_per_layer"] = ms / factor
    elif term == "energy":
        better["energy_price_per_kwh"] = price / factor
    elif term == "carbon":
        better["carbon_g_per_kwh"] = carbon / factor
    # named so that the peer id tie-break favours the worse node; `third` holds one layer
    # only, and is near the better node and far from the worse one (for the rtt term)
    good = NodeFacts("z-better", **better, rtt_ms={"third": 5.0 if term == "rtt" else 50.0})
    bad = NodeFacts("a-worse", **base, rtt_ms={"third": 50.0 * factor})
    third = NodeFacts("third", 2, ms)
    result = place(PlacementRequest(model), [bad, good, third], weights)
    scores = result.scores
    assert scores["z-better"].total >= scores["a-worse"].total
    weight = getattr(weights, term)
    if term == "throughput":  # the faster node also gets energy and carbon per layer lower
        weight = weights.throughput + weights.energy + weights.carbon
    if weight > 0.01:
        assert scores["z-better"].total > scores["a-worse"].total
        assert "a-worse" not in {a.peer_id for a in result.plan.assignments}
