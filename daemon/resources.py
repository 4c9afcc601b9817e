"""Detect this machine's resources (CPU, RAM, disk, NVIDIA GPUs) for the signed resource record.

The result is a plain dict of str/int/float/None/list values so it serialises to JSON and
msgpack unchanged; `scheduler/filters.py` reads `gpus[*].name`, `gpus[*].memory_total_bytes`
and `cpu.cores`. Detection never raises: it runs at every republish, and a flaky GPU driver
must not stop a node from advertising its CPU.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any, TypedDict

with warnings.catch_warnings():
    # pynvml 13 is a shim over nvidia-ml-py that warns (FutureWarning) on first import.
    warnings.simplefilter("ignore", FutureWarning)
    try:
        import pynvml as _pynvml
    except ImportError:  # pragma: no cover - pynvml is a pinned dependency
        _pynvml = None

MAX_ERROR_CHARS = 200
MAX_TEXT_CHARS = 128


class CpuInfo(TypedDict):
    model: str
    cores: int
    arch: str


class MemoryInfo(TypedDict):
    total_bytes: int
    available_bytes: int


class DiskInfo(TypedDict):
    path: str
    total_bytes: int
    free_bytes: int


class GpuInfo(TypedDict):
    index: int
    name: str
    uuid: str
    memory_total_bytes: int
    memory_free_bytes: int
    utilization_pct: int | None
    power_w: float | None


class Resources(TypedDict):
    cpu: CpuInfo
    memory: MemoryInfo
    disk: DiskInfo
    gpus: list[GpuInfo]
    gpu_driver: str | None
    gpu_error: str | None


def detect_resources(disk_path: Path, nvml: Any = None) -> Resources:
    """Everything at once; `disk_path` is the node's home (the disk its work lands on)."""
    gpus, driver, error = detect_gpus(nvml)
    return {
        "cpu": detect_cpu(),
        "memory": detect_memory(),
        "disk": detect_disk(disk_path),
        "gpus": gpus,
        "gpu_driver": driver,
        "gpu_error": error,
    }


def detect_cpu() -> CpuInfo:
    model, arch = _cpu_static()
    return {"model": model, "cores": os.cpu_count() or 1, "arch": arch}


@functools.cache
def _cpu_static() -> tuple[str, str]:
    """Model and architecture never change while we run; platform.processor() may fork."""
    arch = platform.machine() or "unknown"
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == "model name":
                    model = value.strip()
                    break
    except OSError:
        pass
    if not model:
        try:
            model = platform.processor()
        except Exception:  # pragma: no cover - platform probing is best effort
            model = ""
    return _text(model or arch), arch


def detect_memory() -> MemoryInfo:
    """Bytes from /proc/meminfo; os.sysconf where there is no /proc (or it is unreadable)."""
    fields: dict[str, int] = {}
    try:
        with open("/proc/meminfo", encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if key in ("MemTotal", "MemAvailable", "MemFree"):
                    parts = value.split()
                    if sep and parts and parts[0].isdigit():
                        unit = 1024 if parts[1:2] == ["kB"] else 1
                        fields[key] = int(parts[0]) * unit
    except OSError:
        pass
    total = fields.get("MemTotal", 0)
    available = fields.get("MemAvailable", fields.get("MemFree", 0))
    if total <= 0:
        total, available = _sysconf_memory()
    return {"total_bytes": total, "available_bytes": max(0, min(available, total))}


def _sysconf_memory() -> tuple[int, int]:
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        total = page * os.sysconf("SC_PHYS_PAGES")
        available = page * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0, 0
    return max(0, total), max(0, available)


def detect_disk(path: Path) -> DiskInfo:
    """Usage of the filesystem holding `path`, or of its nearest existing parent."""
    probe = Path(path)
    usage = None
    for candidate in (probe, *probe.absolute().parents):
        try:
            usage = shutil.disk_usage(candidate)
            break
        except OSError:
            continue
    if usage is None:
        return {"path": str(path), "total_bytes": 0, "free_bytes": 0}
    return {"path": str(path), "total_bytes": usage.total, "free_bytes": usage.free}


def detect_gpus(nvml: Any = None) -> tuple[list[GpuInfo], str | None, str | None]:
    """(gpus, driver version, error) through NVML; `nvml` defaults to the pynvml module.

    No NVML library (the normal CPU-only machine) is ([], None, None). Any other failure to
    initialise or enumerate is ([], None, reason). A device whose required fields fail is
    left out and named in the error; the others are still reported. Utilization and power
    are optional per device (NotSupported on many boards) and become None.
    """
    nvml = _pynvml if nvml is None else nvml
    if nvml is None:  # pragma: no cover - pynvml is a pinned dependency
        return [], None, None
    nvml_error: type[BaseException] = getattr(nvml, "NVMLError", Exception)
    not_found = getattr(nvml, "NVMLError_LibraryNotFound", None)
    try:
        nvml.nvmlInit()
    except Exception as exc:
        if not_found is not None and isinstance(exc, not_found):
            return [], None, None
        return [], None, _error("nvmlInit", exc)
    try:
        try:
            count = int(nvml.nvmlDeviceGetCount())
        except Exception as exc:
            return [], None, _error("nvmlDeviceGetCount", exc)
        gpus: list[GpuInfo] = []
        problems: list[str] = []
        for index in range(count):
            try:
                gpus.append(_read_device(nvml, nvml_error, index))
            except Exception as exc:
                problems.append(_error(f"gpu {index}", exc))
        driver = _optional(nvml_error, lambda: _text(nvml.nvmlSystemGetDriverVersion()))
        error = _text("; ".join(problems), MAX_ERROR_CHARS) if problems else None
        return gpus, driver or None, error
    finally:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()


def _read_device(nvml: Any, nvml_error: type[BaseException], index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    utilization = _optional(nvml_error, lambda: int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu))
    power_mw = _optional(nvml_error, lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    return {
        "index": index,
        "name": _text(nvml.nvmlDeviceGetName(handle)),
        "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
        "memory_total_bytes": int(memory.total),
        "memory_free_bytes": int(memory.free),
        "utilization_pct": utilization,
        "power_w": None if power_mw is None else float(power_mw) / 1000.0,
    }


def _optional(nvml_error: type[BaseException], read: Any) -> Any:
    """An optional NVML reading: None when the board does not support it (or it fails)."""
    try:
        return read()
    except (nvml_error, ValueError, TypeError, AttributeError):
        return None


def _text(value: Any, limit: int = MAX_TEXT_CHARS) -> str:
    """NVML strings are str in pynvml 13 but bytes in older bindings; bound what we publish."""
    if isinstance(value, bytes | bytearray):
        value = bytes(value).decode("utf-8", errors="replace")
    return str(value).replace("\x00", "").strip()[:limit]


def _error(where: str, exc: BaseException) -> str:
    try:
        detail = str(exc)
    except Exception:  # NVMLError.__str__ may call back into the library
        detail = ""
    detail = detail or type(exc).__name__
    return _text(f"{where}: {detail}", MAX_ERROR_CHARS)
