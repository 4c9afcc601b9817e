"""The planner's KV-cache reserve: a node whose free memory holds a range's weights but not
the keys and values its sessions will write there gets fewer layers; a sliding-window layer
reserves at most its window; where full and sliding layers mix, every range fits wherever
it lies in the chain (`scheduler.model_memory.LayerCosts`)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.model_memory import (
    DEFAULT_KV_RESERVE_TOKENS,
    FIRST,
    LAST,
    MAX_EXACT_LAYERS,
    MIDDLE,
    LayerCosts,
)
from scheduler.placement import (
    NodeFacts,
    PlacementError,
    PlacementRequest,
    PlacementWeights,
    place,
)
from scheduler.shard_plan import Candidate, ModelSpec, PlanError, plan_shards, plan_with_nodes

MB = 1000
KV = 10  # bytes of one position's keys and values in one layer


def spec(layers: int = 12, windows: tuple[int | None, ...] = (), **sizes: int) -> ModelSpec:
    return ModelSpec(
        "m",
        layers,
        sizes.get("layer", 10 * MB),
        sizes.get("embed", 0),
        sizes.get("head", 0),
        kv_bytes_per_token=sizes.get("kv", KV),
        layer_windows=windows,
    )


def layers_of(plan) -> dict[str, tuple[int, int]]:
    return {a.peer_id: (a.start, a.end) for a in plan.assignments}


def check_fits(model: ModelSpec, tokens: int, budgets: dict[str, int], assignments) -> None:
    """Each range, with its layers' weights and KV-cache reserve, within its node's budget."""
    costs = LayerCosts.of(model, tokens)
    for a in assignments:
        assert costs.range_bytes(a.start, a.end) <= budgets[a.peer_id], (a, budgets)


CANDS = [Candidate("a", 60 * MB, 4.0), Candidate("b", 300 * MB, 1.0)]  # "a": fast and small


def test_the_reserve_gives_a_node_that_fits_only_the_weights_fewer_layers():
    model = spec()  # 12 layers of 10 MB; 1000 tokens reserve 10 MB more per layer
    weights_only = plan_shards(model, CANDS, memory_fraction=1.0, kv_reserve_tokens=0)
    reserved = plan_shards(model, CANDS, memory_fraction=1.0, kv_reserve_tokens=1000)
    assert layers_of(weights_only) == {"b": (0, 7), "a": (7, 12)}  # 5 x 10 MB in 60 MB
    assert layers_of(reserved) == {"b": (0, 9), "a": (9, 12)}  # 3 x 20 MB in 60 MB
    check_fits(model, 1000, {"a": 60 * MB, "b": 300 * MB}, reserved.assignments)
    # the weights-only plan would have overfilled "a" once its sessions' caches grow
    with pytest.raises(AssertionError):
        check_fits(model, 1000, {"a": 60 * MB, "b": 300 * MB}, weights_only.assignments)
    # the same in plan_with_nodes, and the reserve by default
    assert layers_of(plan_with_nodes(model, CANDS, 2, kv_reserve_tokens=1000, memory_fraction=1.0))[
        "a"
    ] == (9, 12)
    thin = spec(kv=1)  # 4096 bytes per layer by default
    default = plan_shards(thin, CANDS, memory_fraction=1.0)
    assert default == plan_shards(
        thin, CANDS, memory_fraction=1.0, kv_reserve_tokens=DEFAULT_KV_RESERVE_TOKENS
    )
    assert LayerCosts.of(thin).layers == (10 * MB + DEFAULT_KV_RESERVE_TOKENS,) * 12
    assert LayerCosts.of(model).layers[0] == 10 * MB + KV * DEFAULT_KV_RESERVE_TOKENS


def test_a_node_that_holds_no_layer_with_its_reserve_is_left_out():
    model = spec(layers=4)
    cands = [Candidate("a", 15 * MB, 1.0), Candidate("b", 100 * MB, 1.0)]
    assert layers_of(plan_with_nodes(model, cands, 2, memory_fraction=1.0, kv_reserve_tokens=0))
    with pytest.raises(PlanError, match=r"KV-cache reserve 40000 \(1000 tokens per layer"):
        plan_with_nodes(model, cands, 2, memory_fraction=1.0, kv_reserve_tokens=1000)
    assert layers_of(plan_shards(model, cands, memory_fraction=1.0, kv_reserve_tokens=1000)) == {
        "b": (0, 4)
    }


def test_sliding_layers_reserve_at_most_their_window():
    sliding = spec(windows=(100,) * 12)  # a window of 100 positions: 1 KB per layer
    full = spec()
    assert LayerCosts.of(sliding, 1000).layers == (11 * MB,) * 12
    assert LayerCosts.of(full, 1000).layers == (20 * MB,) * 12
    assert LayerCosts.of(sliding, 50).layers == (10 * MB + 500,) * 12  # under the window
    plan = plan_shards(sliding, CANDS, memory_fraction=1.0, kv_reserve_tokens=1000)
    assert layers_of(plan) == {"b": (0, 7), "a": (7, 12)}  # 5 x 11 MB in 60 MB
    check_fits(sliding, 1000, {"a": 60 * MB, "b": 300 * MB}, plan.assignments)


def test_mixed_layers_are_counted_where_they_lie():
    # S F S F ...: 11 MB and 20 MB alternately, with 1000 tokens
    mixed = spec(windows=(100, None) * 6)
    costs = LayerCosts.of(mixed, 1000)
    assert costs.layers[:4] == (11 * MB, 20 * MB, 11 * MB, 20 * MB)
    assert costs.total == 6 * 31 * MB
    # 62 MB: from layer 0, S F S F = 62 fits; at the end F S F S... the last 4 are S F S F
    assert costs.fit(62 * MB, FIRST) == 4 and costs.fit(62 * MB, LAST) == 4
    # anywhere: the worst 4 consecutive layers also take 62, the worst 3 take F S F = 51
    assert costs.fit(62 * MB, MIDDLE) == 4 and costs.fit(61 * MB, MIDDLE) == 3
    assert costs.fit(51 * MB, MIDDLE) == 3 and costs.fit(50 * MB, MIDDLE) == 2
    assert costs.fit(50 * MB, FIRST) == 3  # S F S = 42 from the start
    assert costs.fit(-1) == -1 and costs.fit(0) == 0
    plan = plan_shards(mixed, CANDS, memory_fraction=1.0, kv_reserve_tokens=1000)
    assert layers_of(plan) == {"b": (0, 9), "a": (9, 12)}  # F S F = 51 MB
    check_fits(mixed, 1000, {"a": 60 * MB, "b": 300 * MB}, plan.assignments)


def test_a_long_profile_is_counted_at_its_largest_layer_in_the_middle():
    n = MAX_EXACT_LAYERS + 2
    costs = LayerCosts.of(spec(layers=n, windows=(100, None) * (n // 2)), 1000)
    assert costs.fit(100 * MB, MIDDLE) == 5  # 5 x 20 MB, never more (safe, not exact)
    assert costs.fit(100 * MB, FIRST) == 6  # the ends stay exact: S F S F S F = 93


@settings(max_examples=200, deadline=None)
@given(
    costs=st.lists(st.integers(0, 50), min_size=1, max_size=12),
    room=st.integers(-3, 400),
)
def test_property_fits_are_the_most_layers_that_fit(costs, room):
    c = LayerCosts(tuple(costs), 0, 0)
    n = len(costs)

    def best(sums) -> int:
        return max((k for k in range(n + 1) if sums(k) <= room), default=-1) if room >= 0 else -1

    assert c.fit(room, FIRST) == best(lambda k: sum(costs[:k]))
    assert c.fit(room, LAST) == best(lambda k: sum(costs[n - k :]))
    worst = [max(sum(costs[s : s + k]) for s in range(n - k + 1)) for k in range(n + 1)]
    assert c.fit(room, MIDDLE) == best(lambda k: worst[k])
    assert c.total == sum(costs) and c.range_bytes(0, n) == sum(costs)


WINDOWS = st.lists(st.one_of(st.none(), st.integers(1, 300)), min_size=1, max_size=10)


@settings(max_examples=150, deadline=None)
@given(
    windows=WINDOWS,
    frees=st.lists(st.integers(5 * MB, 150 * MB), min_size=1, max_size=8),
    tokens=st.integers(0, 2000),
    embed=st.integers(0, 20 * MB),
    head=st.integers(0, 20 * MB),
)
def test_property_every_range_fits_with_its_reserve(windows, frees, tokens, embed, head):
    model = spec(len(windows), tuple(windows), embed=embed, head=head)
    cands = [Candidate(f"n{i}", free, 1.0 + i % 3) for i, free in enumerate(frees)]
    try:
        plan = plan_shards(model, cands, memory_fraction=1.0, kv_reserve_tokens=tokens)
    except PlanError:
        return
    check_fits(model, tokens, {c.peer_id: c.free_bytes for c in cands}, plan.assignments)
    assert plan.min_coverage() == 1


@settings(max_examples=100, deadline=None)
@given(
    windows=WINDOWS,
    frees=st.lists(st.integers(5 * MB, 90 * MB), min_size=4, max_size=8),
    tokens=st.integers(0, 2000),
    start=st.integers(0, 9),
    rtts=st.lists(st.floats(0.1, 100.0), min_size=64, max_size=64),
)
def test_property_placement_keeps_the_reserve_after_reordering(windows, frees, tokens, start, rtts):
    """place() orders a chain's middle nodes by RTT (each keeping its count of layers), and
    places sub-ranges when healing: every node's range still fits with its reserve."""
    model = spec(len(windows), tuple(windows), embed=3 * MB, head=4 * MB)
    start = min(start, model.num_layers - 1)
    peers = [f"n{i}" for i in range(len(frees))]
    pairs = itertools.cycle(rtts)
    nodes = [
        NodeFacts(p, free, 1.0, rtt_ms={q: next(pairs) for q in peers if q != p})
        for p, free in zip(peers, frees, strict=True)
    ]
    weights = PlacementWeights(memory_fraction=1.0, kv_reserve_tokens=tokens)
    try:
        result = place(PlacementRequest(model, start=start), nodes, weights)
    except PlacementError:
        return
    check_fits(model, tokens, dict(zip(peers, frees, strict=True)), result.plan.assignments)


