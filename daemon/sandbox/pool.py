"""The pool of sandbox workers (trio): starts them, keeps them warm, hands each call to an
idle worker already holding its policy, and replaces a worker that dies, runs past its
deadline or breaks the protocol. A worker holds one policy in its life; a few unbound
spares wait so that a new policy does not pay for a process start."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec
import trio

from daemon.sandbox import layers as layers_mod
from daemon.sandbox import wire
from daemon.sandbox.config import ALL_LAYERS, SandboxConfig
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
from daemon.sandbox.package import MAX_FILES, MAX_PACKAGE_BYTES, PolicyPackage, PolicyRef
from daemon.sandbox.worker import METHODS, WorkerConfig

ROOT = str(Path(__file__).resolve().parents[2])
# the worker imports from the daemon's own sys.path (a user site or PYTHONPATH included,
# which -E -s would drop); filled in at each start
BOOTSTRAP = "import sys; sys.path[:0] = {paths!r}; from daemon.sandbox.worker import main; main()"
WORKER_ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}  # none of the daemon's
START_TIMEOUT_S = 30.0
SIGNALS = {
    signal.SIGXCPU: "its CPU-time limit",
    signal.SIGKILL: "SIGKILL",
    signal.SIGSEGV: "a segmentation fault",
    signal.SIGSYS: "a forbidden system call",
    signal.SIGXFSZ: "its file-size limit",
}
KINDS: dict[str, type[SandboxError]] = {
    "invalid": PolicyInvalid,
    "dependency": DependencyRefused,
    "too_large": MessageTooLarge,
}


@dataclasses.dataclass
class SandboxCounters:
    """Plain counters for /metrics: calls made, calls that returned, failures by kind
    (SandboxError.kind), workers the pool killed (deadline, oversized reply, protocol,
    failed load, eviction), workers that died by themselves, workers started."""

    calls: int = 0
    ok: int = 0
    failures: collections.Counter[str] = dataclasses.field(default_factory=collections.Counter)
    kills: int = 0
    crashes: int = 0
    started: int = 0

    def snapshot(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "failures": dict(self.failures)}


def package_dirs(names: Iterable[str]) -> list[str]:
    """Where the allowed packages are installed (Landlock lets workers read there), found
    without importing them."""
    found = []
    for name in names:
        try:
            spec = importlib.util.find_spec(name)
        except (ImportError, ValueError):
            continue
        if spec is None:
            continue
        if spec.submodule_search_locations:
            found.extend(spec.submodule_search_locations)
        elif spec.origin and os.path.isabs(spec.origin):
            found.append(os.path.dirname(spec.origin))
    return found


class _Worker:
    def __init__(self, process: trio.Process, scratch: Path, send: Any, reader: wire.FrameReader):
        self.process = process
        self.scratch = scratch
        self.send = send
        self.reader = reader
        self.digest: str | None = None
        self.layers: dict[str, str] = {}
        self.calls = 0
        self.dead = False


class SandboxPool:
    """`async with SandboxPool(config, hidden_paths=[home]) as pool:
    await pool.call(policy, "eval", {...})` — see daemon.sandbox's docstring."""

    def __init__(
        self,
        config: SandboxConfig | None = None,
        *,
        hidden_paths: Iterable[str | Path] = (),
        base_dir: str | Path | None = None,
    ) -> None:
        self.config = config or SandboxConfig()
        self.hidden_paths = tuple(
            str(Path(p).resolve()) for p in (*hidden_paths, *self.config.hidden_paths)
        )
        self.base_dir = base_dir
        self.counters = SandboxCounters()
        self.layers: dict[str, str] = {}
        self._idle: dict[str, list[_Worker]] = collections.defaultdict(list)
        self._bound: collections.Counter[str] = collections.Counter()
        self._spares: list[_Worker] = []
        self._workers: set[_Worker] = set()
        self._live = 0  # workers running or starting
        self._starting = 0
        self._lot = trio.lowlevel.ParkingLot()
        self._nursery: trio.Nursery | None = None
        self._stack = contextlib.AsyncExitStack()
        self._base = Path()

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> SandboxPool:
        self._base = Path(tempfile.mkdtemp(prefix="gridmesh-sandbox-", dir=self.base_dir))
        os.chmod(self._base, 0o700)
        self._nursery = await self._stack.enter_async_context(trio.open_nursery())
        try:
            self._live += 1
            first = await self._start_worker()
            self.layers = first.layers
            self._spares.append(first)
            self._nursery.start_soon(self._refill)
        except BaseException:
            await self.__aexit__(*sys.exc_info())
            raise
        return self

    async def __aexit__(self, *exc: Any) -> bool | None:
        nursery, self._nursery = self._nursery, None
        workers = list(self._workers)
        for worker in workers:
            self._kill(worker, count=False)
        with trio.move_on_after(2.0, shield=True):  # reap them: no zombies left behind
            for worker in workers:
                await worker.process.wait()
        if nursery is not None:
            nursery.cancel_scope.cancel()
        self._lot.unpark_all()
        try:
            # the body's own exception is not handed to the nursery (it would wrap it in an
            # ExceptionGroup): it propagates as it is
            await self._stack.__aexit__(None, None, None)
            return None
        finally:
            shutil.rmtree(self._base, ignore_errors=True)

    def snapshot(self) -> dict[str, Any]:
        """Counters, layers and workers, for /metrics (daemon.sandbox.metrics)."""
        return {
            **self.counters.snapshot(),
            "layers": dict(self.layers),
            "workers": {
                "live": len(self._workers),
                "spare": len(self._spares),
                "idle": sum(len(idle) for idle in self._idle.values()),
            },
        }

    @property
    def isolated(self) -> bool:
        """Whether at least one isolation layer (beyond rlimits) is on."""
        return any(self.layers.get(name, "").startswith("on") for name in ALL_LAYERS)

    def _check_open(self) -> trio.Nursery:
        if self._nursery is None:
            raise PoolClosed("the sandbox pool is not running")
        return self._nursery

    # -- workers --------------------------------------------------------------------------

    def _worker_config(self, scratch: Path, request_fd: int, reply_fd: int) -> WorkerConfig:
        c = self.config
        isolation = layers_mod.LayerConfig(
            scratch=str(scratch),
            hidden_paths=self.hidden_paths,
            read_paths=(*c.read_paths, *package_dirs(c.allowed_packages)),
            cpu_s=c.cpu_s,
            memory_bytes=c.memory_mib << 20,
            open_files=c.open_files,
            file_size_bytes=c.file_size_mib << 20,
            processes=c.processes,
            scratch_bytes=c.scratch_mib << 20,
            layers=c.layers,
        )
        return WorkerConfig(
            request_fd=request_fd,
            reply_fd=reply_fd,
            max_request_bytes=c.max_request_bytes,
            max_reply_bytes=c.max_reply_bytes,
            allowed_packages=c.allowed_packages,
            isolation=isolation,
        )

    async def _start_worker(self) -> _Worker:
        """A new worker, said hello (the caller has counted it in `_live`)."""
        nursery = self._check_open()
        scratch = Path(tempfile.mkdtemp(dir=self._base))
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        config = self._worker_config(scratch, request_r, reply_w)
        argv = [
            sys.executable,
            "-E",
            "-s",
            "-B",
            "-c",
            BOOTSTRAP.format(paths=[ROOT, *(p for p in sys.path if p)]),
            msgspec.json.encode(config).decode(),
        ]
        try:
            with open(scratch.with_suffix(".log"), "wb") as log:  # noqa: ASYNC230 (local, once)
                process = await trio.lowlevel.open_process(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=log,
                    pass_fds=(request_r, reply_w),
                    cwd=scratch,
                    env=WORKER_ENV,
                    start_new_session=True,
                )
        except BaseException:
            for fd in (request_r, request_w, reply_r, reply_w):
                os.close(fd)
            self._live -= 1
            raise
        os.close(request_r)
        os.close(reply_w)
        worker = _Worker(
            process,
            scratch,
            trio.lowlevel.FdStream(request_w),
            wire.FrameReader(trio.lowlevel.FdStream(reply_r)),
        )
        self._workers.add(worker)
        self.counters.started += 1
        nursery.start_soon(self._watch, worker)  # reaps it whenever it exits
        try:
            with trio.fail_after(START_TIMEOUT_S):
                hello = await worker.reader.receive(self.config.max_reply_bytes, "hello")
        except (
            trio.TooSlowError,
            SandboxError,
            trio.BrokenResourceError,
            trio.ClosedResourceError,
        ) as exc:
            reason = await self._death(worker)
            log = self._log_tail(worker)
            self._kill(worker, count=False)
            raise WorkerCrashed(
                f"a sandbox worker failed to start ({reason or exc}){log}"
            ) from None
        except BaseException:  # cancelled while it started
            self._kill(worker, count=False)
            raise
        worker.layers = dict(hello.get("layers", {})) if isinstance(hello, dict) else {}
        lost = [
            n
            for n, s in self.layers.items()
            if s.startswith("on") and not worker.layers.get(n, "").startswith("on")
        ]
        if lost:
            self._kill(worker, count=False)
            raise IsolationRefused(f"a new worker lacks layers the first had: {', '.join(lost)}")
        return worker

    def _log_tail(self, worker: _Worker) -> str:
        try:
            tail = worker.scratch.with_suffix(".log").read_bytes()[-1500:].decode(errors="replace")
        except OSError:
            return ""
        return f": {tail.strip()}" if tail.strip() else ""

    async def _watch(self, worker: _Worker) -> None:
        """Reaps the worker's process and removes its files once it exits."""
        await worker.process.wait()
        self._died(worker)  # unless the pool killed it: then it is dead already
        for stream in (worker.send, worker.reader.stream):
            with contextlib.suppress(Exception):
                await stream.aclose()
        shutil.rmtree(worker.scratch, ignore_errors=True)
        with contextlib.suppress(OSError):
            worker.scratch.with_suffix(".log").unlink()

    def _died(self, worker: _Worker) -> None:
        """The worker exited by itself (a limit, a signal, its own exit): counted once."""
        if not worker.dead:
            self.counters.crashes += 1
            self._forget(worker)

    def _forget(self, worker: _Worker) -> None:
        if worker.dead:
            return
        worker.dead = True
        self._live -= 1
        self._workers.discard(worker)
        if worker in self._spares:
            self._spares.remove(worker)
        if worker.digest is not None:
            self._bound[worker.digest] -= 1
            idle = self._idle.get(worker.digest, [])
            if worker in idle:
                idle.remove(worker)
        self._lot.unpark_all()
        if self._nursery is not None:
            self._nursery.start_soon(self._refill)

    def _kill(self, worker: _Worker, *, count: bool = True) -> None:
        if worker.process.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(worker.process.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            if count and not worker.dead:
                self.counters.kills += 1
        self._forget(worker)

    async def _death(self, worker: _Worker) -> str:
        """Why the worker exited (waiting a moment for it to), or "" if it still runs."""
        with trio.move_on_after(1.0):
            await worker.process.wait()
        code = worker.process.returncode
        if code is None:
            return ""
        if code < 0:
            sig = signal.Signals(-code)
            return f"killed by {sig.name}: {SIGNALS.get(sig, 'a signal')}"
        return f"exit status {code}"

    async def _refill(self) -> None:
        while (
            self._nursery is not None
            and len(self._spares) + self._starting < self.config.spare_workers
            and self._live < self.config.max_workers
        ):
            self._starting += 1
            self._live += 1
            try:
                worker = await self._start_worker()
            except SandboxError:
                return  # the next call starts one itself and reports why
            finally:
                self._starting -= 1
            self._spares.append(worker)
            self._lot.unpark_all()

    async def _acquire(self, ref: PolicyRef) -> _Worker:
        digest = ref.package.digest
        while True:
            self._check_open()
            idle = self._idle.get(digest)
            if idle:
                return idle.pop()
            most = 1 if ref.package.manifest.stateful else self.config.workers_per_policy
            if self._bound[digest] < most:
                self._bound[digest] += 1  # reserved before any await: others see it
                try:
                    worker = await self._new_worker()
                except BaseException:
                    self._bound[digest] -= 1
                    raise
                if worker is None:
                    self._bound[digest] -= 1
                else:
                    worker.digest = digest  # from now on _forget releases the reservation
                    await self._load(worker, ref)
                    return worker
            await self._lot.park()

    async def _new_worker(self) -> _Worker | None:
        """A worker to bind: a spare, a new one, or one made room for by retiring an idle
        worker of another policy (the longest idle of its policy); None if all are busy."""
        if self._spares:
            worker = self._spares.pop()
            self._check_open().start_soon(self._refill)
            return worker
        if self._live >= self.config.max_workers:
            candidates = [w for ws in self._idle.values() for w in ws]
            if not candidates:
                return None
            self._kill(candidates[0], count=False)
        self._live += 1
        return await self._start_worker()

    async def _load(self, worker: _Worker, ref: PolicyRef) -> None:
        package = ref.package
        message = {"op": "load", "digest": package.digest, "files": dict(package.files)}
        frame = wire.encode(message, MAX_PACKAGE_BYTES + MAX_FILES * 512, "the package")
        try:
            reply = await self._exchange(worker, frame, self.config.load_timeout_s, package)
            self._unwrap(reply, package, "load")
        except BaseException:
            self._kill(worker, count=True)
            raise

    def _release(self, worker: _Worker) -> None:
        if worker.dead:
            return
        worker.calls += 1
        if worker.calls >= self.config.max_calls_per_worker:
            self._kill(worker, count=False)
            return
        assert worker.digest is not None
        self._idle[worker.digest].append(worker)
        self._lot.unpark_all()

    # -- calls ----------------------------------------------------------------------------

    async def _exchange(
        self, worker: _Worker, frame: bytes, deadline_s: float, package: PolicyPackage
    ) -> Any:
        name = package.manifest.name
        done = False
        try:
            with trio.move_on_after(deadline_s) as scope:
                await worker.send.send_all(frame)
                reply = await worker.reader.receive(self.config.max_reply_bytes, "reply")
                done = True
            if scope.cancelled_caught:
                self._kill(worker)
                raise CallTimeout(
                    f"policy {name} ran past its deadline of {deadline_s:g} s: its worker was "
                    "killed and replaced"
                )
            return reply
        except MessageTooLarge as exc:
            self._kill(worker)
            raise MessageTooLarge(
                f"policy {name}'s {exc.message}; its worker was replaced"
            ) from None
        except (WorkerCrashed, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            reason = await self._death(worker)
            if worker.process.returncode is not None:
                self._died(worker)
            else:  # alive but broke the protocol
                self._kill(worker)
            detail = reason or getattr(exc, "message", str(exc))
            raise WorkerCrashed(
                f"policy {name}'s worker died during the call ({detail}); it was replaced"
            ) from None
        finally:
            if not done and not worker.dead:  # cancelled from outside mid-call
                self._kill(worker)

    def _unwrap(self, reply: Any, package: PolicyPackage, method: str) -> Any:
        if not isinstance(reply, dict) or not isinstance(reply.get("ok"), bool):
            raise WorkerCrashed(f"policy {package.manifest.name}'s worker sent a malformed reply")
        if reply["ok"]:
            return reply.get("result")
        kind, kind_type = str(reply.get("kind")), str(reply.get("type"))
        message = str(reply.get("message"))[-4000:]
        name = package.manifest.name
        if kind == "policy_error":
            trace = str(reply.get("traceback", ""))[-4000:]
            raise PolicyFailed(
                f"policy {name} {method} raised {kind_type}: {message}", kind_type, trace
            )
        error = KINDS.get(kind, SandboxError)
        raise error(f"policy {name} ({method}): {message}")

    def _admit(self, ref: PolicyRef) -> None:
        missing = [
            layer
            for layer in self.config.required_layers
            if not self.layers.get(layer, "").startswith("on")
        ]
        if missing:
            raise IsolationRefused(
                f"sandbox.required_layers names {', '.join(missing)}, off on this node: "
                + "; ".join(f"{n}: {self.layers.get(n)}" for n in missing)
            )
        if ref.package.trusted or self.isolated or self.config.run_unisolated:
            return
        state = "; ".join(f"{n}: {self.layers.get(n)}" for n in ALL_LAYERS)
        raise IsolationRefused(
            f"refusing untrusted policy {ref.package.manifest.name}: no isolation layer is on "
            f"({state}); set sandbox.run_unisolated = true to run it anyway"
        )

    async def call(
        self,
        policy: PolicyRef | PolicyPackage,
        method: str,
        args: Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Any:
        """`policy.method(**args)` in a worker; its result (any msgpack value). Raises a
        SandboxError subclass (its `kind` is the failure's label), counted in `counters`."""
        ref = policy.bind() if isinstance(policy, PolicyPackage) else policy
        if method not in METHODS:
            raise ValueError(f"method must be one of {sorted(METHODS)}, not {method!r}")
        unknown = set(args or {}) - set(METHODS[method])
        if unknown:
            raise ValueError(f"{method} takes {', '.join(METHODS[method])}; not {sorted(unknown)}")
        self.counters.calls += 1
        try:
            self._check_open()
            self._admit(ref)
            message = {
                "op": "call",
                "instance": [ref.rule_id, ref.settings, ref.parameters],
                "method": method,
                "args": dict(args or {}),
            }
            try:
                frame = wire.encode(message, self.config.max_request_bytes, "the request")
            except TypeError as exc:
                raise PolicyInvalid(str(exc)) from None
            worker = await self._acquire(ref)
            try:
                reply = await self._exchange(
                    worker, frame, timeout_s or self.config.call_timeout_s, ref.package
                )
            finally:
                self._release(worker)
            result = self._unwrap(reply, ref.package, method)
        except SandboxError as exc:
            self.counters.failures[exc.kind] += 1
            raise
        self.counters.ok += 1
        return result
