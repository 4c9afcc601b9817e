"""The sandbox's errors: one root (`SandboxError`) and a class per kind of failure. `kind`
is stable and machine-readable; it is also the label under which the pool counts the
failure (`SandboxCounters.failures`)."""

from __future__ import annotations

from typing import ClassVar


class SandboxError(Exception):
    """A policy call (or a policy load) that did not produce a result."""

    kind: ClassVar[str] = "sandbox"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PolicyInvalid(SandboxError):
    """The package is malformed: bad manifest, unsafe path, too big, or not the content its
    hash names (a policy changed under its hash)."""

    kind = "invalid"


class DependencyRefused(PolicyInvalid):
    """The manifest asks for a package that is not on the operator's allow-list, or the code
    imports one that its manifest does not name."""

    kind = "dependency"


class IsolationRefused(SandboxError):
    """An untrusted policy, and no isolation layer active (and the operator did not opt in
    to run policies without one), or a layer the operator requires is missing."""

    kind = "isolation"


class PolicyFailed(SandboxError):
    """The policy's own code raised (its exception type and message are in the text)."""

    kind = "policy_error"

    def __init__(self, message: str, error_type: str = "Exception", traceback: str = "") -> None:
        super().__init__(message)
        self.error_type = error_type
        self.traceback = traceback


class CallTimeout(SandboxError):
    """The call ran past its wall-clock deadline: the worker was killed and replaced."""

    kind = "timeout"


class WorkerCrashed(SandboxError):
    """The worker died during the call (a signal, a resource limit, a broken pipe) or broke
    the protocol; it was replaced."""

    kind = "crashed"


class MessageTooLarge(SandboxError):
    """A request or a reply over its size bound."""

    kind = "too_large"


class PoolClosed(SandboxError):
    """The pool is not running (not entered, or already closed)."""

    kind = "closed"
