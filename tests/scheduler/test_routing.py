"""Route finding: cheapest chain, partial ranges, dead servers, failover, errors, properties."""

from __future__ import annotations

import math
import random
from functools import cache

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from scheduler.routing import NoRouteError, Server, Span, find_route, route_cost


def S(peer: str, start: int, end: int, ms: float = 1.0, rtt: float = 10.0, alive: bool = True):
    return Server(peer, start, end, ms, rtt, alive)


def test_picks_the_cheaper_of_two_covering_chains():
    servers = [
        S("a1", 0, 4, ms=5.0),
        S("a2", 4, 8, ms=5.0),
        S("b1", 0, 4, ms=1.0),
        S("b2", 4, 8, ms=1.0),
    ]
    route = find_route(servers, 8)
    assert route == [Span("b1", 0, 4), Span("b2", 4, 8)]
    assert route_cost(route, servers) == pytest.approx(10 + 4 + 10 + 4)


def test_one_slow_server_loses_to_two_fast_hops_only_when_cheaper():
    whole = S("whole", 0, 8, ms=3.0, rtt=10.0)  # 34 ms
    halves = [S("h1", 0, 4, ms=1.0, rtt=10.0), S("h2", 4, 8, ms=1.0, rtt=10.0)]  # 28 ms
    assert [s.peer_id for s in find_route([whole, *halves], 8)] == ["h1", "h2"]
    far = [S("h1", 0, 4, ms=1.0, rtt=20.0), S("h2", 4, 8, ms=1.0, rtt=20.0)]  # 48 ms
    assert find_route([whole, *far], 8) == [Span("whole", 0, 8)]


def test_prefers_fewer_hops_on_equal_cost():
    servers = [S("a", 0, 4, rtt=5.0), S("b", 4, 8, rtt=5.0), S("c", 0, 8, ms=1.0, rtt=10.0)]
    assert find_route(servers, 8) == [Span("c", 0, 8)]  # 18 ms either way


def test_prefers_fewer_hops_despite_float_noise():
    servers = [S("a", 0, 1, ms=0.0, rtt=0.1), S("b", 1, 2, ms=0.0, rtt=0.2)]
    servers.append(S("c", 0, 2, ms=0.0, rtt=0.3))  # 0.1 + 0.2 != 0.3 in floats
    assert find_route(servers, 2) == [Span("c", 0, 2)]


def test_enters_a_server_inside_its_range():
    servers = [S("a", 0, 6, ms=1.0), S("b", 3, 10, ms=1.0), S("fast", 2, 5, ms=0.1, rtt=1.0)]
    route = find_route(servers, 10)
    assert route[0].peer_id == "a" and route[0].start == 0
    for span in route:
        host = next(s for s in servers if s.peer_id == span.peer_id)
        assert host.start <= span.start < span.end <= host.end
    assert route == [Span("a", 0, 2), Span("fast", 2, 5), Span("b", 5, 10)]


def test_partial_ranges_overlap():
    servers = [S("a", 0, 5), S("b", 3, 8), S("c", 6, 12)]
    route = find_route(servers, 12)
    assert [s.peer_id for s in route] == ["a", "b", "c"]
    assert route[0].start == 0 and route[-1].end == 12
    assert all(x.end == y.start for x, y in zip(route, route[1:], strict=False))


def test_skips_dead_and_excluded_servers_and_finds_the_replica():
    servers = [
        S("a", 0, 4, rtt=1.0),
        S("b", 4, 8, rtt=1.0, alive=False),
        S("b2", 4, 8, rtt=30.0),
        S("c", 0, 8, ms=10.0, rtt=1.0),
    ]
    assert find_route(servers, 8) == [Span("a", 0, 4), Span("b2", 4, 8)]
    # without b2, a is still the cheap way into layers 0-3 and c serves the rest
    assert find_route(servers, 8, exclude={"b2"}) == [Span("a", 0, 4), Span("c", 4, 8)]
    assert find_route(servers, 8, exclude="b2") == [Span("a", 0, 4), Span("c", 4, 8)]
    assert find_route(servers, 8, exclude={"a", "b2"}) == [Span("c", 0, 8)]


def test_failover_reroutes_only_the_missing_span():
    servers = [S("a", 0, 4), S("b", 4, 8), S("c", 8, 12), S("b-replica", 4, 8, rtt=50.0)]
    assert [s.peer_id for s in find_route(servers, 12)] == ["a", "b", "c"]
    route = find_route(servers, 12, start=4, exclude={"b"})
    assert route == [Span("b-replica", 4, 8), Span("c", 8, 12)]


def test_failover_from_a_middle_layer_enters_a_replica_mid_range():
    servers = [S("a", 0, 6), S("b", 6, 12), S("wide", 0, 12, ms=2.0)]
    route = find_route(servers, 12, start=6, exclude={"b"})
    assert route == [Span("wide", 6, 12)]


