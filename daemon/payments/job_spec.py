"""A paid job as people write it: gridmesh's own fields, or OpenGrid's `job.yaml`.

A job locks a deposit in the escrow for a deadline and caps the price per unit of work (one
layer applied to one token, in the stablecoin's smallest unit). OpenGrid's format is accepted
(`apiVersion`, `kind: Job`, `name`, `resources`, `billing.max_price_per_hour[_usd]`,
`billing.deadline_s`): its hourly price times the deadline is the deposit. OpenGrid fields that
describe work gridmesh does not run (containers, files, redundancy) are refused with a message
that says why, never silently ignored.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

TOKEN_DECIMALS = 6  # TestUSD, like USDC: 1 USD = 10**6 smallest units
MAX_DEADLINE_S = 30 * 24 * 3600
MAX_AMOUNT = 2**128  # far above any deposit; keeps arithmetic in uint256 range
RESOURCE_KEYS = ("gpu", "vram_gb", "cpu_cores", "ram_gb", "disk_gb")

# OpenGrid fields with no meaning for a job of model shards, and why
NOT_APPLICABLE = {
    "image": "gridmesh runs model shards, not containers: name the `model` instead",
    "entrypoint": "gridmesh runs model shards, not containers: name the `model` instead",
    "inputs": "a paid job's inputs are the generation requests made under its job id",
    "outputs": "a paid job's outputs are the generations' tokens, returned to the requester",
    "billing.verifier": "verification by quorum is not supported yet",
    "billing.redundancy": "redundant execution is not supported yet",
}


class JobSpecError(ValueError):
    """A job spec that cannot be used; the message names the field."""


@dataclass(frozen=True)
class JobSpec:
    """A validated job: what `gridmesh job create` deposits for."""

    name: str
    deposit: int  # smallest units of the stablecoin, locked in the escrow
    max_price_per_unit: int  # smallest units per layer-token; providers over it are skipped
    deadline_s: int  # from creation; settlement closes and refunds open after it
    model: str | None = None
    # minimum resources of a provider (gpu count, vram_gb, cpu_cores, ram_gb, disk_gb)
    resources: tuple[tuple[str, float], ...] = ()

    def provider_filter(self) -> str:
        """The resources as a registry filter over providers' resource records."""
        names = {"gpu": "gpus"}
        return " AND ".join(f"{names.get(k, k)} >= {_num(v)}" for k, v in self.resources)


def usd_to_units(usd: float) -> int:
    """Dollars in the stablecoin's smallest unit (rounded down: never more than was said)."""
    return math.floor(round(usd * 10**TOKEN_DECIMALS, 6))


def parse_job_spec(
    raw: Any, *, default_max_price_per_unit: int | None = None, source: str = "job spec"
) -> JobSpec:
    """A `JobSpec` from a decoded YAML/JSON document, or `JobSpecError` naming the field."""
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"{source}: a job spec is a map of fields, got {type(raw).__name__}")
    known = {"apiVersion", "kind", "name", "model", "resources", "billing", *NOT_APPLICABLE}
    _refuse_unknown(raw, known, source, "")
    for field, why in NOT_APPLICABLE.items():
        top, _, sub = field.partition(".")
        where = raw.get(top) if sub else raw
        if isinstance(where, Mapping) and (sub or top) in where:
            raise JobSpecError(f"{source}: `{field}` does not apply: {why}")
    kind = raw.get("kind", "Job")
    if kind != "Job":
        raise JobSpecError(f"{source}: `kind` must be Job, got {kind!r}")
    name = raw.get("name", "job")
    if not isinstance(name, str) or not 0 < len(name) <= 128:
        raise JobSpecError(f"{source}: `name` must be a string of 1 to 128 characters")
    model = raw.get("model")
    if model is not None and (not isinstance(model, str) or not 0 < len(model) <= 256):
        raise JobSpecError(f"{source}: `model` must be a model name (1 to 256 characters)")
    resources = _resources(raw.get("resources", {}), source)
    billing = raw.get("billing")
    if not isinstance(billing, Mapping):
        raise JobSpecError(f"{source}: `billing` is required: deadline_s and a deposit or price")
    _refuse_unknown(
        billing,
        {
            "deadline_s",
            "deposit",
            "deposit_usd",
            "max_price_per_unit",
            "max_price_per_hour",
            "max_price_per_hour_usd",
            "payment",
            "verifier",
            "redundancy",
        },
        source,
        "billing.",
    )
    deadline_s = _int(billing.get("deadline_s"), "billing.deadline_s", source, 1, MAX_DEADLINE_S)
    payment = billing.get("payment", "stream")
    if payment != "stream":
        raise JobSpecError(
            f"{source}: `billing.payment` {payment!r} does not apply: gridmesh pays as work is "
            "acknowledged (stream)"
        )
    deposit = _deposit(billing, deadline_s, source)
    max_price = billing.get("max_price_per_unit", default_max_price_per_unit)
    if max_price is None:
        raise JobSpecError(
            f"{source}: `billing.max_price_per_unit` is required (smallest units per "
            "layer-token), or set [market] max_price_per_unit in the config"
        )
    max_price = _int(max_price, "billing.max_price_per_unit", source, 0, MAX_AMOUNT)
    return JobSpec(
        name=name,
        deposit=deposit,
        max_price_per_unit=max_price,
        deadline_s=deadline_s,
        model=model,
        resources=resources,
    )


