import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import msgpack
import pytest

from daemon import resources
from daemon.resources import detect_gpus, detect_resources
from scheduler.filters import NodeFilter

GIB = 1024**3


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):  # noqa: N801 - mirrors pynvml's class names
    pass


class NVMLError_NotSupported(NVMLError):  # noqa: N801
    pass


class NVMLError_DriverNotLoaded(NVMLError):  # noqa: N801
    def __str__(self) -> str:
        return "Driver Not Loaded"


class NVMLError_GpuIsLost(NVMLError):  # noqa: N801
    def __str__(self) -> str:
        return "GPU is lost"


class FakeNVML:
    """The subset of pynvml that daemon.resources calls, with scripted failures."""

    NVMLError = NVMLError
    NVMLError_LibraryNotFound = NVMLError_LibraryNotFound
    NVMLError_NotSupported = NVMLError_NotSupported

    def __init__(self, devices: list[dict[str, Any]], init_error: Exception | None = None):
        self.devices = devices
        self.init_error = init_error
        self.calls: list[str] = []

    def nvmlInit(self) -> None:
        self.calls.append("init")
        if self.init_error is not None:
            raise self.init_error

    def nvmlShutdown(self) -> None:
        self.calls.append("shutdown")

    def nvmlDeviceGetCount(self) -> int:
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> dict[str, Any]:
        return self.devices[index]

    def nvmlDeviceGetName(self, handle: dict[str, Any]) -> str | bytes:
        if "name_error" in handle:
            raise handle["name_error"]
        return handle["name"]

    def nvmlDeviceGetUUID(self, handle: dict[str, Any]) -> str | bytes:
        return handle["uuid"]

    def nvmlDeviceGetMemoryInfo(self, handle: dict[str, Any]) -> SimpleNamespace:
        return SimpleNamespace(total=handle["total"], free=handle["free"], used=0)

    def nvmlDeviceGetUtilizationRates(self, handle: dict[str, Any]) -> SimpleNamespace:
        if handle.get("util") is None:
            raise NVMLError_NotSupported()
        return SimpleNamespace(gpu=handle["util"], memory=0)

    def nvmlDeviceGetPowerUsage(self, handle: dict[str, Any]) -> int:
        if handle.get("power_mw") is None:
            raise NVMLError_NotSupported()
        return handle["power_mw"]

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return b"550.54.15"


def two_gpus() -> list[dict[str, Any]]:
    return [
        {
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-11111111-2222-3333-4444-555555555555",
            "total": 80 * GIB,
            "free": 79 * GIB,
            "util": 37,
            "power_mw": 312_500,
        },
        {
            "name": b"NVIDIA GeForce RTX 4090",
            "uuid": b"GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "total": 24 * GIB,
            "free": 20 * GIB,
            "util": 0,
            "power_mw": None,
        },
    ]


def test_two_gpus_exact_with_str_and_bytes_names():
    nvml = FakeNVML(two_gpus())
    gpus, driver, error = detect_gpus(nvml)
    assert gpus == [
        {
            "index": 0,
            "name": "NVIDIA H100 80GB HBM3",
            "uuid": "GPU-11111111-2222-3333-4444-555555555555",
            "memory_total_bytes": 80 * GIB,
            "memory_free_bytes": 79 * GIB,
            "utilization_pct": 37,
            "power_w": 312.5,
        },
        {
            "index": 1,
            "name": "NVIDIA GeForce RTX 4090",
            "uuid": "GPU-aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
            "memory_total_bytes": 24 * GIB,
            "memory_free_bytes": 20 * GIB,
            "utilization_pct": 0,
            "power_w": None,
        },
    ]
    assert driver == "550.54.15"
    assert error is None
    assert nvml.calls == ["init", "shutdown"]


def test_unsupported_utilization_and_power_are_none_not_errors():
    devices = two_gpus()[:1]
    devices[0].update(util=None, power_mw=None)
    gpus, driver, error = detect_gpus(FakeNVML(devices))
    assert gpus[0]["utilization_pct"] is None
    assert gpus[0]["power_w"] is None
    assert gpus[0]["memory_total_bytes"] == 80 * GIB
    assert (driver, error) == ("550.54.15", None)


def test_library_not_found_is_the_quiet_no_gpu_path():
    nvml = FakeNVML(two_gpus(), init_error=NVMLError_LibraryNotFound())
    assert detect_gpus(nvml) == ([], None, None)
    assert nvml.calls == ["init"]  # no shutdown without a successful init


