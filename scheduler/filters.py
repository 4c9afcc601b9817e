"""Node filters for `nodes_find`: which resource records match a requester's needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3


class FilterError(ValueError):
    pass


@dataclass(frozen=True)
class NodeFilter:
    min_gpus: int = 0
    min_vram_gb: float = 0.0
    gpu_name: str | None = None
    min_cpu_cores: int = 0

    @classmethod
    def parse(cls, raw: Any) -> NodeFilter:
        """Build a filter from untrusted JSON; FilterError names the bad field."""
        if raw is None:
            return cls()
        if not isinstance(raw, dict):
            raise FilterError("filter must be an object")
        unknown = set(raw) - {"min_gpus", "min_vram_gb", "gpu_name", "min_cpu_cores"}
        if unknown:
            raise FilterError(f"unknown filter fields: {', '.join(sorted(unknown))}")
        values: dict[str, Any] = {}
        for name in ("min_gpus", "min_cpu_cores"):
            if name in raw:
                value = raw[name]
                if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                    raise FilterError(f"{name} must be a non-negative integer")
                values[name] = value
        if "min_vram_gb" in raw:
            value = raw["min_vram_gb"]
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise FilterError("min_vram_gb must be a non-negative number")
            values["min_vram_gb"] = float(value)
        if "gpu_name" in raw and raw["gpu_name"] is not None:
            value = raw["gpu_name"]
            if not isinstance(value, str) or not 0 < len(value) <= 128:
                raise FilterError("gpu_name must be a string of 1 to 128 characters")
            values["gpu_name"] = value
        return cls(**values)

    def matches(self, resources: dict[str, Any]) -> bool:
        """gpu_name is a case-insensitive substring; min_vram_gb applies to each counted GPU."""
        gpus = resources.get("gpus") or []
        if not isinstance(gpus, list):
            return False
        eligible = [
            gpu
            for gpu in gpus
            if isinstance(gpu, dict)
            and (self.gpu_name is None or self.gpu_name.lower() in str(gpu.get("name", "")).lower())
            and _number(gpu.get("memory_total_bytes")) >= self.min_vram_gb * GIB
        ]
        wants_gpu = self.min_gpus or self.gpu_name is not None or self.min_vram_gb > 0
        if len(eligible) < max(self.min_gpus, 1 if wants_gpu else 0):
            return False
        cpu = resources.get("cpu") if isinstance(resources.get("cpu"), dict) else {}
        return _number(cpu.get("cores")) >= self.min_cpu_cores


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0
