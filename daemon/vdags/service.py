"""The vDAG service of a daemon: runs vDAGs (`infer`), serves Python blocks to other
daemons' vDAGs, and owns the sandbox pool that policies and Python blocks run in.

The pool is started in the daemon's nursery (`run`) on first use — a daemon that never runs
a policy or a Python block starts no worker process — with the node's `[sandbox]` settings
(its home hidden from every worker), and closed with the daemon. Where it cannot start (no
isolation layer for an untrusted package, a worker that fails), the call that needed it
gets the sandbox's error, and the next call tries again.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import trio
from prometheus_client import Counter, Histogram

from daemon import errors
from daemon.sandbox.config import SandboxConfig
from daemon.sandbox.errors import SandboxError
from daemon.vdags.executor import DeadlineExceeded, Executor, NodeFailed, RunContext
from daemon.vdags.policies import PolicyStore, SandboxPolicies
from daemon.vdags.protocol import (
    BLOCK_PROTOCOL,
    MAX_MESSAGE_BYTES,
    BlockCall,
    BlockReply,
    ProtocolError,
    decode_call,
    encode,
    instance_key,
    instance_value,
)
from daemon.vdags.pyblocks import PythonBlock, load_block
from daemon.vdags.runner import DaemonRunner
from daemon.vdags.streams import BLOCK_STREAM_PROTOCOL, MUX_PROTOCOL, mux_handler, stream_handler
from daemon.vdags.values import MAX_DEADLINE_S, ValueRefused, check_value
from p2p.network import NetworkError
from registry.vdags import PolicyRule
from scheduler.vdag import VdagPlan

log = logging.getLogger(__name__)

MAX_BLOCKS = 64  # Python blocks one daemon serves
MAX_REQUESTS = 64  # vDAG requests running here at once (more: busy)
MAX_SERVED_CALLS = 256  # Python-block calls from peers running here at once (more: busy)
ANSWER_TIMEOUT_S = MAX_DEADLINE_S + 5


class VdagService:
    def __init__(
        self,
        *,
        peer_id: str,
        net: Any,
        replicator: Any,
        shards: Any,
        metrics: Any,
        home: Path | None,
        sandbox: SandboxConfig | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.net = net
        self.replicator = replicator
        self.replica = replicator.replica
        self.metrics = metrics
        self.home = home
        self.sandbox_config = sandbox or SandboxConfig()
        self.blocks: dict[str, PythonBlock] = {}
        self.store = PolicyStore(home, self.sandbox_config.allowed_packages)
        self.policies = SandboxPolicies(self.store, self.pool)
        self.runner = DaemonRunner(peer_id, net, self.replica, shards, self)
        self.executor = Executor(self.runner, self.policies)
        self._pool: Any = None
        self._pool_error: SandboxError | None = None
        self._want_pool = trio.Event()
        self._pool_ready = trio.Event()
        self._running = False
        self._collector = False
        self.running = 0  # vDAG requests
        self.serving = 0  # block calls
        reg = metrics.registry
        self.requests = Counter(
            "gridmesh_vdag_requests", "vDAG requests by outcome", ["outcome"], registry=reg
        )
        self.node_failures = Counter(
            "gridmesh_vdag_node_failures",
            "vDAG steps that failed, by reason",
            ["reason"],
            registry=reg,
        )
        self.block_calls = Counter(
            "gridmesh_vdag_block_calls",
            "Python-block calls served here, by outcome",
            ["outcome"],
            registry=reg,
        )
        self.seconds = Histogram(
            "gridmesh_vdag_seconds",
            "vDAG request time",
            registry=reg,
            buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 2, 10, 60),
        )
        net.set_request_handler(BLOCK_PROTOCOL, self.answer, timeout_s=ANSWER_TIMEOUT_S)

        def reject(reason: str) -> None:
            metrics.reject("vdag", reason)

        mux = mux_handler(self.run_block, reject)
        net.set_stream_handler(MUX_PROTOCOL, mux, MAX_MESSAGE_BYTES)
        serve = stream_handler(self.run_block, reject)
        net.set_stream_handler(BLOCK_STREAM_PROTOCOL, serve, MAX_MESSAGE_BYTES)

    # -- the sandbox pool -------------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start the pool when first needed; hold it until the daemon stops."""
        from daemon.sandbox.metrics import SandboxCollector
        from daemon.sandbox.pool import SandboxPool

        self._running = True
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(self.runner.streams.run)
                task_status.started()
                await self._hold_pool(SandboxPool, SandboxCollector)
        finally:
            self._pool = None
            self._running = False

    async def _hold_pool(self, pool_type: Any, collector_type: Any) -> None:
        while True:
            await self._want_pool.wait()
            hidden = [self.home] if self.home is not None else []
            try:
                async with pool_type(self.sandbox_config, hidden_paths=hidden) as pool:
                    self._pool, self._pool_error = pool, None
                    if not self._collector:
                        self._collector = True
                        self.metrics.registry.register(collector_type(self._snapshot))
                    self._pool_ready.set()
                    await trio.sleep_forever()
            except SandboxError as exc:
                log.warning("the sandbox pool cannot start: %s", exc)
                self._pool_error = exc
                self._want_pool = trio.Event()
                ready, self._pool_ready = self._pool_ready, trio.Event()
                ready.set()

    def _snapshot(self) -> dict[str, Any]:
        pool = self._pool
        if pool is not None:
            return pool.snapshot()
        return {
            "calls": 0,
            "ok": 0,
            "kills": 0,
            "crashes": 0,
            "started": 0,
            "failures": {},
            "workers": {},
            "layers": {},
        }

    async def pool(self) -> Any:
        """The running pool (started on first use); SandboxError when it cannot start."""
        if self._pool is not None:
            return self._pool
        if not self._running:
            from daemon.sandbox.errors import PoolClosed

            raise PoolClosed("the sandbox pool is not running (the daemon is not)")
        ready = self._pool_ready
        self._want_pool.set()
        await ready.wait()
        if self._pool is None:
            raise self._pool_error or SandboxError("the sandbox pool did not start")
        return self._pool

    # -- Python blocks served here ------------------------------------------------------------

    async def serve_block(
        self,
        block_id: str,
        path: str,
        *,
        digest: str | None,
        settings: dict[str, Any] | None = None,
        parameters: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Load the block package at `path` (hash checked against `digest`), check it runs
        (its `health` in the sandbox), and announce this daemon as an instance of it."""
        if block_id not in self.blocks and len(self.blocks) >= MAX_BLOCKS:
            raise errors.Busy(f"this node serves {MAX_BLOCKS} Python blocks already")
        try:
            block = await trio.to_thread.run_sync(
                lambda: load_block(
                    block_id,
                    path,
                    digest=digest,
                    allowed=self.sandbox_config.allowed_packages,
                    settings=settings,
                    parameters=parameters,
                )
            )
            pool = await self.pool()
            healthy = await pool.call(block.ref, "management", {"action": "health", "data": None})
        except SandboxError as exc:
            raise errors.InvalidParams(
                f"block {block_id!r} cannot be served: {exc}", {"reason": exc.kind}
            ) from None
        except OSError as exc:
            raise errors.InvalidParams(f"block {block_id!r}: {exc}") from None
        self.blocks[block_id] = block
        value = instance_value(block_id, self.peer_id, block.digest)
        await self.replicator.write("blocks", instance_key(block_id, self.peer_id), value)
        return {"block": block_id, "digest": block.digest, "health": healthy}

    async def unserve_block(self, block_id: str) -> bool:
        if self.blocks.pop(block_id, None) is None:
            return False
        await self.replicator.write("blocks", instance_key(block_id, self.peer_id), None)
        return True

    async def update_block(self, block_id: str, parameters: dict[str, Any]) -> Any:
        """AIOS's on_update on a block served here (one worker: a block that keeps state
        declares "stateful": true, so that all its calls go to that one worker)."""
        block = self.blocks.get(block_id)
        if block is None:
            raise errors.NotFound(f"this node does not serve block {block_id!r}")
        try:
            pool = await self.pool()
            args = {"action": "update", "data": parameters}
            return await pool.call(block.ref, "management", args)
        except SandboxError as exc:
            raise errors.FailedPrecondition(
                f"block {block_id!r}: {exc}", {"reason": exc.kind}
            ) from None

    async def list_blocks(self) -> list[dict[str, Any]]:
        """The Python blocks served here, each with its health (AIOS's health())."""
        out = []
        for block_id, block in sorted(self.blocks.items()):
            try:
                pool = await self.pool()
                args = {"action": "health", "data": None}
                health: Any = await pool.call(block.ref, "management", args)
            except SandboxError as exc:
                health = f"unhealthy: {exc}"
            out.append(
                {
                    "block": block_id,
                    "digest": block.digest,
                    "source": block.package.source,
                    "calls": block.calls,
                    "running": block.inflight,
                    "health": health,
                }
            )
        return out

    async def answer(self, sender: str, payload: bytes) -> bytes:
        """The block protocol's handler: one call of a block served here."""
        try:
            call = decode_call(payload)
        except ProtocolError as exc:
            self.metrics.reject("vdag", exc.reason)
            raise NetworkError(f"vDAG block call refused: {exc}") from None
        return encode(await self.run_block(call))

    async def run_block(self, call: BlockCall) -> BlockReply:
        """Run `call` on a block served here; every failure is a reply, never raised."""
        block = self.blocks.get(call.block)
        if block is None or (call.digest is not None and call.digest != block.digest):
            self.block_calls.labels("unknown_block").inc()
            return BlockReply(False, kind="unknown_block", message="not served here")
        if self.serving >= MAX_SERVED_CALLS:
            self.block_calls.labels("busy").inc()
            message = f"busy: {MAX_SERVED_CALLS} block calls running here"
            return BlockReply(False, kind="busy", message=message, load=block.inflight)
        block.inflight += 1
        self.serving += 1
        try:
            pool = await self.pool()
            args = {"parameters": None, "input_data": call.input, "context": call.context}
            timeout = min(call.timeout_s, pool.config.call_timeout_s)
            output = await pool.call(block.ref, "eval", args, timeout_s=timeout)
            check_value(output, f"block {call.block}'s output")
        except SandboxError as exc:
            self.block_calls.labels(exc.kind).inc()
            message = str(exc)[-4000:]
            return BlockReply(False, kind=exc.kind, message=message, load=block.inflight - 1)
        except ValueRefused as exc:
            self.block_calls.labels("too_large").inc()
            return BlockReply(False, kind="output", message=str(exc), load=block.inflight - 1)
        finally:
            block.inflight -= 1
            self.serving -= 1
            block.calls += 1
        self.block_calls.labels("ok").inc()
        return BlockReply(True, output=output, load=block.inflight)

    # -- running vDAGs ----------------------------------------------------------------------

    async def infer(
        self,
        plan: VdagPlan,
        controller: dict[str, Any],
        value: Any,
        *,
        deadline_s: float,
        session: str | None = None,
        api_key: str | None = None,
    ) -> dict[str, Any]:
        """Run `plan` on `value`: {output, vdag, steps (trace)}; GridmeshError kinds for the
        caller: InvalidParams (input), Busy (quota), Unavailable (a node, the deadline)."""
        start = trio.current_time()
        uri = f"{plan.name}:{plan.version}"
        try:
            check_value(value, "the input")
        except ValueRefused as exc:
            self.metrics.reject("vdag", exc.reason)
            self.requests.labels("invalid").inc()
            raise errors.InvalidParams(str(exc), {"reason": exc.reason}) from None
        if self.running >= MAX_REQUESTS:
            self.requests.labels("busy").inc()
            raise errors.Busy(f"busy: {MAX_REQUESTS} vDAG requests are running on this node")
        ctx = RunContext(uri, session=session, api_key=api_key)
        self.running += 1
        try:
            await self._quota(controller, ctx)
            result = await self.executor.run(plan, value, ctx, deadline_s=deadline_s)
        except NodeFailed as exc:
            self.requests.labels("node_failed").inc()
            self.node_failures.labels(exc.reason).inc()
            raise errors.Unavailable(
                str(exc), {"reason": "node", "node": exc.node, "why": exc.reason}
            ) from None
        except DeadlineExceeded as exc:
            self.requests.labels("deadline").inc()
            raise errors.Unavailable(
                str(exc), {"reason": "deadline", "running": exc.running}
            ) from None
        except errors.Busy:
            self.requests.labels("quota").inc()
            raise
        finally:
            self.running -= 1
        self.requests.labels("ok").inc()
        self.seconds.observe(trio.current_time() - start)
        return {"vdag": uri, "output": result.output, "steps": result.trace()}

    async def _quota(self, controller: dict[str, Any], ctx: RunContext) -> None:
        """The vDAG's quota policy (controller.quotaPolicyRule), per session and per API
        key: Busy naming the key over its quota."""
        rule = quota_rule(controller)
        if rule is None:
            return
        keys = [f"session:{ctx.session}"] if ctx.session else []
        keys += [f"apikey:{ctx.api_key}"] if ctx.api_key else []
        cost = controller.get("quotaCost", 1)
        for key in keys or ["anonymous"]:
            try:
                answer = await self.policies.call(
                    rule, f"{ctx.vdag}/quota", {"key": key, "cost": cost}, {"vdag": ctx.vdag}
                )
            except Exception as exc:  # AttemptFailed: the quota policy itself failed
                raise errors.Unavailable(
                    f"the quota policy of vDAG {ctx.vdag} failed: {exc}", {"reason": "quota"}
                ) from None
            if not isinstance(answer, dict) or answer.get("allowed") is not True:
                retry = answer.get("retry_after_s") if isinstance(answer, dict) else None
                later = f"; retry after {retry:.3g} s" if isinstance(retry, (int, float)) else ""
                raise errors.Busy(
                    f"quota exceeded for {key} on vDAG {ctx.vdag}{later}",
                    {"reason": "quota", "key": key, "retry_after_s": retry},
                )


def quota_rule(controller: dict[str, Any]) -> PolicyRule | None:
    """controller.quotaPolicyRule ({policyRuleURI, policyRuleDigest?, parameters,
    settings}); without a URI the built-in token bucket, made with its settings."""
    raw = controller.get("quotaPolicyRule") if isinstance(controller, dict) else None
    if not isinstance(raw, dict) or not raw:
        return None
    uri = raw.get("policyRuleURI") or "builtin:token-bucket"
    settings, parameters = raw.get("settings") or {}, raw.get("parameters") or {}
    digest = raw.get("policyRuleDigest")
    if not (isinstance(uri, str) and isinstance(settings, dict) and isinstance(parameters, dict)):
        raise errors.FailedPrecondition("controller.quotaPolicyRule is malformed")
    return PolicyRule(uri, parameters, settings, digest if isinstance(digest, str) else None)
