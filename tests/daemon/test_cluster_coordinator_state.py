"""The coordinator's decisions without a network: shortfalls, surplus, scaling; the wire."""

from __future__ import annotations

from types import SimpleNamespace

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.cluster import coordinator_wire as wire
from daemon.cluster.coordinator_facts import NOT_ACCEPTING, node_facts, served_ranges
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
from registry.blocks import announcement_key


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


def record(peer: str, **resources) -> SimpleNamespace:
    return SimpleNamespace(peer_id=peer, resources=resources)


def announcement(peer: str, model: str, start: int, end: int, **params) -> SimpleNamespace:
    value = {
        "model": model,
        "layers": [start, end],
        "served_by": [peer],
        "parameters": {"ms_per_layer": 2.0, **params},
    }
    key = announcement_key(model, start, end, peer)
    return SimpleNamespace(kind="blocks", key=key, value=value, author=peer, owner=peer)


def test_facts_come_from_records_and_announcements_odd_values_unknown():
    mem = {"memory": {"available_bytes": 1000}}
    records = [
        record("me", **mem),  # this node: no accepts_deploys needed
        record("gpu", accepts_deploys=True, gpus=[{"memory_free_bytes": 5000}, "x"], **mem),
        record(
            "green",
            accepts_deploys=True,
            energy={"gpu_power_w": 300, "energy_price_per_kwh": 0.2, "carbon_g_per_kwh": "low"},
            rtt_ms={"gpu": 3.0},
            **mem,
        ),
        record("closed", accepts_deploys=False, **mem),
        record("odd", accepts_deploys=True, memory={"available_bytes": True}),
    ]
    entries = [
        announcement("gpu", "other", 0, 2),
        announcement("green", "m", 0, 2, ms_per_layer=5.0),
        announcement("green", "other", 0, 2, ms_per_layer=1.0),
    ]
    peers = ["me", "gpu", "green", "closed", "odd", "unknown"]
    facts, excluded = node_facts(records, entries, peers, "m", "me", {"gpu": 7.0})
    by = {f.peer_id: f for f in facts}
    assert set(by) == {"me", "gpu", "green", "odd"}
    assert excluded["closed"] == NOT_ACCEPTING and "no resource record" in excluded["unknown"]
    assert by["gpu"].free_bytes == 5000 and by["me"].free_bytes == 1000
    assert by["odd"].free_bytes == 0
    assert by["green"].ms_per_layer == 5.0  # this model's measurement before another's
    assert by["gpu"].ms_per_layer == 2.0 and by["me"].ms_per_layer is None
    assert by["green"].gpu_power_w == 300.0 and by["green"].carbon_g_per_kwh is None
    assert by["green"].rtt_ms == {"gpu": 3.0} and by["me"].rtt_ms == {"gpu": 7.0}


def test_served_ranges_read_load_leniently():
    entries = [
        announcement("a", "m", 0, 2, utilisation=0.5, queue_length=3),
        announcement("b", "m", 2, 4, utilisation=7.0),  # out of bounds: unknown
        announcement("c", "m", 0, 4),
        announcement("a", "other", 0, 4),
    ]
    ranges = served_ranges(entries, "m", {"a", "b"})
    assert ranges == [
        Served("a", 0, 2, 2.0, 3, 0.5),
        Served("b", 2, 4, 2.0, None, None),
    ]