def test_placement_counts_the_reserve_and_its_setting():
    model = spec(layers=4)
    nodes = [NodeFacts("small", 15 * MB), NodeFacts("big", 100 * MB)]
    loose = place(PlacementRequest(model), nodes, PlacementWeights(kv_reserve_tokens=0))
    assert {a.peer_id for a in loose.plan.assignments} == {"big"}  # one node is enough
    tight = place(
        PlacementRequest(model),
        nodes,
        PlacementWeights(memory_fraction=1.0, kv_reserve_tokens=1000),
    )
    assert "small" in tight.excluded and "weights and KV-cache reserve" in tight.excluded["small"]
    with pytest.raises(PlacementError, match="KV-cache reserve 40000 for 1000 tokens"):
        place(
            PlacementRequest(model),
            [NodeFacts("big", 79 * MB)],
            PlacementWeights(memory_fraction=1.0, kv_reserve_tokens=1000),
        )
    # healing layers 1..3 of a model whose layer 2 slides: only those layers' reserve counts
    healed = spec(layers=4, windows=(None, None, 100, None))
    result = place(
        PlacementRequest(healed, start=1, end=3),
        [NodeFacts("x", 31 * MB)],
        PlacementWeights(memory_fraction=1.0, kv_reserve_tokens=1000),
    )
    assert layers_of(result.plan) == {"x": (1, 3)}  # 20 MB + 11 MB
    with pytest.raises(PlacementError):
        place(
            PlacementRequest(healed, start=0, end=2),
            [NodeFacts("x", 31 * MB)],
            PlacementWeights(memory_fraction=1.0, kv_reserve_tokens=1000),
        )


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"layer_windows": (None,) * 3}, "one entry per layer"),
        ({"layer_windows": [None] * 4}, "one entry per layer"),
        ({"layer_windows": (None, 0, None, None)}, "layer_windows entries"),
        ({"layer_windows": (None, True, None, None)}, "layer_windows entries"),
        ({"layer_windows": (None, 2**40, None, None)}, "layer_windows entries"),
        ({"kv_bytes_per_token": -1}, "kv_bytes_per_token"),
        ({"kv_bytes_per_token": 1.5}, "kv_bytes_per_token"),
    ],
)
def test_bad_sizes_are_refused(changes, message):
    fields = {"kv_bytes_per_token": 1, "layer_windows": (), **changes}
    model = ModelSpec("m", 4, MB, 0, 0, **fields)
    with pytest.raises(PlanError, match=message):
        plan_shards(model, CANDS)


@pytest.mark.parametrize("tokens", [-1, 2**40, 1.0, True])
def test_bad_reserve_tokens_are_refused(tokens):
    with pytest.raises(PlanError, match="kv_reserve_tokens"):
        plan_shards(spec(), CANDS, kv_reserve_tokens=tokens)
    with pytest.raises(PlacementError, match="kv_reserve_tokens"):
        place(
            PlacementRequest(spec()),
            [NodeFacts("a", MB)],
            PlacementWeights(kv_reserve_tokens=tokens),
        )