def test_other_init_failure_is_reported():
    nvml = FakeNVML(two_gpus(), init_error=NVMLError_DriverNotLoaded())
    assert detect_gpus(nvml) == ([], None, "nvmlInit: Driver Not Loaded")
    assert nvml.calls == ["init"]


def test_non_nvml_exception_is_reported_not_raised():
    nvml = FakeNVML([], init_error=OSError())
    assert detect_gpus(nvml) == ([], None, "nvmlInit: OSError")


def test_lost_device_is_left_out_and_named_others_kept_and_shutdown_runs():
    devices = two_gpus()
    devices[0]["name_error"] = NVMLError_GpuIsLost()
    nvml = FakeNVML(devices)
    gpus, driver, error = detect_gpus(nvml)
    assert [g["name"] for g in gpus] == ["NVIDIA GeForce RTX 4090"]
    assert gpus[0]["index"] == 1
    assert driver == "550.54.15"
    assert error == "gpu 0: GPU is lost"
    assert nvml.calls == ["init", "shutdown"]


def test_count_failure_still_shuts_down():
    nvml = FakeNVML([])

    def broken_count() -> int:
        raise NVMLError_GpuIsLost()

    nvml.nvmlDeviceGetCount = broken_count  # type: ignore[method-assign]
    assert detect_gpus(nvml) == ([], None, "nvmlDeviceGetCount: GPU is lost")
    assert nvml.calls == ["init", "shutdown"]


def test_fake_gpus_feed_the_scheduler_filter(tmp_path: Path):
    record = detect_resources(tmp_path, nvml=FakeNVML(two_gpus()))
    assert record["gpus"][1]["name"] == "NVIDIA GeForce RTX 4090"
    assert NodeFilter(min_gpus=2, min_vram_gb=24).matches(record)
    assert NodeFilter(gpu_name="4090").matches(record)
    assert not NodeFilter(min_gpus=2, min_vram_gb=25).matches(record)
    assert msgpack.unpackb(msgpack.packb(record)) == record


def test_real_detection_on_this_machine(tmp_path: Path):
    """CI has no NVIDIA driver: the real pynvml must take the quiet no-GPU path."""
    record = detect_resources(tmp_path)
    assert set(record) == {"cpu", "memory", "disk", "gpus", "gpu_driver", "gpu_error"}
    assert set(record["cpu"]) == {"model", "cores", "arch"}
    assert record["cpu"]["cores"] >= 1
    assert isinstance(record["cpu"]["model"], str) and record["cpu"]["model"]
    assert isinstance(record["cpu"]["arch"], str) and record["cpu"]["arch"]
    assert record["memory"]["total_bytes"] > 0
    assert 0 < record["memory"]["available_bytes"] <= record["memory"]["total_bytes"]
    assert record["disk"]["path"] == str(tmp_path)
    assert 0 < record["disk"]["free_bytes"] <= record["disk"]["total_bytes"]
    assert record["gpus"] == []
    assert record["gpu_driver"] is None
    assert record["gpu_error"] is None
    assert msgpack.unpackb(msgpack.packb(record)) == record


def test_real_detection_is_cheap(tmp_path: Path):
    detect_resources(tmp_path)  # warm the cached CPU model
    start = time.perf_counter()
    for _ in range(10):
        detect_resources(tmp_path)
    assert (time.perf_counter() - start) / 10 < 0.1


def test_missing_disk_path_uses_nearest_existing_parent(tmp_path: Path):
    disk = resources.detect_disk(tmp_path / "not" / "yet")
    assert disk["path"] == str(tmp_path / "not" / "yet")
    assert disk["total_bytes"] > 0


def test_meminfo_fallback_to_sysconf(monkeypatch: pytest.MonkeyPatch):
    real_open = open

    def no_proc(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc/"):
            raise FileNotFoundError(path)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", no_proc)
    memory = resources.detect_memory()
    assert memory["total_bytes"] > 0
    assert 0 <= memory["available_bytes"] <= memory["total_bytes"]


def test_bytes_and_nul_padding_are_decoded():
    assert resources._text(b"Tesla T4\x00\x00") == "Tesla T4"
    assert resources._text(b"\xffbad") == "\ufffdbad"
    assert len(resources._text("x" * 1000)) == resources.MAX_TEXT_CHARS