def test_no_route_error_names_missing_layers_and_servers():
    servers = [
        S("a", 0, 3),
        S("b", 5, 8),
        S("dead", 3, 5, alive=False),
        S("gone", 3, 4),
        S("weird", 3, 5, ms=math.nan),
    ]
    with pytest.raises(NoRouteError) as info:
        find_route(servers, 10, exclude={"gone"})
    err = info.value
    msg = str(err)
    assert err.missing == [(3, 5), (8, 10)]
    assert err.first_missing == 3
    assert "layer(s) [3, 5), [8, 10)" in msg and "first missing: 3" in msg
    assert "a[0, 3)" in msg and "b[5, 8)" in msg
    assert "dead (dead)" in msg and "gone (excluded)" in msg and "weird (bad ms_per_layer)" in msg
    assert err.considered == ["a", "b"]


def test_no_route_error_for_a_single_missing_layer_and_no_servers():
    with pytest.raises(NoRouteError, match=r"layer\(s\) \[2\] \(first missing: 2\)"):
        find_route([S("a", 0, 2), S("b", 3, 4)], 4)
    with pytest.raises(NoRouteError, match="considered 0 server"):
        find_route([], 4)


def test_servers_forward_directly_with_hop_rtt():
    servers = [S("a", 0, 4, rtt=10.0), S("b", 4, 8, rtt=10.0), S("c", 4, 8, rtt=10.0)]
    near = {("a", "b"): 50.0, ("a", "c"): 2.0}

    def hop(x: str, y: str) -> float:
        return near.get((x, y), 100.0)

    route = find_route(servers, 8, hop_rtt=hop)
    assert route == [Span("a", 0, 4), Span("c", 4, 8)]
    # one-way legs: 10/2 in, 2/2 a->c, 10/2 back, and 8 layers at 1 ms
    assert route_cost(route, servers, hop_rtt=hop) == pytest.approx(5 + 1 + 5 + 8)


def test_hop_rtt_inf_is_no_edge_and_nan_falls_back_to_the_client():
    servers = [S("a", 0, 4, rtt=10.0), S("b", 4, 8, rtt=10.0)]
    with pytest.raises(NoRouteError, match="no chain of reachable servers gets past layer 4"):
        find_route(servers, 8, hop_rtt=lambda x, y: math.inf)
    for odd in (math.nan, -1.0, "x", None):
        route = find_route(servers, 8, hop_rtt=lambda x, y, odd=odd: odd)
        assert route_cost(route, servers, hop_rtt=lambda x, y, odd=odd: odd) == pytest.approx(
            5 + 10 + 5 + 8
        )


def test_odd_servers_are_skipped_not_fatal():
    servers = [
        S("ok", 0, 4),
        S("neg", 0, 4, rtt=-1.0),
        S("inf", 0, 4, ms=math.inf),
        S("range", 3, 2),
        S("beyond", 0, 99, ms=0.0, rtt=0.0),
        S("", 0, 4),
        Server("bool", True, 4, 1.0, 1.0),  # type: ignore[arg-type]
        Server("alive", 0, 4, 1.0, 1.0, alive="yes"),  # type: ignore[arg-type]
        Server(["x"], 0, 4, 1.0, 1.0),  # type: ignore[arg-type]
        "not a server",
        None,
    ]
    assert find_route(servers, 4) == [Span("ok", 0, 4)]


def test_bad_arguments():
    with pytest.raises(ValueError):
        find_route([S("a", 0, 4)], 0)
    with pytest.raises(ValueError):
        find_route([S("a", 0, 4)], 4, start=4)
    with pytest.raises(ValueError):
        find_route([S("a", 0, 4)], 4, start=-1)


def test_deterministic_whatever_the_input_order():
    rng = random.Random(3)
    servers = [
        S(f"s{i}", a, a + rng.randint(1, 5), ms=rng.choice([1.0, 2.0]), rtt=rng.choice([5.0, 10.0]))
        for i, a in enumerate(rng.randint(0, 10) for _ in range(30))
    ]
    servers = [s for s in servers if s.end <= 12] + [S("z", 0, 12, ms=5.0)]
    expected = find_route(servers, 12)
    for _ in range(20):
        rng.shuffle(servers)
        assert find_route(servers, 12) == expected


def test_route_cost_of_impossible_routes_is_inf():
    servers = [S("a", 0, 4)]
    assert route_cost([Span("a", 0, 5)], servers) == math.inf
    assert route_cost([Span("x", 0, 4)], servers) == math.inf
    assert route_cost([Span("a", 2, 2)], servers) == math.inf


def test_many_servers_stay_fast():
    servers = [
        S(f"s{i:04d}", i % 61, i % 61 + 20, ms=1.0 + i % 7, rtt=float(i % 13)) for i in range(2000)
    ]
    route = find_route(servers, 80)
    assert route[0].start == 0 and route[-1].end == 80


