"""The sandbox: policies (and, later, Python blocks) run in separate worker processes that
cannot hurt the node. Policy code is never imported in the daemon's process.

Use (trio):

    from daemon.sandbox import SandboxPool, SandboxConfig, load_package

    package = load_package("policies/least_loaded", expected_digest="sha256:...",
                           allowed=config.sandbox.allowed_packages)   # reads, never imports
    async with SandboxPool(config.sandbox, hidden_paths=[node_home]) as pool:
        print(pool.layers)            # {"rlimits": "on: ...", "namespaces": "on: ...", ...}
        ref = package.bind(rule_id="assign", settings={...}, parameters={...})
        result = await pool.call(ref, "eval",
                                 {"parameters": {...}, "input_data": {...}, "context": {...}})
        await pool.call(ref, "management", {"action": "reset", "data": {}})

- `pool.call(policy, method, args, *, timeout_s=None) -> Any`: `policy` is a PolicyRef
  (`package.bind(...)`) or a PolicyPackage (bound with no settings); `method` is "eval"
  (args: parameters, input_data, context) or "management" (args: action, data); missing
  args are None. The result is whatever the method returned (msgpack types: None, bool,
  int, float, str, bytes, list, dict). The policy's class is made once per worker and
  PolicyRef as `Class(rule_id, settings, parameters)` (AIOS's AIOSv1PolicyRule) and kept.
- Failures raise a `SandboxError` subclass whose `kind` labels it (daemon.sandbox.errors):
  PolicyInvalid / DependencyRefused (package, hash, allow-list), IsolationRefused (no layer
  on and no opt-in), PolicyFailed (the policy raised), CallTimeout (deadline: worker killed),
  WorkerCrashed (worker died: limit, signal), MessageTooLarge (request or reply over its
  bound), PoolClosed.
- `pool.counters` (SandboxCounters): calls, ok, failures by kind, kills, crashes, started —
  plain integers for /metrics (`counters.snapshot()`).
- Config: `[sandbox]` (daemon.sandbox.config.SandboxConfig).

Modules: package (format, hash, allow-list), loader (in the worker: import from checked
bytes, import guard), wire (bounded msgpack frames over pipes), worker (the worker process),
layers / landlock / seccomp / syscalls (isolation), pool (the trio pool), config, errors.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what the lazy exports below are, for type checkers
    from daemon.sandbox.config import SandboxConfig
    from daemon.sandbox.errors import (
        CallTimeout,
        DependencyRefused,
        IsolationRefused,
        MessageTooLarge,
        PolicyFailed,
        PolicyInvalid,
        PoolClosed,
        SandboxError,
        WorkerCrashed,
    )
    from daemon.sandbox.package import PolicyPackage, PolicyRef, load_package
    from daemon.sandbox.pool import SandboxCounters, SandboxPool

# exported names -> their modules, imported on first use (PEP 562): a worker process and a
# config load import only what they use (not trio, not the pool)
_EXPORTS = {
    "SandboxConfig": "config",
    "CallTimeout": "errors",
    "DependencyRefused": "errors",
    "IsolationRefused": "errors",
    "MessageTooLarge": "errors",
    "PolicyFailed": "errors",
    "PolicyInvalid": "errors",
    "PoolClosed": "errors",
    "SandboxError": "errors",
    "WorkerCrashed": "errors",
    "PolicyPackage": "package",
    "PolicyRef": "package",
    "load_package": "package",
    "SandboxCounters": "pool",
    "SandboxPool": "pool",
}
__all__ = [
    "CallTimeout",
    "DependencyRefused",
    "IsolationRefused",
    "MessageTooLarge",
    "PolicyFailed",
    "PolicyInvalid",
    "PolicyPackage",
    "PolicyRef",
    "PoolClosed",
    "SandboxConfig",
    "SandboxCounters",
    "SandboxError",
    "SandboxPool",
    "WorkerCrashed",
    "load_package",
]


assert sorted(__all__) == sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"daemon.sandbox.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value
