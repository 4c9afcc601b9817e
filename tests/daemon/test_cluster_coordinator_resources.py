"""What placement weighs in a node's public record: declared energy, GPU power draw, peer RTTs."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import msgpack
import msgspec
import pytest

from daemon.resources import EnergySettings, detect_resources, energy_record, peer_rtts
from tests.daemon.test_resources import FakeNVML, NVMLError, two_gpus


def test_measured_gpu_power_is_summed_with_the_declared_energy(tmp_path: Path):
    devices = two_gpus()
    devices[1]["power_mw"] = 87_500
    detected = detect_resources(tmp_path, nvml=FakeNVML(devices))
    settings = EnergySettings(energy_price_per_kwh=0.25, carbon_g_per_kwh=120.0)
    record = energy_record(detected, settings)
    assert record == {
        "energy": {
            "energy_price_per_kwh": 0.25,
            "carbon_g_per_kwh": 120.0,
            "gpu_power_w": 400.0,
            "gpu_power": "measured",
        }
    }
    assert msgpack.unpackb(msgpack.packb(record)) == record


def test_a_gpu_without_a_draw_reading_makes_the_total_unknown(tmp_path: Path):
    detected = detect_resources(tmp_path, nvml=FakeNVML(two_gpus()))  # the 4090 reports none
    energy = energy_record(detected, EnergySettings())["energy"]
    assert energy == {
        "energy_price_per_kwh": None,
        "carbon_g_per_kwh": None,
        "gpu_power_w": None,
        "gpu_power": "unknown",
    }


def test_no_gpus_draw_nothing_but_a_failed_detection_is_unknown(tmp_path: Path):
    cpu_only = detect_resources(tmp_path, nvml=FakeNVML([]))
    assert energy_record(cpu_only, EnergySettings())["energy"]["gpu_power"] == "no_gpus"
    assert energy_record(cpu_only, EnergySettings())["energy"]["gpu_power_w"] == 0.0
    broken = detect_resources(tmp_path, nvml=FakeNVML([], init_error=NVMLError("boom")))
    assert broken["gpu_error"]
    energy = energy_record(broken, EnergySettings())["energy"]
    assert energy["gpu_power"] == "unknown" and energy["gpu_power_w"] is None
    # odd shapes (another version's record) never raise
    odd = {"gpus": [{"power_w": float("nan")}, "x"], "gpu_error": None}
    assert energy_record(odd, EnergySettings())["energy"]["gpu_power"] == "unknown"
    assert energy_record({"gpus": "none"}, EnergySettings())["energy"]["gpu_power_w"] == 0.0


def test_declared_values_are_bounded():
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"energy_price_per_kwh": -1.0}, EnergySettings)
    with pytest.raises(msgspec.ValidationError):
        msgspec.convert({"carbon_g_per_kwh": 1e7}, EnergySettings)
    ok = msgspec.convert({"carbon_g_per_kwh": 35}, EnergySettings)
    assert ok.carbon_g_per_kwh == 35 and ok.energy_price_per_kwh is None
    # built around the checks (not from config): odd values are published as undeclared
    energy = energy_record({}, EnergySettings(float("inf"), -3.0))["energy"]
    assert energy["energy_price_per_kwh"] is None and energy["carbon_g_per_kwh"] is None


def test_peer_rtts_keeps_the_nearest_measured_peers():
    peers = {f"p{i}": SimpleNamespace(rtt_ms=float(100 - i)) for i in range(100)}
    peers["silent"] = SimpleNamespace(rtt_ms=None)
    peers["odd"] = SimpleNamespace(rtt_ms=float("nan"))
    rtts = peer_rtts(peers, limit=3)
    assert rtts == {"p99": 1.0, "p98": 2.0, "p97": 3.0}
    assert len(peer_rtts(peers)) == 64
    assert "silent" not in peer_rtts(peers, limit=1000)
