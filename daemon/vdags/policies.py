"""A vDAG's policies, resolved to packages and run in the sandbox pool.

A policy rule names its package by ``policyRuleURI``:
- ``builtin:least-loaded``, ``builtin:token-bucket`` — the policies that ship with gridmesh
  (daemon.sandbox.defaults; a ``policyRuleDigest``, when given, must be theirs);
- a path on the node running the vDAG: absolute (``/srv/policies/resize``, ``file:/...``)
  or a name under ``<node home>/policies/``. Such a rule must carry ``policyRuleDigest``, the
  package's content hash: a package whose content no longer has that hash is refused.

A package is read and checked once per (URI, digest) and kept; the policy then only ever
runs in the sandbox (`SandboxPool.call`). Every failure — unknown URI, wrong hash, the
policy raising, its deadline — is an `AttemptFailed` (not retryable) whose message names the
policy; the executor adds the node.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import trio

from daemon.sandbox import defaults
from daemon.sandbox.errors import SandboxError
from daemon.sandbox.package import PolicyPackage, PolicyRef, load_package
from daemon.vdags.executor import AttemptFailed, RunContext
from scheduler.vdag import PlanStep, PolicyRule

BUILTIN = "builtin:"
MAX_CACHED = 256


class PolicyStore:
    """Policy packages by URI and digest, read once."""

    def __init__(self, home: Path | None, allowed: Iterable[str]) -> None:
        self.home = home
        self.allowed = tuple(allowed)
        self._packages: dict[tuple[str, str | None], PolicyPackage] = {}
        self._builtin = {name: make() for name, make in defaults.BUILTIN.items()}

    def package(self, uri: str, digest: str | None) -> PolicyPackage:
        key = (uri, digest)
        found = self._packages.get(key)
        if found is not None:
            return found
        if uri.startswith(BUILTIN):
            package = self._builtin.get(uri[len(BUILTIN) :])
            if package is None:
                known = ", ".join(BUILTIN + n for n in sorted(self._builtin))
                raise AttemptFailed(
                    f"unknown built-in policy {uri!r} (known: {known})",
                    retryable=False,
                    reason="policy_unknown",
                )
            if digest is not None and digest != package.digest:
                raise AttemptFailed(
                    f"policy {uri} has the content hash {package.digest}, not {digest}",
                    retryable=False,
                    reason="policy_invalid",
                )
        else:
            if digest is None:
                raise AttemptFailed(
                    f"policy {uri!r} needs a policyRuleDigest (its content hash: "
                    "`gridmesh policy hash PATH`)",
                    retryable=False,
                    reason="policy_invalid",
                )
            try:
                package = load_package(
                    self._path(uri), expected_digest=digest, allowed=self.allowed
                )
            except SandboxError as exc:
                raise AttemptFailed(
                    f"policy {uri!r}: {exc}", retryable=False, reason=f"policy_{exc.kind}"
                ) from None
            except OSError as exc:
                raise AttemptFailed(
                    f"policy {uri!r} cannot be read: {exc.strerror or exc}",
                    retryable=False,
                    reason="policy_unknown",
                ) from None
        if len(self._packages) >= MAX_CACHED:
            self._packages.pop(next(iter(self._packages)))
        self._packages[key] = package
        return package

    def _path(self, uri: str) -> Path:
        raw = uri.removeprefix("file:")
        if raw.startswith("/"):
            return Path(raw)
        if self.home is None or "/" in raw or raw in ("", ".", ".."):
            raise OSError(f"{uri!r} is neither an absolute path nor a name under policies/")
        return self.home / "policies" / raw

    def ref(self, rule: PolicyRule, rule_id: str) -> PolicyRef:
        return self.package(rule.uri, rule.digest).bind(rule_id, rule.settings, rule.parameters)


Pool = Callable[[], Awaitable[Any]]  # the sandbox pool, started on first use


class SandboxPolicies:
    """`Policies` for the executor: rules run in the sandbox pool, each call bounded by the
    request's deadline and the pool's own."""

    def __init__(self, store: PolicyStore, pool: Pool) -> None:
        self.store = store
        self.pool = pool

    async def call(
        self, rule: PolicyRule, rule_id: str, input_data: Any, context: dict[str, Any]
    ) -> Any:
        ref = self.store.ref(rule, rule_id)
        pool = await self.pool()
        left = trio.current_effective_deadline() - trio.current_time()
        timeout = None if left == float("inf") else max(left, 0.001)
        if timeout is not None:
            timeout = min(timeout, pool.config.call_timeout_s)
        args = {"parameters": rule.parameters, "input_data": input_data, "context": context}
        try:
            return await pool.call(ref, "eval", args, timeout_s=timeout)
        except SandboxError as exc:
            raise AttemptFailed(
                f"policy {rule.uri}: {exc}", retryable=False, reason=f"policy_{exc.kind}"
            ) from None

    async def eval(self, rule: PolicyRule, step: PlanStep, input_data: Any, ctx: RunContext) -> Any:
        return await self.call(rule, f"{ctx.vdag}/{step.label}", input_data, ctx.for_step(step))
