"""A sandbox worker: the process that runs policy code. Started by the pool as
`python -E -s -B -c <bootstrap> CONFIG_JSON`; it puts itself into its isolation layers
(daemon.sandbox.layers) *before* any policy code exists in it, says hello with the layer
report, then serves requests from the pool, one at a time, until its pipe closes:

    {"op": "load", "digest": "sha256:...", "files": {path: bytes}}   -> {"ok": true}
    {"op": "call", "instance": [rule_id, settings, parameters],
     "method": "eval" | "management", "args": {...}}                 -> {"ok": true, "result": x}
    {"op": "ping"}                                                    -> {"ok": true}

A failure answers {"ok": false, "kind": ..., "type": ..., "message": ...}. A worker loads
one policy in its life (the pool never hands it another), so policies never share a process.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path
from typing import Any

import msgpack
import msgspec

from daemon.sandbox import layers, loader, wire
from daemon.sandbox.errors import MessageTooLarge, SandboxError
from daemon.sandbox.package import MAX_FILES, MAX_PACKAGE_BYTES

METHODS = {"eval": ("parameters", "input_data", "context"), "management": ("action", "data")}
MAX_TRACE_CHARS = 4000


class WorkerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What the pool tells a worker on its command line."""

    request_fd: int
    reply_fd: int
    max_request_bytes: int
    max_reply_bytes: int
    allowed_packages: tuple[str, ...] = ()
    isolation: layers.LayerConfig


def failure(exc: BaseException, kind: str | None = None) -> dict[str, Any]:
    """The reply for an exception: its kind, type, message and (bounded) traceback."""
    if isinstance(exc, SandboxError):
        kind, message = kind or exc.kind, exc.message
    else:
        message = str(exc)[-MAX_TRACE_CHARS:]
    trace = "".join(traceback.format_exception(exc))[-MAX_TRACE_CHARS:]
    return {
        "ok": False,
        "kind": kind or "policy_error",
        "type": type(exc).__name__,
        "message": message,
        "traceback": trace,
    }


class Worker:
    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.policy: loader.LoadedPolicy | None = None
        self.digest = ""

    def handle(self, request: Any) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return failure(ValueError("a request is a map with an op"), "protocol")
        op = request["op"]
        if op == "ping":
            return {"ok": True}
        if op == "load":
            if self.policy is not None:
                return failure(ValueError("this worker already holds a policy"), "protocol")
            files, digest = request.get("files"), request.get("digest")
            if not isinstance(files, dict) or not isinstance(digest, str):
                return failure(ValueError("load needs files and digest"), "protocol")
            try:
                self.policy = loader.load(
                    files,
                    digest,
                    allowed=self.config.allowed_packages,
                    root=self._package_root(),
                )
            except BaseException as exc:  # the policy's import-time code may raise anything
                kind = "dependency" if isinstance(exc, ImportError) else None
                return failure(exc, kind)
            self.digest = digest
            return {"ok": True}
        if op == "call":
            return self.call(request)
        return failure(ValueError(f"unknown op {op!r}"), "protocol")

    def _package_root(self) -> Path:
        root = Path(self.config.isolation.scratch) / "package"
        root.mkdir(exist_ok=True)
        return root

    def call(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.policy is None:
            return failure(ValueError("no policy loaded"), "protocol")
        method, args, instance = request.get("method"), request.get("args"), request.get("instance")
        if method not in METHODS or not isinstance(args, dict):
            return failure(ValueError(f"method must be one of {sorted(METHODS)}"), "protocol")
        if not (isinstance(instance, list) and len(instance) == 3):
            return failure(ValueError("instance is [rule_id, settings, parameters]"), "protocol")
        try:
            key = msgpack.packb(instance, use_bin_type=True)
            target = self.policy.instance(key, *instance)
            result = getattr(target, method)(*(args.get(name) for name in METHODS[method]))
        except BaseException as exc:  # SystemExit from a policy is a failure, not an exit
            return failure(exc)
        return {"ok": True, "result": result}


def serve(config: WorkerConfig) -> None:
    worker = Worker(config)
    read_limit = max(config.max_request_bytes, loader_limit()) + 65536
    while True:
        try:
            request = wire.read_frame(config.request_fd, read_limit)
        except EOFError:
            return
        reply = worker.handle(request)
        try:
            frame = wire.encode(reply, config.max_reply_bytes, "the policy's reply")
        except MessageTooLarge as exc:
            frame = wire.encode(failure(exc), config.max_reply_bytes)
        except TypeError as exc:
            frame = wire.encode(failure(exc, "policy_error"), config.max_reply_bytes)
        wire.write_all(config.reply_fd, frame)


def loader_limit() -> int:
    return MAX_PACKAGE_BYTES + MAX_FILES * 512


def forget_our_modules() -> None:
    """Removes from sys.modules what is not the standard library (msgpack, msgspec, ours):
    the worker keeps its references, and the import guard refuses them to the policy."""
    for name in list(sys.modules):
        if name.partition(".")[0] not in sys.stdlib_module_names:
            del sys.modules[name]


def main() -> None:
    config = msgspec.json.decode(sys.argv[1].encode(), type=WorkerConfig)
    if "" in sys.path:
        sys.path.remove("")
    report = layers.apply(config.isolation)
    hello = {"ok": True, "pid": os.getpid(), "layers": report}
    forget_our_modules()
    wire.write_all(config.reply_fd, wire.encode(hello, config.max_reply_bytes))
    serve(config)


if __name__ == "__main__":
    main()