# ---- properties -------------------------------------------------------------------------

N_MAX = 8


@st.composite
def swarms(draw, with_hops: bool = False, allow_inf: bool = False):
    n = draw(st.integers(1, N_MAX))
    count = draw(st.integers(0, 7))
    servers = []
    for i in range(count):
        a = draw(st.integers(0, n - 1))
        b = draw(st.integers(a + 1, n))
        ms = draw(st.sampled_from([0.0, 0.5, 1.0, 2.5, 7.0]))
        rtt = draw(st.sampled_from([0.0, 1.0, 3.3, 10.0]))
        servers.append(Server(f"s{i}", a, b, ms, rtt, draw(st.booleans()) or i % 2 == 0))
    start = draw(st.integers(0, n - 1))
    exclude = draw(st.sets(st.sampled_from([f"s{i}" for i in range(8)]), max_size=2))
    hop = None
    if with_hops:
        values = [0.0, 0.7, 2.0, 20.0] + ([math.inf] if allow_inf else [])
        table = {
            (f"s{i}", f"s{j}"): draw(st.sampled_from(values))
            for i in range(count)
            for j in range(count)
        }

        def hop(x: str, y: str) -> float:
            return table[(x, y)]

    return n, servers, start, exclude, hop


def usable(servers, exclude):
    return [s for s in servers if s.alive and s.peer_id not in exclude]


def covered(servers, n, start, exclude):
    live = usable(servers, exclude)
    return all(any(s.start <= layer < s.end for s in live) for layer in range(start, n))


def brute_force(servers, n, start, exclude, hop) -> float:
    """Cheapest cost over every chain of (server, sub-range), an independent formulation."""
    live = usable(servers, exclude)

    @cache
    def best(b: int, prev: int | None) -> float:
        if b == n:
            return 0.0 if hop is None else live[prev].rtt_ms / 2
        out = math.inf
        for i, s in enumerate(live):
            if not s.start <= b < s.end or (hop is not None and i == prev):
                continue
            if hop is None:
                enter = s.rtt_ms
            elif prev is None:
                enter = s.rtt_ms / 2
            else:
                value = hop(live[prev].peer_id, s.peer_id)
                if value == math.inf:
                    continue
                enter = value / 2
            for e in range(b + 1, s.end + 1):
                out = min(out, enter + s.ms_per_layer * (e - b) + best(e, i))
        return out

    return best(start, None)


def check_route(route, servers, n, start, exclude):
    live = usable(servers, exclude)
    assert route and route[0].start == start and route[-1].end == n
    for x, y in zip(route, route[1:], strict=False):
        assert x.end == y.start
    for span in route:
        assert span.start < span.end
        assert any(
            s.peer_id == span.peer_id and s.start <= span.start and span.end <= s.end for s in live
        )


@settings(max_examples=400, deadline=None)
@given(swarms())
def test_property_routes_are_valid_optimal_and_found_when_covered(case):
    n, servers, start, exclude, _ = case
    try:
        route = find_route(servers, n, start=start, exclude=exclude)
    except NoRouteError as err:
        assert not covered(servers, n, start, exclude)
        assert start <= err.first_missing < n
        layer = err.first_missing
        assert not any(s.start <= layer < s.end for s in usable(servers, exclude))
        return
    check_route(route, servers, n, start, exclude)
    best = brute_force(servers, n, start, exclude, None)
    assert route_cost(route, servers) == pytest.approx(best, abs=1e-3 * (n + len(route) + 2))


@settings(max_examples=300, deadline=None)
@given(swarms(with_hops=True))
def test_property_forwarding_routes_found_when_covered(case):
    n, servers, start, exclude, hop = case
    assume(hop is not None)
    if not covered(servers, n, start, exclude):
        with pytest.raises(NoRouteError):
            find_route(servers, n, start=start, exclude=exclude, hop_rtt=hop)
        return
    route = find_route(servers, n, start=start, exclude=exclude, hop_rtt=hop)
    check_route(route, servers, n, start, exclude)
    best = brute_force(servers, n, start, exclude, hop)
    cost = route_cost(route, servers, hop_rtt=hop)
    assert cost == pytest.approx(best, abs=1e-3 * (n + 2 * len(route) + 2))


@settings(max_examples=300, deadline=None)
@given(swarms(with_hops=True, allow_inf=True))
def test_property_forwarding_with_unreachable_pairs(case):
    n, servers, start, exclude, hop = case
    assume(hop is not None)
    best = brute_force(servers, n, start, exclude, hop)
    try:
        route = find_route(servers, n, start=start, exclude=exclude, hop_rtt=hop)
    except NoRouteError:
        assert best == math.inf
        return
    check_route(route, servers, n, start, exclude)
    cost = route_cost(route, servers, hop_rtt=hop)
    assert cost == pytest.approx(best, abs=1e-3 * (n + 2 * len(route) + 2))
