"""Block shards inside the daemon: serve ranges of layers, announce them, generate through them.

torch is imported only when this node first loads a shard or generates (DESIGN.md: a daemon
that serves nothing stays small). Serving daemons announce each loaded range in the `blocks`
registry (model, layers, measured ms per layer), which is how clients find routes; peers may
ask a daemon to load a range over `/gridmesh/shard-control/1.0.0` when its config allows.
"""

from __future__ import annotations

import importlib
import logging
import os
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from daemon.shards import SHARD_PROTOCOL
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
from p2p import codec, localsock
from p2p.network import NetworkError, PeerState, Requests, Stream, Streams
from p2p.streams import stream_pair
from registry.blocks import announcement_key, announcements
from registry.replica import Rejected

if TYPE_CHECKING:
    from daemon.metrics import Metrics
    from daemon.shards.server import ShardServer
    from p2p.identity import NodeIdentity

log = logging.getLogger(__name__)

LOCAL_RETRY_S = 60.0  # after a failed local dial, use libp2p to that peer for this long
# the longest shard frame a stream takes before this node serves anything (headers only)
HEADER_FRAME_BYTES = 64 * 1024
LOAD_STEP = 0.1  # re-announce a block when this node's utilisation moved this much
MAX_QUEUE_LENGTH = 1 << 20


block_key = announcement_key  # where a server announces a range it serves


class ShardNetwork(Requests, Streams, Protocol):
    """What shards ask of the network: control requests, shard streams, peers' RTT."""

    @property
    def peers(self) -> Mapping[str, PeerState]: ...


class Entries(Protocol):
    """The registry replica as shards read it (announcements of blocks)."""

    @property
    def entries(self) -> Mapping[Any, Any]: ...


class Writer(Protocol):
    """The replicator as shards use it: announce and withdraw our own blocks."""

    def write(self, kind: str, key: str, value: dict[str, Any] | None) -> Awaitable[Any]: ...


