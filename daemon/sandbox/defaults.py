"""The policies that ship with gridmesh, as packages built in memory (trusted: they run even
where the operator's sandbox has no isolation layer, and they still run in the sandbox):

- `least_loaded()`: assignment. input_data `{"instances": [{"id": "a", "load": 0.3}, ...]}`
  (the load the servers report; parameters `load_key` names another field, `tolerance`
  treats loads that close as equal) -> `{"instance": id, "load": x, "candidates": n}`;
  instances tied for the least load take turns, so equal servers share the requests.
- `token_bucket()`: quota. Made with settings or parameters `rate_per_s` (refill) and
  `burst` (capacity); input_data `{"key": "session:..." or "apikey:...", "cost": 1,
  "now": seconds (optional; default the monotonic clock)}` -> `{"allowed": bool,
  "remaining": tokens, "retry_after_s": s or None}` (None: the cost exceeds the burst and
  never fits). At most `max_keys` buckets (the least recently used go). Stateful: the pool
  runs it in one worker, and its buckets start full again if that worker is replaced.
  management("reset", {"key": k}) empties one bucket's history (or all, without a key);
  management("state", None) -> {"keys": n}.
"""

from __future__ import annotations

import json

from daemon.sandbox.package import PolicyPackage, check_package

LEAST_LOADED = '''"""Least-loaded assignment: gridmesh's default (daemon/sandbox/defaults.py)."""


class AIOSv1PolicyRule:
    def __init__(self, rule_id, settings, parameters):
        self.turn = 0

    def eval(self, parameters, input_data, context):
        parameters = parameters or {}
        key = parameters.get("load_key", "load")
        tolerance = parameters.get("tolerance", 0.0)
        instances = (input_data or {}).get("instances") if isinstance(input_data, dict) else None
        if not isinstance(instances, list) or not instances:
            raise ValueError("input_data.instances must be a non-empty list of {id, load}")
        loads = []
        for item in instances:
            if not isinstance(item, dict) or not isinstance(item.get("id"), str):
                raise ValueError("each instance must be a map with a string id")
            load = item.get(key, 0)
            if isinstance(load, bool) or not isinstance(load, (int, float)) or not load >= 0:
                raise ValueError(f"instance {item['id']!r}: {key} must be a number >= 0")
            loads.append((float(load), item["id"]))
        low = min(load for load, _ in loads)
        tied = sorted({name for load, name in loads if load <= low + tolerance})
        self.turn += 1
        return {"instance": tied[self.turn % len(tied)], "load": low, "candidates": len(tied)}

    def management(self, action, data):
        if action == "reset":
            self.turn = 0
        return {"turn": self.turn}
'''

TOKEN_BUCKET = '''"""Token-bucket quota: gridmesh's default (daemon/sandbox/defaults.py)."""

import time


def _positive(values, name, default):
    value = values.get(name, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, not {value!r}")
    return float(value)


class AIOSv1PolicyRule:
    def __init__(self, rule_id, settings, parameters):
        values = {**(parameters or {}), **(settings or {})}
        self.rate = _positive(values, "rate_per_s", 1.0)
        self.burst = _positive(values, "burst", 10.0)
        self.max_keys = int(_positive(values, "max_keys", 100_000))
        self.buckets = {}  # key -> (tokens, time), least recently used first

    def eval(self, parameters, input_data, context):
        if not isinstance(input_data, dict) or not isinstance(input_data.get("key"), str):
            raise ValueError("input_data must be a map with a string key")
        key = input_data["key"]
        cost = input_data.get("cost", 1)
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost >= 0:
            raise ValueError(f"cost must be a number >= 0, not {cost!r}")
        now = input_data.get("now")
        now = time.monotonic() if now is None else float(now)
        tokens, last = self.buckets.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - last) * self.rate)
        allowed = cost <= tokens
        if allowed:
            tokens -= cost
        self.buckets[key] = (tokens, now)
        while len(self.buckets) > self.max_keys:
            self.buckets.pop(next(iter(self.buckets)))
        if allowed:
            retry = 0.0
        elif cost > self.burst:
            retry = None
        else:
            retry = (cost - tokens) / self.rate
        return {"allowed": allowed, "remaining": tokens, "retry_after_s": retry}

    def management(self, action, data):
        if action == "reset":
            key = (data or {}).get("key") if isinstance(data, dict) else None
            if key is None:
                self.buckets.clear()
            else:
                self.buckets.pop(key, None)
        elif action != "state":
            raise ValueError(f"unknown action {action!r} (reset, state)")
        return {"keys": len(self.buckets)}
'''


def _package(name: str, code: str, description: str, *, stateful: bool) -> PolicyPackage:
    manifest = {"name": name, "version": "1", "description": description, "stateful": stateful}
    files = {"function.py": code.encode(), "manifest.json": json.dumps(manifest).encode()}
    parsed, digest = check_package(files, source=f"builtin:{name}")
    return PolicyPackage(parsed, files, digest, source=f"builtin:{name}", trusted=True)


def least_loaded() -> PolicyPackage:
    return _package(
        "least-loaded", LEAST_LOADED, "assignment: the least-loaded instance", stateful=False
    )


def token_bucket() -> PolicyPackage:
    return _package("token-bucket", TOKEN_BUCKET, "quota: a token bucket per key", stateful=True)


BUILTIN = {"least-loaded": least_loaded, "token-bucket": token_bucket}
