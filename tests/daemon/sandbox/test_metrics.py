"""The pool's counters, workers and layers as Prometheus metrics."""

from __future__ import annotations

from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from daemon.sandbox import PolicyFailed, SandboxConfig, SandboxPool, load_package
from daemon.sandbox.metrics import SandboxCollector
from tests.daemon.sandbox.policies import make_policy


async def test_metrics_follow_the_pool(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "p", "if input_data:\n    raise ValueError('x')\nreturn 1")
    policy = load_package(folder)
    async with SandboxPool(SandboxConfig(spare_workers=0)) as pool:
        registry = CollectorRegistry()
        registry.register(SandboxCollector(pool.snapshot))
        assert await pool.call(policy, "eval", {"input_data": False}) == 1
        with pytest.raises(PolicyFailed):
            await pool.call(policy, "eval", {"input_data": True})
        text = generate_latest(registry).decode()
        layers = dict(pool.layers)
    assert "gridmesh_sandbox_calls_total 2.0" in text
    assert "gridmesh_sandbox_ok_total 1.0" in text
    assert 'gridmesh_sandbox_failures_total{kind="policy_error"} 1.0' in text
    assert "gridmesh_sandbox_started_total 1.0" in text
    assert 'gridmesh_sandbox_workers{state="idle"} 1.0' in text
    for layer, state in layers.items():
        value = "1.0" if state.startswith("on") else "0.0"
        assert f'gridmesh_sandbox_layer{{layer="{layer}"}} {value}' in text
