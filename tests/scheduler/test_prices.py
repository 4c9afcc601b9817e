"""Prices in route finding and shard planning: a job's maximum leaves out dearer providers
(and those that declare no price), the error says how many, and at equal latency the cheaper
provider wins; price never makes a route slower or a plan worse on its own terms."""

from __future__ import annotations

import random

import pytest

from p2p.records import MAX_PRICE_PER_UNIT
from scheduler.routing import NoRouteError, Server, Span, find_route, route_cost
from scheduler.shard_plan import Candidate, ModelSpec, PlanError, plan_shards, plan_with_nodes


def S(peer: str, start: int, end: int, price: int | None, ms: float = 1.0, rtt: float = 10.0):
    return Server(peer, start, end, ms, rtt, price_per_unit=price)


# -- routing -------------------------------------------------------------------------------


def test_a_maximum_leaves_out_dearer_and_unpriced_servers():
    servers = [
        S("a-dear", 0, 8, price=9, ms=0.5),  # the fastest, but over the maximum
        S("b-none", 0, 8, price=None, ms=0.5),  # declares no price: cannot be paid
        S("c-ok", 0, 4, price=5),
        S("d-ok", 4, 8, price=0),
    ]
    assert find_route(servers, 8) == [Span("a-dear", 0, 8)]  # no maximum: the fastest
    route = find_route(servers, 8, max_price_per_unit=5)
    assert route == [Span("c-ok", 0, 4), Span("d-ok", 4, 8)]


def test_no_route_for_price_says_how_many_were_excluded_for_price():
    servers = [S("a", 0, 4, price=3), S("b", 4, 8, price=10), S("c", 4, 8, price=None)]
    with pytest.raises(NoRouteError) as err:
        find_route(servers, 8, max_price_per_unit=3)
    exc = err.value
    assert exc.priced_out == 2
    assert exc.missing == [(4, 8)]
    assert "2 server(s) excluded for price (over the maximum of 3 per unit" in str(exc)
    assert exc.skipped == {"b": "price 10 over the maximum 3", "c": "declares no price"}
    # without the maximum the same servers route, and the message of an unrelated gap has
    # no price note
    assert [s.peer_id for s in find_route(servers, 8)] == ["a", "b"]
    with pytest.raises(NoRouteError) as err:
        find_route(servers[:1], 8)
    assert err.value.priced_out == 0 and "price" not in str(err.value)


def test_at_equal_latency_the_cheaper_server_wins_whatever_the_peer_ids():
    # "a" sorts first, so without prices (or at equal prices) it wins the tie
    assert find_route([S("a", 0, 8, price=4), S("b", 0, 8, price=4)], 8) == [Span("a", 0, 8)]
    servers = [S("a", 0, 8, price=7), S("b", 0, 8, price=2)]
    for order in (servers, servers[::-1]):
        assert find_route(order, 8) == [Span("b", 0, 8)]
    # a declared price, however high, beats no price at equal latency
    unpriced = [S("a", 0, 8, price=None), S("b", 0, 8, price=MAX_PRICE_PER_UNIT)]
    assert find_route(unpriced, 8) == [Span("b", 0, 8)]


def test_price_is_only_a_tie_break_a_faster_route_wins_however_dear():
    servers = [S("fast", 0, 8, price=1000, ms=1.0), S("cheap", 0, 8, price=0, ms=1.001)]
    assert find_route(servers, 8) == [Span("fast", 0, 8)]


def test_price_breaks_ties_before_the_number_of_hops():
    whole = S("whole", 0, 8, price=5, rtt=20.0)  # 20 + 8 = 28 ms, one hop
    halves = [S("h1", 0, 4, price=1), S("h2", 4, 8, price=1)]  # 10 + 4 + 10 + 4 = 28 ms
    assert find_route([whole, *halves], 8) == [Span("h1", 0, 4), Span("h2", 4, 8)]
    # at equal prices fewer hops still win, as before prices
    same = [S("whole", 0, 8, price=1, rtt=20.0), *halves]
    assert find_route(same, 8) == [Span("whole", 0, 8)]