def _deposit(billing: Mapping[str, Any], deadline_s: int, source: str) -> int:
    given = [
        k
        for k in ("deposit", "deposit_usd", "max_price_per_hour", "max_price_per_hour_usd")
        if k in billing
    ]
    if len(given) != 1:
        raise JobSpecError(
            f"{source}: give exactly one of billing.deposit (smallest units), "
            f"billing.deposit_usd, billing.max_price_per_hour_usd (got {given or 'none'})"
        )
    key = given[0]
    if key == "deposit":
        deposit = _int(billing[key], f"billing.{key}", source, 1, MAX_AMOUNT)
    else:
        usd = billing[key]
        if isinstance(usd, bool) or not isinstance(usd, int | float) or not math.isfinite(usd):
            raise JobSpecError(f"{source}: `billing.{key}` must be a number of dollars")
        if usd <= 0 or usd > 10**12:
            raise JobSpecError(f"{source}: `billing.{key}` must be above 0 (got {usd})")
        hours = deadline_s / 3600 if key.startswith("max_price_per_hour") else 1
        deposit = usd_to_units(usd * hours)
    if deposit < 1:
        raise JobSpecError(f"{source}: the deposit comes to 0 smallest units: raise it")
    return deposit


def _resources(raw: Any, source: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(raw, Mapping):
        raise JobSpecError(f"{source}: `resources` must be a map ({', '.join(RESOURCE_KEYS)})")
    _refuse_unknown(raw, set(RESOURCE_KEYS), source, "resources.")
    out = []
    for key in RESOURCE_KEYS:
        if key not in raw:
            continue
        value = raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise JobSpecError(f"{source}: `resources.{key}` must be a number")
        if not math.isfinite(value) or value < 0 or value > 1e6:
            raise JobSpecError(f"{source}: `resources.{key}` must be between 0 and 1e6")
        if key == "gpu" and value != int(value):
            raise JobSpecError(f"{source}: `resources.gpu` is a count of GPUs")
        out.append((key, float(value)))
    return tuple(out)


def _int(value: Any, field: str, source: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise JobSpecError(f"{source}: `{field}` must be a whole number (got {value!r})")
    if not low <= value <= high:
        raise JobSpecError(f"{source}: `{field}` must be between {low} and {high} (got {value})")
    return value


def _refuse_unknown(raw: Mapping[str, Any], known: set[str], source: str, prefix: str) -> None:
    unknown = sorted(str(k) for k in raw if k not in known)
    if unknown:
        raise JobSpecError(
            f"{source}: unknown field {prefix}{unknown[0]} (known: "
            f"{', '.join(prefix + k for k in sorted(known))})"
        )


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)
