"""The coordinator's decisions without a network: shortfalls, surplus, scaling; the wire."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.cluster import coordinator_wire as wire
from daemon.cluster.coordinator_state import (
    Load,
    Scaler,
    ScalingSettings,
    Served,
    coverage,
    load_of,
    shortfalls,
    surplus,
)
from p2p import codec


def s(peer: str, start: int, end: int, **kw) -> Served:
    return Served(peer, start, end, **kw)


def test_shortfalls_are_the_runs_held_too_rarely():
    served = [s("a", 0, 2), s("b", 2, 6), s("c", 0, 3)]
    assert coverage(6, served) == [2, 2, 2, 1, 1, 1]
    assert shortfalls(6, served, 1) == []
    assert shortfalls(6, served, 2) == [(3, 6)]
    assert shortfalls(6, [s("a", 1, 2), s("b", 4, 5)], 1) == [(0, 1), (2, 4), (5, 6)]
    assert shortfalls(4, [], 1) == [(0, 4)]


def test_surplus_never_goes_below_the_target_and_takes_the_worst_first():
    served = [s("a", 0, 3), s("b", 3, 6), s("c", 0, 6), s("d", 0, 6)]
    gone = surplus(6, served, 1, ["a", "b", "c", "d"])
    assert [g.peer_id for g in gone] == ["a", "b", "c"]
    assert min(coverage(6, [x for x in served if x not in gone])) == 1
    # the worst first: d and c go before the chain a+b, which is needed for nothing
    gone = surplus(6, served, 2, ["d", "c", "a", "b"])
    assert [g.peer_id for g in gone] == ["d"]
    assert surplus(6, served, 3, ["a"]) == []
    # a pending assignment is never released (its announcement is on the way)
    assert surplus(6, [s("p", 0, 6, pending=True), s("q", 0, 6)], 1, ["p"]) == [s("q", 0, 6)]


@settings(max_examples=200, deadline=None)
@given(
    ranges=st.lists(st.tuples(st.integers(0, 7), st.integers(1, 8)), max_size=8),
    target=st.integers(1, 3),
)
def test_property_surplus_keeps_every_layer_at_the_target(ranges, target):
    served = [s(f"p{i}", a, max(b, a + 1)) for i, (a, b) in enumerate(ranges) if a < 8]
    before = coverage(8, served)
    gone = surplus(8, served, target, [x.peer_id for x in served])
    after = coverage(8, [x for x in served if x not in gone])
    assert all(a >= min(b, target) for a, b in zip(after, before, strict=True))


def busy(util: float = 0.9, queue: float = 0.0) -> Load:
    return Load(util, queue, 2)


def test_scaler_adds_after_sustained_load_and_removes_after_sustained_idleness():
    scaler = Scaler(ScalingSettings(up_after_s=30, down_after_s=120))
    assert scaler.observe(0, busy(), 1, 1, 3) is None
    assert scaler.observe(29, busy(), 1, 1, 3) is None
    up = scaler.observe(30, busy(), 1, 1, 3)
    assert up is not None and up[0] == 2 and "busy for 30 s" in up[1] and "0.90" in up[1]
    # the clock starts again after a change; a dip resets it
    assert scaler.observe(40, busy(), 2, 1, 3) is None
    assert scaler.observe(50, busy(0.5), 2, 1, 3) is None
    assert scaler.observe(79, busy(), 2, 1, 3) is None
    assert scaler.observe(100, busy(queue=5.0, util=0.2), 2, 1, 3) is None
    assert scaler.observe(110, busy(queue=5.0, util=0.2), 2, 1, 3)[0] == 3
    # never above the maximum
    assert scaler.observe(1000, busy(), 3, 1, 3) is None
    idle = Load(0.0, 0.0, 3)
    assert scaler.observe(1001, idle, 3, 1, 3) is None
    down = scaler.observe(1121, idle, 3, 1, 3)
    assert down is not None and down[0] == 2 and "idle for 120 s" in down[1]
    assert scaler.observe(1300, idle, 2, 1, 3) is None
    assert scaler.observe(1500, idle, 2, 1, 3)[0] == 1
    # never below the minimum
    assert scaler.observe(5000, idle, 1, 1, 3) is None
    # a target outside the bounds is brought back at once, with the reason
    assert scaler.observe(0, None, 5, 1, 3) == (3, "above the maximum of 3 instance(s)")
    assert scaler.observe(0, None, 1, 2, 3) == (2, "below the minimum of 2 instance(s)")
    # no load reported: nothing moves
    assert Scaler().observe(10_000, None, 2, 1, 3) is None


def test_load_is_the_mean_of_what_announced_servers_report():
    assert load_of([s("a", 0, 1, pending=True, utilisation=1.0)]) is None
    assert load_of([s("a", 0, 1)]) is None  # an older server: reports nothing
    load = load_of([s("a", 0, 1, utilisation=0.5, queue_length=4), s("b", 0, 1, utilisation=1.0)])
    assert load == Load(0.75, 2.0, 2)


def spec(**kw) -> wire.DeploySpec:
    return wire.DeploySpec("m", "/models/m", wire.ModelShape(4, 10, 5, 5), **kw)


def test_requests_and_bodies_are_typed_and_bounded():
    request = wire.DeployRequest("lab", spec(replicas=2, min_instances=1, max_instances=3))
    assert wire.decode_request(wire.encode_request(request)) == request
    assert spec(replicas=4, min_instances=1, max_instances=3).problem() is not None
    assert spec(min_instances=3, max_instances=2).problem() is not None
    bad = [
        (b"\xc1", "malformed"),
        (b"x" * (wire.MAX_REQUEST_BYTES + 1), "too_large"),
        (codec.encode({"op": "deploy", "cluster": "lab"}), "bad_request"),
        (codec.encode({"op": "nuke", "cluster": "lab"}), "bad_request"),
        (codec.encode({"op": "undeploy", "cluster": "bad name!", "model": "m"}), "bad_request"),
        (codec.encode({"op": "table", "cluster": "lab", "extra": 1}), "bad_request"),
    ]
    big_spec = msgspec.to_builtins(spec())
    big_spec["shape"]["num_layers"] = 1 << 20
    bad.append((codec.encode({"op": "plan", "cluster": "lab", "spec": big_spec}), "bad_request"))
    for payload, reason in bad:
        with pytest.raises(wire.WireError) as err:
            wire.decode_request(payload)
        assert err.value.reason == reason
    order = wire.body_of(wire.AssignBody, {"model": "m", "model_dir": "/m", "start": 0, "end": 2})
    assert order.end == 2 and order.dtype == "float32"
    for body in (
        {"model": "m", "model_dir": "/m", "start": 2, "end": 2},
        {"model": "m", "model_dir": "/m", "start": 0, "end": 2, "dtype": "int4"},
        {"model": "m", "start": 0, "end": 2},
        ["m"],
        None,
    ):
        with pytest.raises(wire.WireError):
            wire.body_of(wire.AssignBody, body)
    too_many = {
        "term": 1,
        "version": 1,
        "deployments": [{"spec": big_spec, "target": 1}] * (wire.MAX_DEPLOYMENTS + 1),
    }
    with pytest.raises(wire.WireError):
        wire.body_of(wire.TableBody, too_many)
    with pytest.raises(wire.WireError):
        wire.decode_reply(codec.encode([1, 2]))