def test_the_cheaper_mix_of_spans_wins_with_forwarding_between_servers():
    # two replicas of each half, equally fast: the cheapest of the four chains is chosen
    servers = [
        S("a1", 0, 4, price=3),
        S("b1", 0, 4, price=1),
        S("a2", 4, 8, price=1),
        S("b2", 4, 8, price=3),
    ]
    route = find_route(servers, 8, hop_rtt=lambda a, b: 10.0)
    assert route == [Span("b1", 0, 4), Span("a2", 4, 8)]


def test_failover_keeps_to_the_maximum():
    servers = [S("a", 0, 8, price=1), S("b", 4, 8, price=9), S("c", 4, 8, price=2)]
    route = find_route(servers, 8, start=4, exclude={"a"}, max_price_per_unit=2)
    assert route == [Span("c", 4, 8)]
    with pytest.raises(NoRouteError) as err:
        find_route(servers, 8, start=4, exclude={"a", "c"}, max_price_per_unit=2)
    assert err.value.priced_out == 1


@pytest.mark.parametrize("price", [-1, 1.5, True, "3", MAX_PRICE_PER_UNIT + 1])
def test_a_server_with_a_bad_price_is_skipped_not_fatal(price):
    servers = [Server("odd", 0, 8, 0.1, 1.0, price_per_unit=price), S("ok", 0, 8, price=1)]
    assert find_route(servers, 8) == [Span("ok", 0, 8)]
    with pytest.raises(NoRouteError) as err:
        find_route(servers[:1], 8)
    assert err.value.skipped == {"odd": "bad price"}


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_a_bad_maximum_is_refused(bad):
    with pytest.raises(ValueError, match="max_price_per_unit"):
        find_route([S("a", 0, 8, price=1)], 8, max_price_per_unit=bad)


def _money(route: list[Span], servers: list[Server]) -> int:
    price = {s.peer_id: s.price_per_unit for s in servers}
    return sum((span.end - span.start) * price[span.peer_id] for span in route)


@pytest.mark.parametrize("forwarding", [False, True])
def test_random_prices_never_slow_a_route_and_the_cheapest_fastest_is_found(forwarding):
    """Prices pick among the fastest routes only: the route with prices costs the same time
    as the route without, and no route found by dropping a dearer server is both as fast
    and cheaper. Speeds are few and coarse so that ties are common."""
    rng = random.Random(14)
    hop = (lambda a, b: 4.0) if forwarding else None
    for _ in range(200):
        n = rng.randint(2, 8)
        servers = []
        for index in range(rng.randint(1, 7)):
            start = rng.randrange(n)
            end = rng.randint(start + 1, n)
            ms, rtt = rng.choice([1.0, 2.0]), rng.choice([2.0, 4.0])
            servers.append(S(f"p{index}", start, end, price=rng.randint(0, 5), ms=ms, rtt=rtt))
        try:
            unpriced = [
                Server(s.peer_id, s.start, s.end, s.ms_per_layer, s.rtt_ms) for s in servers
            ]
            plain = find_route(unpriced, n, hop_rtt=hop)
        except NoRouteError:
            with pytest.raises(NoRouteError):
                find_route(servers, n, hop_rtt=hop)
            continue
        route = find_route(servers, n, hop_rtt=hop)
        fastest = route_cost(plain, servers, hop_rtt=hop)
        assert route_cost(route, servers, hop_rtt=hop) == pytest.approx(fastest)
        for dropped in {span.peer_id for span in route}:
            try:
                other = find_route(servers, n, hop_rtt=hop, exclude={dropped})
            except NoRouteError:
                continue
            if route_cost(other, servers, hop_rtt=hop) == pytest.approx(fastest):
                assert _money(other, servers) >= _money(route, servers)
        cap = rng.randint(0, 5)
        try:
            capped = find_route(servers, n, hop_rtt=hop, max_price_per_unit=cap)
        except NoRouteError as exc:
            assert exc.priced_out == sum(1 for s in servers if s.price_per_unit > cap)
            continue
        by_peer = {s.peer_id: s for s in servers}
        assert all(by_peer[span.peer_id].price_per_unit <= cap for span in capped)


