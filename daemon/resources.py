"""Detect this machine's resources (CPU, RAM, disk, NVIDIA GPUs) for the signed resource record.

The result is a plain dict of str/int/float/None/list values so it serialises to JSON and
msgpack unchanged; `scheduler/filters.py` reads `gpus[*].name`, `gpus[*].memory_total_bytes`
and `cpu.cores`. Detection never raises: it runs at every republish, and a flaky GPU driver
must not stop a node from advertising its CPU.

Beside what is detected, the record carries what placement weighs (`scheduler.placement`):
`energy_record` adds the operator's declared energy price and carbon intensity
(`EnergySettings`, `[resources]` keys) and the GPUs' total power draw as NVML measured it (0 W
on a machine without GPUs; unknown, None, when a GPU does not report its draw), and
`peer_rtts` the round trips this node measured to its peers (the RTT between two hops).
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import platform
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypedDict

from msgspec import Meta

with warnings.catch_warnings():
    # pynvml 13 is a shim over nvidia-ml-py that warns (FutureWarning) on first import.
    warnings.simplefilter("ignore", FutureWarning)
    try:
        import pynvml as _pynvml
    except ImportError:  # pragma: no cover - pynvml is a pinned dependency
        _pynvml = None

MAX_ERROR_CHARS = 200
MAX_TEXT_CHARS = 128
MAX_RTT_PEERS = 64  # peer RTTs published in the record (the nearest first)
MAX_ENERGY_PRICE = 1e9
MAX_CARBON = 1e6


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


# -- what placement weighs --------------------------------------------------------------------


@dataclass(frozen=True)
class EnergySettings:
    """What the operator declares about this node's energy (`[resources]` keys); unset: not
    declared (a planner then assumes the worst declared by the others)."""

    # the price of a kWh here, in any currency the cluster agrees on (only ratios matter)
    energy_price_per_kwh: Annotated[float, Meta(ge=0.0, le=MAX_ENERGY_PRICE)] | None = None
    # grams of CO2 emitted per kWh of this node's electricity
    carbon_g_per_kwh: Annotated[float, Meta(ge=0.0, le=MAX_CARBON)] | None = None


class EnergyInfo(TypedDict):
    energy_price_per_kwh: float | None
    carbon_g_per_kwh: float | None
    gpu_power_w: float | None
    gpu_power: str


def energy_record(detected: Mapping[str, Any], settings: EnergySettings) -> dict[str, EnergyInfo]:
    """`{"energy": ...}` for the public record: the declared price and carbon intensity, and
    the GPUs' power draw summed from `detected` (`detect_resources`): `gpu_power` says what
    it is: "measured" (NVML's reading of every GPU), "no_gpus" (0 W: nothing to draw),
    "unknown" (a GPU reports no draw, or detection failed: gpu_power_w is None)."""
    gpus = detected.get("gpus")
    gpus = [g for g in gpus if isinstance(g, Mapping)] if isinstance(gpus, list) else []
    draws = [g.get("power_w") for g in gpus]
    power: float | None
    if not gpus and not detected.get("gpu_error"):
        power, source = 0.0, "no_gpus"
    elif gpus and all(_non_negative(w) for w in draws):
        power, source = round(sum(float(w) for w in draws), 3), "measured"
    else:
        power, source = None, "unknown"
    return {
        "energy": {
            "energy_price_per_kwh": _declared(settings.energy_price_per_kwh, MAX_ENERGY_PRICE),
            "carbon_g_per_kwh": _declared(settings.carbon_g_per_kwh, MAX_CARBON),
            "gpu_power_w": power,
            "gpu_power": source,
        }
    }


def placement_record(
    detected: Mapping[str, Any], declared: Mapping[str, Any], peers: Mapping[str, Any]
) -> dict[str, Any]:
    """What placement reads in the public record: `energy` (`energy_record`, with the
    `EnergySettings` fields `declared` sets) and `rtt_ms` (`peer_rtts`)."""
    energy = energy_record(detected, EnergySettings(**declared))
    return {**energy, "rtt_ms": peer_rtts(peers)}


def peer_rtts(peers: Mapping[str, Any], limit: int = MAX_RTT_PEERS) -> dict[str, float]:
    """The round trips (ms) this node measured to its peers (`p2p.network.PeerState.rtt_ms`,
    kept by `track_peers`), the `limit` nearest, for planners to weigh the hop between two
    nodes."""
    measured = [
        (float(state.rtt_ms), peer)
        for peer, state in peers.items()
        if isinstance(peer, str) and _non_negative(getattr(state, "rtt_ms", None))
    ]
    return {peer: round(ms, 3) for ms, peer in sorted(measured)[:limit]}


def _non_negative(value: Any) -> bool:
    """A finite, non-negative reading."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _declared(value: float | None, top: float) -> float | None:
    return float(value) if _non_negative(value) and value is not None and value <= top else None