class ShardService(JobTable):
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
        event loop would stall pings and streams until peers drop us."""
        if self._server is None:
            await trio.to_thread.run_sync(importlib.import_module, "daemon.shards.server")
            if self.torch_threads > 0:
                import torch

                torch.set_num_threads(self.torch_threads)

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

    def _register_stream_handler(self) -> None:
        """Register the libp2p shard handler, its frames bounded by what we serve at the
        moment each frame begins (`max_frame_bytes` is asked per frame): libp2p's framing
        refuses longer ones from their length prefix, also on streams opened before a load
        or an unload; the server checks each frame against its session anyway."""
        assert self._server is not None
        self.net.set_stream_handler(
            SHARD_PROTOCOL,
            self._server.handle_stream,
            max_frame_bytes=self.max_frame_bytes,
        )

    def max_frame_bytes(self) -> int:
        """The longest shard frame this node takes now (asked per frame, on libp2p streams
        and local sockets alike)."""
        if self._server is None:
            return HEADER_FRAME_BYTES
        return max(HEADER_FRAME_BYTES, self._server.max_frame_bytes)

    def start(self) -> None:
        self.net.set_request_handler(CONTROL_PROTOCOL, self._on_control, timeout_s=LOAD_TIMEOUT_S)

    async def serve_local(self) -> None:
        """Accept shard streams from daemons on this host over a Unix socket (see
        p2p.localsock); without one (not Linux, or the name taken) peers use libp2p."""
        if not self.local_sockets:
            return
        listener = localsock.Listener(
            self.ident,
            {SHARD_PROTOCOL: self._on_local_stream},
            on_reject=lambda reason: self.metrics.reject("localsock", reason),
            max_frame_bytes=self.max_frame_bytes,
            max_connections=self.max_local_connections,
        )
        try:
            await listener.serve()
        except OSError as exc:
            log.warning("no local shard socket (%s); same-host peers will use libp2p", exc)

    async def _on_local_stream(self, stream: Stream) -> None:
        await self.ensure_torch()
        await self.server.handle_stream(stream)

    async def reap_forever(self, interval_s: float = 10.0) -> None:
        """Free the caches of sessions abandoned without a close (their client vanished), and
        re-announce a block whose free cache moved by more than a tenth of the budget."""
        while True:
            await trio.sleep(interval_s)
            if self._server is not None:
                self._server.reap_idle()
                await self.refresh_announcements()

    async def refresh_announcements(self) -> None:
        """Re-announce the blocks whose free cache moved by more than a tenth of the budget
        since their last announcement."""
        assert self._server is not None
        self.measure_load()
        for block in list(self._server.blocks.values()):
            if self._server.blocks.get(block.model_id) is not block:
                continue  # undeployed while we announced another: no resurrection
            announced = self._announced_free.get(block.model_id)
            free = self._server.free_cache_tokens(block)
            budget = block.tokens_for(self._server.cache_budget_bytes or 0)
            queue, util = self._announced_load.get(block.model_id, (0, 0.0))
            load_moved = abs(self.utilisation - util) >= LOAD_STEP or (queue > 0) != (
                self.queue_length() > 0
            )
            if announced is None or abs(free - announced) > budget // 10 or load_moved:
                await self._announce(self.block_json(block))

    def queue_length(self) -> int:
        """Steps waiting for this node's compute now (pending in its batchers)."""
        return self._server.waiting_steps if self._server is not None else 0

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

    def measure_load(self) -> float:
        """The share of the time since the last measurement this node spent computing (what
        its blocks' steps took), announced as `utilisation` for the cluster coordinator's
        scaling (daemon.cluster.coordinator)."""
        busy = sum(b.compute_s for b in self._server.blocks.values()) if self._server else 0.0
        now = time.monotonic()
        if self._load_mark is not None and now > self._load_mark[0]:
            spent = max(0.0, busy - self._load_mark[1])
            self.utilisation = round(min(1.0, spent / (now - self._load_mark[0])), 3)
        self._load_mark = (now, busy)
        return self.utilisation

    def block_json(self, block: Any) -> dict[str, Any]:
        """A served block as the APIs and announcements show it, with its free cache."""
        assert self._server is not None
        return {**block.to_json(), "cache_tokens_free": self._server.free_cache_tokens(block)}

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
        await self._announce(self.block_json(block))
        return self.block_json(block)

    async def _announce(self, block: dict[str, Any]) -> None:
        peer_id = self.ident.peer_id
        key = block_key(block["model"], block["start"], block["end"], peer_id)
        value = {
            "blockId": key,
            "blockComponentURI": block["model"],
            "model": block["model"],
            "layers": [block["start"], block["end"]],
            "served_by": [peer_id],
            "parameters": {
                "ms_per_layer": block["ms_per_layer"],
                "dtype": block["dtype"],
                "parameters_bytes": block["parameters_bytes"],
                "cache_tokens_free": block["cache_tokens_free"],
                "host": localsock.HOST_ID,  # peers on this host dial our local socket
                "price_per_unit": self.price_per_unit,
                # load, for a cluster coordinator's scaling
                "queue_length": min(self.queue_length(), MAX_QUEUE_LENGTH),
                "utilisation": self.utilisation,
            },
        }
        try:
            await self.replicator.write("blocks", key, value)
            self._announced_free[block["model"]] = block["cache_tokens_free"]
            self._announced_load[block["model"]] = (
                value["parameters"]["queue_length"],
                self.utilisation,
            )
        except Rejected as exc:
            log.warning("could not announce %s: %s", key, exc)

    async def unload(self, model_id: str) -> bool:
        if self._server is None or model_id not in self._server.blocks:
            return False
        block = self._server.blocks[model_id]
        self._server.unload(model_id)
        self._announced_free.pop(model_id, None)
        self._announced_load.pop(model_id, None)
        key = block_key(model_id, block.start, block.end, self.ident.peer_id)
        try:
            await self.replicator.write("blocks", key, None)
        except Rejected as exc:
            log.warning("could not withdraw %s: %s", key, exc)
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

    # -- routing and generation ----------------------------------------------------------

    def announced(self, model_id: str) -> list[dict[str, Any]]:
        """Every announced server of a model, from this node's registry replica.

        Entries are read through their typed form (`registry.blocks`): only a server's own
        announcement counts, and an entry that cannot be read (stored by an older version,
        say) is skipped and counted (`registry`, `bad_entry`), never raised."""
        found = announcements(
            list(self.replica.entries.values()),
            model_id,
            on_bad=lambda reason: self.metrics.reject("registry", reason),
        )
        return [
            {
                "peer_id": item.peer_id,
                "start": item.start,
                "end": item.end,
                "ms_per_layer": item.ms_per_layer,
                "cache_tokens_free": item.cache_tokens_free,
                "price_per_unit": item.price_per_unit,
            }
            for item in found
        ]

    async def servers(self, model_id: str, need_tokens: int = 0) -> list[Any]:
        """Announced servers of a model, as routing sees them. Those that announced less
        free cache than `need_tokens` are left out (the announcement may be stale either
        way: a server that turns out full refuses the session and is routed around)."""
        from scheduler.routing import Server

        me = self.ident.peer_id
        out = []
        for item in self.announced(model_id):
            peer = item["peer_id"]
            free = item["cache_tokens_free"]
            if free is not None and free < need_tokens:
                continue
            state = self.net.peers.get(peer)
            rtt = 0.0 if peer == me else (state.rtt_ms if state and state.rtt_ms else 1.0)
            # every announced server counts as alive: opening its stream dials it if needed,
            # and one that fails is excluded by the client for the rest of the generation
            out.append(
                Server(
                    peer,
                    item["start"],
                    item["end"],
                    item["ms_per_layer"],
                    rtt,
                    price_per_unit=item["price_per_unit"],
                )
            )
        return out

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        """A stream to a shard server: in memory to ourselves, over the Unix socket to a
        daemon on this host, else over libp2p."""
        transports = self.metrics.shard_streams
        if peer_id == self.ident.peer_id:
            transports.labels("loopback").inc()
            return await self._loopback(protocol)
        failed_at = self._local_failed.get(peer_id, -LOCAL_RETRY_S)
        if self.same_host(peer_id) and time.monotonic() - failed_at >= LOCAL_RETRY_S:
            try:
                stream = await localsock.dial(self.ident, peer_id, protocol)
                transports.labels("local").inc()
                return stream
            except NetworkError as exc:
                log.info("local stream to %s failed (%s); using libp2p", peer_id[-12:], exc)
                self._local_failed[peer_id] = time.monotonic()
        transports.labels("libp2p").inc()
        return await self.net.open_stream(peer_id, protocol)

    def same_host(self, peer_id: str) -> bool:
        """Whether the peer announced a block from this host (same kernel boot id)."""
        if not self.local_sockets:
            return False
        # only the peer's own, readable announcements say where it runs (registry.blocks)
        return any(
            item.peer_id == peer_id and item.host == localsock.HOST_ID
            for item in announcements(self.replica.entries.values())
        )

    async def _loopback(self, protocol: str) -> Stream:
        """A stream to our own shard server, in memory (libp2p cannot dial itself)."""
        me = self.ident.peer_id
        client_end, server_end = stream_pair(me, me, capacity=4)

        async def serve() -> None:
            try:
                await self.server.handle_stream(server_end)
            except Exception:  # as the libp2p guard: count it, end the stream, keep the node
                log.exception("loopback shard stream failed")
                self.metrics.reject("shard", "handler_error")
            finally:
                await server_end.close()

        self.spawn(serve)
        return client_end

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
