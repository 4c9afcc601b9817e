"""Block shards inside the daemon: serve ranges of layers, announce them, generate through them.

torch is imported only when this node first loads a shard or generates (DESIGN.md: a daemon
that serves nothing stays small). Serving daemons announce each loaded range in the `blocks`
registry (model, layers, measured ms per layer), which is how clients find routes; peers may
ask a daemon to load a range over `/gridmesh/shard-control/1.0.0` when its config allows.

ShardService is made of parts, each in its own module: the announcements of its blocks and
the reading of others' (daemon.shards.announce), the shard streams it accepts and opens
(daemon.shards.streams) and the generations the local APIs poll (daemon.shards.jobs); the
network and registry it is given are described in daemon.shards.ports.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from daemon.shards.announce import (  # noqa: F401 - block_key: re-exported
    Announcements,
    block_key,
)
from daemon.shards.control import (  # noqa: F401 - re-exported for the API modules
    CONTROL_PROTOCOL,
    LOAD_TIMEOUT_S,
    MAX_CONTROL_BYTES,
    LoadRequest,
    UnloadRequest,
    decode_control,
)
from daemon.shards.jobs import (  # noqa: F401 - MAX_*, JOB_TTL_S: re-exported
    JOB_TTL_S,
    MAX_FINISHED_JOBS,
    MAX_JOBS,
    MAX_JOBS_PER_REQUESTER,
    Job,
    JobTable,
    ShardServiceError,
)
from daemon.shards.ports import Entries, ShardNetwork, Writer
from daemon.shards.streams import ShardStreams
from p2p import codec, localsock
from p2p.network import NetworkError

if TYPE_CHECKING:
    from daemon.metrics import Metrics
    from daemon.shards.recent import RecentGenerations
    from daemon.shards.server import ShardServer
    from p2p.identity import NodeIdentity

log = logging.getLogger(__name__)


class ShardService(Announcements, ShardStreams, JobTable):
    """Serve shards, announce them, and generate through the network's shards.

    It gets only what it uses: this node's identity, the network, the registry replica (to
    read announcements) and the replicator (to write ours), and metrics. Loopback streams
    and background generations run in `nursery` (given, or the one `run` opens).
    """

    def __init__(
        self,
        *,
        ident: NodeIdentity,
        net: ShardNetwork,
        replica: Entries,
        replicator: Writer,
        metrics: Metrics,
        allow_remote_deploy: bool,
        torch_threads: int = 0,
        cache_gib: float = 0.0,
        device: str = "auto",
        local_sockets: bool = True,
        stream_idle_s: float = 30.0,
        max_streams_per_peer: int = 40,
        max_local_connections: int = 256,
        max_batch: int = 32,
        batch_window_s: float = 0.005,
        pipeline: bool = True,
        batched_layout: bool = False,
        price_per_unit: int = 0,
        max_price_per_unit: int | None = None,
        nursery: trio.Nursery | None = None,
        verifier: Any = None,
    ) -> None:
        """`price_per_unit`: this node's price as a provider, announced with every block;
        `max_price_per_unit`: the most it pays as a requester when a generation names no
        maximum (None: no maximum), whichever API asks (JSON-RPC, gRPC); `verifier`: the
        spot checks of its generations (daemon.verify.Verifier; None: none)."""
        super().__init__()
        self.verifier = verifier
        self.ident = ident
        self.net = net
        self.replica = replica
        self.replicator = replicator
        self.metrics = metrics
        self._nursery = nursery
        self.allow_remote_deploy = allow_remote_deploy
        self.torch_threads = torch_threads
        self.device = device
        self.local_sockets = local_sockets and localsock.HOST_ID is not None
        self.cache_budget_bytes = int(cache_gib * (1 << 30)) or None  # None: decided at load
        self._server: ShardServer | None = None
        self._announced_free: dict[str, int] = {}  # model -> free cache positions announced
        self._announced_load: dict[str, tuple[int, float]] = {}  # model -> load announced
        self._load_mark: tuple[float, float] | None = None  # (monotonic, compute seconds)
        self.utilisation = 0.0  # share of the last interval this node spent computing
        self._local_failed: dict[str, float] = {}  # peer -> when a local dial last failed
        self.stream_idle_s = stream_idle_s
        self.max_streams_per_peer = max_streams_per_peer
        self.max_local_connections = max_local_connections
        self.max_batch = max_batch
        self.batched_layout = batched_layout
        self.batch_window_s = batch_window_s
        self.pipeline = pipeline
        self.price_per_unit = price_per_unit
        self.default_max_price = max_price_per_unit
        self._tokenizers: dict[Path, Any] = {}
        # paid work (daemon.payments), given by the daemon when it has an Escrow
        self.provider: Any = None  # payments.provider.Provider: paid sessions served here
        self.requester: Any = None  # payments.requester.Requester: paid generations
        # the last generations' routes and failovers (generation_list, the dashboard)
        self.generations: RecentGenerations | None = None
        # after torch's first import and after each model load (the daemon's: it freezes what
        # they made, which every full garbage collection would otherwise walk: daemon.gcpauses)
        self.on_loaded: Callable[[], None] | None = None
        self._torch_imported = False

    # -- running ---------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Answer the control protocol, reap idle sessions, serve the local socket; runs
        loopback streams and background generations until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.start()
            nursery.start_soon(self.reap_forever)
            nursery.start_soon(self.serve_local)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    @property
    def nursery(self) -> trio.Nursery:
        """Where loopback streams and background generations run."""
        if self._nursery is None:
            raise RuntimeError("the shard service is not running")
        return self._nursery

    def spawn(self, fn: Callable[[], Awaitable[Any]]) -> None:
        """Run `fn()` in the background, for work that outlives one API call."""
        self.nursery.start_soon(fn)

    # -- serving -----------------------------------------------------------------------

    async def ensure_torch(self) -> None:
        """Import torch and the model code in a worker thread: a multi-second import on the
        event loop would stall pings and streams until peers drop us. The first import then
        calls `on_loaded`: it makes some 200,000 objects (torch, transformers), and a node
        that only requests generations loads no model, so nothing else would freeze them;
        each full garbage collection walked them, ~90 ms a pause (session 15's abuse bench,
        the untargeted node)."""
        if self._server is None and not self._torch_imported:
            await trio.to_thread.run_sync(importlib.import_module, "daemon.shards.server")
            if self.torch_threads > 0:
                import torch

                torch.set_num_threads(self.torch_threads)
            self._torch_imported = True
            if self.on_loaded is not None:
                self.on_loaded()

    def torch_device(self) -> str:
        """The configured device, with `auto` resolved: the first GPU torch sees, else CPU."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"

    @property
    def server(self) -> ShardServer:
        if self._server is None:
            from daemon.shards.server import ShardServer

            self._server = ShardServer(
                cache_budget_bytes=self.cache_budget_bytes,
                opener=self,  # chained steps push to the next server over our streams
                on_reject=lambda reason: self.metrics.reject("shard", reason),
                stream_idle_s=self.stream_idle_s,
                max_streams_per_peer=self.max_streams_per_peer,
                payments=self.provider,
                max_batch=self.max_batch,
                batch_window_s=self.batch_window_s,
                pipeline=self.pipeline,
                batched_layout=self.batched_layout,
            )
            self._register_stream_handler()
        return self._server

    def start(self) -> None:
        self.net.set_request_handler(CONTROL_PROTOCOL, self._on_control, timeout_s=LOAD_TIMEOUT_S)

    async def reap_forever(self, interval_s: float = 10.0) -> None:
        """Free the caches of sessions abandoned without a close (their client vanished), and
        re-announce a block whose free cache moved by more than a tenth of the budget."""
        while True:
            await trio.sleep(interval_s)
            if self._server is not None:
                self._server.reap_idle()
                await self.refresh_announcements()

    def snapshot(self) -> dict[str, Any]:
        """What /metrics shows of the shard server, per model: its sessions and their KV
        cache bytes, forward passes by batch size, steps batched and steps waiting."""
        server = self._server
        if server is None:
            return {"cache_budget_bytes": 0, "models": {}}
        models: dict[str, dict[str, Any]] = {}

        def of(model: str) -> dict[str, Any]:
            empty = {"sessions": 0, "cache_used_bytes": 0, "batch_sizes": {}, "batched_steps": 0}
            return models.setdefault(model, {**empty, "waiting_steps": 0})

        for session in list(server.sessions.values()):
            row = of(session.block.model_id)
            row["sessions"] += 1
            row["cache_used_bytes"] += session.cache.nbytes
        for model, batcher in server.batching.by_model().items():
            row = of(model)
            row["batch_sizes"] = dict(batcher.batch_sizes)
            row["batched_steps"] = batcher.batched_steps
            row["waiting_steps"] = batcher.pending
        return {"cache_budget_bytes": server.cache_budget_bytes or 0, "models": models}

    def summary(self) -> list[dict[str, Any]]:
        """What this node serves, for its DHT resource record: ranges, speed, load."""
        if self._server is None:
            return []
        sessions = len(self._server.sessions)
        return [
            {
                "model": block.model_id,
                "start": block.start,
                "end": block.end,
                "ms_per_layer": round(block.ms_per_layer, 3),
                "sessions": sessions,
                "max_sessions": self._server.max_sessions,
                "cache_tokens_free": self._server.free_cache_tokens(block),
            }
            for block in self._server.blocks.values()
        ]

    async def load(
        self, model_id: str, model_dir: str, start: int, end: int, dtype: str = "float32"
    ) -> dict[str, Any]:
        path = Path(os.path.expanduser(model_dir))  # noqa: ASYNC240 - no I/O, string only
        await self.ensure_torch()  # before the imports below: they import torch
        from daemon.shards.model import ModelError, to_dtype
        from daemon.shards.server import ShardError

        existing = self.local_block(model_id)
        if existing is not None and (existing.start, existing.end) == (start, end):
            await self._announce(self.block_json(existing))  # idempotent: a retried deploy
            return self.block_json(existing)
        try:
            block = await self.server.load(
                model_id, path, start, end, dtype=to_dtype(dtype), device=self.torch_device()
            )
        except (ShardError, ModelError) as exc:
            raise ShardServiceError(getattr(exc, "code", "bad_model"), str(exc)) from None
        if self.on_loaded is not None:
            self.on_loaded()
        await self._announce(self.block_json(block))
        return self.block_json(block)

    async def unload(self, model_id: str) -> bool:
        if self._server is None or model_id not in self._server.blocks:
            return False
        block = self._server.blocks[model_id]
        self._server.unload(model_id)
        await self._withdraw(model_id, block)
        return True

    def local_block(self, model_id: str) -> Any:
        """The ServedBlock of a model served here, or None."""
        return self._server.blocks.get(model_id) if self._server is not None else None

    def local_blocks(self) -> list[dict[str, Any]]:
        if self._server is None:
            return []
        return [self.block_json(block) for block in self._server.blocks.values()]

    # -- remote control ------------------------------------------------------------------

    async def _on_control(self, sender: str, payload: bytes) -> bytes:
        """A peer's load or unload request, validated into `LoadRequest`/`UnloadRequest`
        (bounded fields, a known op) before anything else."""
        try:
            msg = decode_control(payload)
            if not self.allow_remote_deploy:
                raise ShardServiceError(
                    "forbidden",
                    "this node does not accept deploys from peers (shards.allow_remote_deploy)",
                )
            if isinstance(msg, LoadRequest):
                if msg.start >= msg.end:
                    raise ShardServiceError("bad_request", "start must be below end")
                block = await self.load(msg.model, msg.model_dir, msg.start, msg.end, msg.dtype)
                return codec.encode({"ok": True, "block": block})
            return codec.encode({"ok": await self.unload(msg.model)})
        except ShardServiceError as exc:
            self.metrics.reject("shard_control", exc.code)
            return codec.encode({"ok": False, "code": exc.code, "error": str(exc)})

    async def load_on(self, peer_id: str, request: dict[str, Any]) -> dict[str, Any]:
        if peer_id == self.ident.peer_id:
            return await self.load(
                request["model"],
                request["model_dir"],
                request["start"],
                request["end"],
                request.get("dtype", "float32"),
            )
        message = codec.encode({"op": "load", **request})
        for attempt in (1, 2):  # one retry: a busy peer may have dropped the stream
            try:
                raw = await self.net.request(
                    peer_id, CONTROL_PROTOCOL, message, timeout_s=LOAD_TIMEOUT_S
                )
                break
            except NetworkError as exc:
                if attempt == 2:
                    raise ShardServiceError("unreachable", f"{peer_id}: {exc}") from None
                log.warning("asking %s to load failed (%s); retrying once", peer_id, exc)
        reply = codec.decode(raw)
        if not isinstance(reply, dict) or not reply.get("ok"):
            error = reply.get("error") if isinstance(reply, dict) else "malformed reply"
            raise ShardServiceError("remote_refused", f"{peer_id}: {error}")
        return reply["block"]

    # -- generation ------------------------------------------------------------------------

    async def generate(
        self,
        job: Job,
        model_id: str,
        prompt_ids: list[int],
        max_new_tokens: int,
        *,
        temperature: float,
        seed: int | None,
        relay: bool = False,
        max_price_per_unit: int | None = None,
        job_id: bytes | None = None,
    ) -> Job:
        """Run `job`'s generation through the network's shard servers (daemon.shards.
        generation); `job_id`: as that paid job (daemon.payments.requester)."""
        from daemon.shards.generation import run_generation

        options = {"temperature": temperature, "seed": seed, "relay": relay}
        return await run_generation(
            self,
            job,
            model_id,
            prompt_ids,
            max_new_tokens,
            **options,
            max_price_per_unit=max_price_per_unit,
            job_id=job_id,
        )

    async def tokenizer(self, model_id: str) -> Any:
        """The tokenizer of a model served here (read once per checkpoint), or None."""
        local = self.local_block(model_id)
        if local is None:
            return None
        if local.model_dir not in self._tokenizers:
            from daemon.shards.model import ModelError, load_tokenizer

            try:
                loaded = await trio.to_thread.run_sync(load_tokenizer, local.model_dir)
            except ModelError as exc:
                raise ShardServiceError("tokenizer_error", f"cannot tokenize: {exc}") from None
            self._tokenizers[local.model_dir] = loaded
        return self._tokenizers[local.model_dir]

    async def encode_prompt(self, model_id: str, prompt: str) -> list[int]:
        """Token ids of a prompt, with the tokenizer of a local shard of the model."""
        tokenizer = await self.tokenizer(model_id)
        if tokenizer is None:
            raise ShardServiceError(
                "no_tokenizer",
                "this node holds no shard of the model and so no tokenizer: pass token_ids, "
                "or call a serving node",
            )
        ids = tokenizer.encode(prompt)
        if not ids:
            raise ShardServiceError("empty_prompt", "the prompt is empty")
        return list(ids)