# -- planning ------------------------------------------------------------------------------

MB = 1000


def spec(layers: int = 8) -> ModelSpec:
    return ModelSpec("m", layers, MB, 0, 0)


def C(peer: str, price: int | None, free: int = 100 * MB, throughput: float = 1.0):
    return Candidate(peer, free, throughput, price_per_unit=price)


def test_the_planner_leaves_out_candidates_over_the_maximum():
    cands = [C("a", 9, free=1000 * MB), C("b", None, free=1000 * MB), C("c", 2), C("d", 3)]
    assert {a.peer_id for a in plan_shards(spec(), cands).assignments} >= {"a", "b"}
    plan = plan_shards(spec(), cands, max_price_per_unit=3)
    assert {a.peer_id for a in plan.assignments} == {"c", "d"}
    exact = plan_with_nodes(spec(), cands, 2, max_price_per_unit=3)
    assert {a.peer_id for a in exact.assignments} == {"c", "d"}


def test_no_plan_for_price_says_how_many_were_excluded_for_price():
    cands = [C("a", 9), C("b", None), C("c", 2, free=3 * MB)]
    with pytest.raises(PlanError) as err:
        plan_shards(spec(), cands, max_price_per_unit=2)
    assert "2 candidate(s) excluded for price (over the maximum of 2 per unit" in str(err.value)
    with pytest.raises(PlanError) as err:
        plan_with_nodes(spec(), cands, 2, max_price_per_unit=2)
    assert "2 candidate(s) excluded for price" in str(err.value)
    with pytest.raises(PlanError) as err:  # no maximum: no price note
        plan_shards(spec(), [C("c", 2, free=3 * MB)])
    assert "price" not in str(err.value)


def test_among_equal_candidates_the_cheaper_are_chosen_whatever_the_peer_ids():
    # equal memory, speed and rtt: without prices "a" and "b" (first by peer id) are chosen
    free = [C("a", None), C("b", None), C("c", None), C("d", None)]
    assert {a.peer_id for a in plan_with_nodes(spec(), free, 2).assignments} == {"a", "b"}
    priced = [C("a", 5), C("b", 4), C("c", 1), C("d", 0)]
    for order in (priced, priced[::-1]):
        plan = plan_with_nodes(spec(), order, 2)
        assert {a.peer_id for a in plan.assignments} == {"c", "d"}
    # any declared price goes before no price
    mixed = [C("a", None), C("b", None), C("c", MAX_PRICE_PER_UNIT), C("d", 7)]
    assert {a.peer_id for a in plan_with_nodes(spec(), mixed, 2).assignments} == {"c", "d"}


def test_price_does_not_outweigh_capacity():
    cands = [C("big", 100, free=1000 * MB, throughput=2.0), C("small", 0)]
    plan = plan_with_nodes(spec(), cands, 1)
    assert [a.peer_id for a in plan.assignments] == ["big"]


@pytest.mark.parametrize("price", [-1, 1.5, True, "3", MAX_PRICE_PER_UNIT + 1])
def test_a_candidate_with_a_bad_price_is_ignored_as_invalid(price):
    cands = [Candidate("odd", 1000 * MB, 9.0, price_per_unit=price), C("ok", 1)]
    assert [a.peer_id for a in plan_shards(spec(), cands).assignments] == ["ok"]
    with pytest.raises(PlanError, match="1 candidate\\(s\\) ignored as invalid"):
        plan_shards(spec(), cands[:1])


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
def test_the_planner_refuses_a_bad_maximum(bad):
    with pytest.raises(PlanError, match="max_price_per_unit"):
        plan_shards(spec(), [C("a", 1)], max_price_per_unit=bad)
