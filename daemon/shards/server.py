"""The shard server: holds loaded ranges of layers and runs sessions for remote clients.

One long-lived stream per (client, hop). On it the client opens sessions (each holds the KV
cache of this hop for one generation), sends forward steps, and closes them. Every frame is
checked before any compute: known session, contiguous positions, dtype and shape, length
limits. Errors answer `{"op": "error", "code", "message"}` and leave the stream usable;
sessions die with their stream, on `close`, or after `session_idle_s` without use.

Two ways to run a step through a chain of servers:
- relayed: the client sends each hop its input and gets that hop's output back (`result`);
- chained: the client sends the first hop a `forward` with `chain`, the (peer, session) of
  every later hop. Each server computes, pushes its output straight to the next server
  (`pushed: true`, over one pooled stream per next peer), and sends the session's owner (the
  client) a copy as `partial`, which the client keeps to replay that span after a failure.
  The last server sends the `result` to its owner. A step's critical path thus crosses the
  network once per hop plus once back, instead of twice per hop (the copies travel beside
  it, so the bytes sent are the same as relayed). Errors go to the session's owner too, tagged
  with the step; a pushed frame for an unknown session is dropped (counted), never answered
  on the push stream, which nobody reads.
A session id is 128 random bits: knowing it is what lets a server push into it.

Every session's KV cache is preallocated, and all of them together stay within the cache
budget; `free_cache_tokens` is what servers announce, and a session that does not fit is
refused as `busy` (the client then routes around this server).
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import trio

from daemon.shards import SHARD_PROTOCOL, wire
from daemon.shards.model import KVCache, LlamaConfig, LlamaShard, ModelError, load_shard
from p2p.network import NetworkError, Stream

log = logging.getLogger(__name__)

MAX_SESSIONS = 64
SESSION_IDLE_S = 120.0
MAX_STEP_TOKENS = 4096
MAX_CHAIN = 64
MAX_PEERS = 64  # pooled push streams to next servers
# a push (dial included) must fail well within the client's step timeout (10 s), so that
# the client hears `forward_error` and relays, rather than blaming this server
PUSH_BUDGET_S = 3.0
PUSH_BYTES_PER_S = 20e6  # plus this much time per byte, for large prefill tensors
TELL_OWNER_TIMEOUT_S = 5.0


class StreamOpener(Protocol):
    async def open_stream(self, peer_id: str, protocol: str) -> Stream: ...


class ShardError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class ServedBlock:
    model_id: str
    model_dir: Path
    start: int
    end: int
    config: LlamaConfig
    shard: LlamaShard
    dtype: torch.dtype
    device: str
    loaded_at: float = field(default_factory=time.time)
    steps: int = 0
    compute_s: float = 0.0

    @property
    def cache_bytes_per_token(self) -> int:
        """Keys and values of one position in every layer of this range."""
        cfg = self.config
        per_layer = 2 * cfg.num_key_value_heads * cfg.head_dim
        element = torch.empty((), dtype=self.dtype).element_size()
        return per_layer * (self.end - self.start) * element

    @property
    def ms_per_layer(self) -> float:
        """Measured compute time per layer per step (a prior of 1 ms until measured)."""
        if not self.steps:
            return 1.0
        return 1000 * self.compute_s / self.steps / (self.end - self.start)

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model_id,
            "model_dir": str(self.model_dir),
            "start": self.start,
            "end": self.end,
            "dtype": wire.NAMES[self.dtype],
            "device": self.device,
            "parameters_bytes": sum(p.numel() * p.element_size() for p in self.shard.parameters()),
            "ms_per_layer": round(self.ms_per_layer, 3),
            "steps": self.steps,
        }


class Outbox:
    """A stream whose sends may come from several tasks (replies, and results of chained
    steps arriving on other streams): one frame at a time."""

    def __init__(self, stream: Stream) -> None:
        self.stream = stream
        self._lock = trio.Lock()

    async def send(self, header: dict[str, Any], tensor: torch.Tensor | None = None) -> None:
        await self.send_frame(wire.encode(header, tensor))

    async def send_frame(self, frame: bytes) -> None:
        async with self._lock:
            await self.stream.send(frame)


@dataclass
class Session:
    id: str
    block: ServedBlock
    cache: KVCache
    max_length: int
    owner: Outbox
    """The stream that opened the session: results and errors of chained steps go there."""
    stepping: bool = False  # a chained step of this session is in flight
    decoder: Any = None  # a StaticDecoder, made at the first one-token step if used
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class NextHop:
    peer: str
    session: str


def parse_chain(raw: Any) -> list[NextHop]:
    """The later hops of a chained step, checked (they come from the network)."""
    if not isinstance(raw, list) or len(raw) > MAX_CHAIN:
        raise ShardError("bad_input", f"chain must be a list of at most {MAX_CHAIN} hops")
    hops = []
    for item in raw:
        peer = item.get("peer") if isinstance(item, dict) else None
        session = item.get("session") if isinstance(item, dict) else None
        if not (isinstance(peer, str) and 0 < len(peer) <= 256):
            raise ShardError("bad_input", "each chain hop needs a peer id")
        if not (isinstance(session, str) and 0 < len(session) <= 64):
            raise ShardError("bad_input", "each chain hop needs a session id")
        hops.append(NextHop(peer, session))
    return hops


class ShardServer:
    def __init__(
        self,
        *,
        max_sessions: int = MAX_SESSIONS,
        session_idle_s: float = SESSION_IDLE_S,
        cache_budget_bytes: int | None = None,
        opener: StreamOpener | None = None,
        static_decode: bool | None = None,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        """`cache_budget_bytes`: KV cache all sessions may hold together (None: half of the
        memory available when the first range is loaded). `opener`: how to reach the next
        server of a chained step (None: chained steps that need a push are refused).
        `static_decode`: one-token steps as fixed-shape steps, CUDA graphs on a GPU
        (`daemon.shards.decode`); None: on CUDA devices only."""
        self.blocks: dict[str, ServedBlock] = {}
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.cache_budget_bytes = cache_budget_bytes
        self._opener = opener
        self.static_decode = static_decode
        self._peers: dict[str, Outbox] = {}
        self._dialing: dict[str, trio.Lock] = {}
        self._on_reject = on_reject or (lambda reason: None)
        # one step at a time per process: torch already uses every core for one
        self._compute = trio.CapacityLimiter(1)

    # -- blocks ------------------------------------------------------------------------

    async def load(
        self,
        model_id: str,
        model_dir: Path,
        start: int,
        end: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: str = "cpu",
    ) -> ServedBlock:
        if model_id in self.blocks:
            raise ShardError("already_loaded", f"{model_id} is already served here; undeploy first")
        try:
            config = LlamaConfig.from_dir(model_dir)
        except (ModelError, OSError) as exc:
            raise ShardError("bad_model", f"cannot load {model_dir}: {exc}") from None
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ShardError(
                "bad_range", f"layers [{start}, {end}) outside 0..{config.num_hidden_layers}"
            )
        try:
            shard = await trio.to_thread.run_sync(
                lambda: load_shard(model_dir, start, end, dtype=dtype, device=device)
            )
        except (ModelError, OSError) as exc:
            raise ShardError("bad_model", f"cannot load {model_dir}: {exc}") from None
        block = ServedBlock(model_id, model_dir, start, end, config, shard, dtype, device)
        self.blocks[model_id] = block
        if self.cache_budget_bytes is None:
            self.cache_budget_bytes = available_memory(device) // 2
        return block

    def unload(self, model_id: str) -> bool:
        block = self.blocks.pop(model_id, None)
        for session_id in [s.id for s in self.sessions.values() if s.block is block]:
            del self.sessions[session_id]
        return block is not None

    # -- sessions ----------------------------------------------------------------------

    @property
    def cache_used_bytes(self) -> int:
        return sum(session.cache.nbytes for session in self.sessions.values())

    def free_cache_tokens(self, block: ServedBlock) -> int:
        """Positions of `block` that one more session could still hold in its KV cache."""
        free = (self.cache_budget_bytes or 0) - self.cache_used_bytes
        return max(0, free // block.cache_bytes_per_token)

    def open_session(self, header: dict[str, Any], owner: Outbox) -> Session:
        block = self.blocks.get(str(header.get("model")))
        if block is None:
            raise ShardError("unknown_model", f"model {str(header.get('model'))[:80]!r} not served")
        if header.get("start") != block.start or header.get("end") != block.end:
            raise ShardError("bad_range", f"this server holds layers [{block.start}, {block.end})")
        max_length = header.get("max_length")
        limit = block.config.max_position_embeddings
        if not isinstance(max_length, int) or not 0 < max_length <= limit:
            raise ShardError("bad_length", f"max_length must be 1..{limit}")
        if len(self.sessions) >= self.max_sessions:
            self.reap_idle()
            if len(self.sessions) >= self.max_sessions:
                raise ShardError("busy", f"{self.max_sessions} sessions already open")
        peer = owner.stream.peer_id
        if sum(s.owner.stream.peer_id == peer for s in self.sessions.values()) >= (
            self.max_sessions // 2
        ):  # one peer cannot take every session (one with many peer ids still can)
            raise ShardError("busy", f"{self.max_sessions // 2} sessions of this peer are open")
        free = self.free_cache_tokens(block)
        if max_length > free:
            self.reap_idle()
            free = self.free_cache_tokens(block)
            if max_length > free:
                raise ShardError(
                    "busy", f"KV cache full: {free} positions free, {max_length} asked"
                )
        session_id = secrets.token_hex(16)
        try:
            cache = block.shard.new_cache(batch=1, max_len=max_length)
        except torch.OutOfMemoryError:
            raise ShardError("busy", "out of memory for the session's KV cache") from None
        session = Session(session_id, block, cache, max_length, owner)
        self.sessions[session_id] = session
        return session

    def reap_idle(self) -> int:
        cutoff = time.monotonic() - self.session_idle_s
        idle = [s.id for s in self.sessions.values() if s.last_used < cutoff]
        for session_id in idle:
            del self.sessions[session_id]
        return len(idle)

    def _check_input(self, session: Session, position: Any, x: torch.Tensor | None) -> None:
        block = session.block
        if x is None:
            raise ShardError("bad_input", "forward needs a tensor")
        if position != session.length:
            raise ShardError(
                "bad_position", f"expected position {session.length}, got {str(position)[:20]}"
            )
        if x.dim() < 2 or not 0 < x.shape[1] <= MAX_STEP_TOKENS:
            raise ShardError("bad_input", f"a step carries 1..{MAX_STEP_TOKENS} positions")
        if block.start == 0:
            if x.dtype != torch.int64 or x.dim() != 2 or x.shape[0] != 1:
                raise ShardError("bad_input", "the first shard takes int64 token ids [1, seq]")
            if int(x.min()) < 0 or int(x.max()) >= block.config.vocab_size:
                raise ShardError("bad_input", "token id out of the vocabulary")
        else:
            hidden = block.config.hidden_size
            if x.dtype != block.dtype or x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != hidden:
                raise ShardError(
                    "bad_input",
                    f"expected {wire.NAMES[block.dtype]} hidden states [1, seq, {hidden}]",
                )
        seq = x.shape[1]
        if session.length + seq > session.max_length:
            raise ShardError(
                "too_long",
                f"{session.length + seq} positions exceed the session's {session.max_length}",
            )

    async def forward(
        self, session: Session, position: Any, x: torch.Tensor | None, last_only: bool
    ) -> torch.Tensor:
        async with self._compute:  # the check too: two steps at one position must not race
            self._check_input(session, position, x)
            assert x is not None
            out = await trio.to_thread.run_sync(self._run, session, x, last_only)
        session.length += x.shape[1]
        session.last_used = time.monotonic()
        return out

    def _run(self, session: Session, x: torch.Tensor, last_only: bool) -> torch.Tensor:
        block = session.block

        started = time.perf_counter()
        static = self.static_decode
        if static is None:
            static = block.device.startswith("cuda")
        if static and x.shape[1] == 1:
            if session.decoder is None:
                from daemon.shards.decode import StaticDecoder

                session.decoder = StaticDecoder(block.shard, session.cache)
            out = session.decoder.step(x).cpu()
            block.compute_s += time.perf_counter() - started
            block.steps += 1
            return out
        with torch.inference_mode():
            first = session.length
            positions = torch.arange(first, first + x.shape[1], device=block.device)
            out = block.shard(x.to(block.device), session.cache, positions)
            if last_only:
                out = out[:, -1:, :]
            out = out.cpu()
        block.compute_s += time.perf_counter() - started
        block.steps += 1
        return out

    # -- protocol ----------------------------------------------------------------------

    async def handle_stream(self, stream: Stream) -> None:
        """Serve one stream (a client's, or a previous server's pushes) until it closes;
        the sessions opened on it end with it.

        Chained steps run beside the reader, so pushes between servers of crossing routes
        (A->B, B->C, C->A) cannot all wait on each other. At most one step per session is in
        flight, so a stream holds at most `max_sessions` of them.
        """
        outbox = Outbox(stream)
        owned: set[str] = set()

        async def run_step(session: Session, header: dict[str, Any], x: Any) -> None:
            try:
                await self._chained_step(session, header, x)
            finally:
                session.stepping = False

        try:
            async with trio.open_nursery() as steps:

                def spawn(session: Session, header: dict[str, Any], x: Any) -> None:
                    if session.stepping:  # a client waits for each step before the next
                        raise ShardError("bad_position", "a step of this session is running")
                    self._check_input(session, header.get("position"), x)  # before parking x
                    session.stepping = True
                    steps.start_soon(run_step, session, header, x)

                while True:
                    try:
                        frame = await stream.receive()
                    except NetworkError:
                        return
                    reply = await self._handle_frame(frame, outbox, owned, spawn)
                    if reply is not None:
                        try:
                            await outbox.send(*reply)
                        except NetworkError:
                            return
        finally:
            for session_id in owned:
                self.sessions.pop(session_id, None)

    async def _handle_frame(
        self,
        frame: bytes,
        outbox: Outbox,
        owned: set[str],
        spawn: Callable[[Session, dict[str, Any], Any], None],
    ) -> tuple[dict[str, Any], torch.Tensor | None] | None:
        """The reply to send back on this stream, or None: chained steps run beside the
        stream's reader (`spawn`) and answer the session's owner."""
        step: Any = None
        try:
            header, tensor = wire.decode(frame)
            op, step = header.get("op"), header.get("step")
            if op == "open":
                session = self.open_session(header, outbox)
                owned.add(session.id)
                return {"op": "opened", "session": session.id}, None
            session = self.sessions.get(str(header.get("session")))
            if header.get("pushed") is True:  # from the previous server of a chained step
                if session is None or op != "forward" or "chain" not in header:
                    self._on_reject("unknown_session")
                    return None
                try:
                    spawn(session, header, tensor)
                except ShardError as exc:
                    await self._tell_owner(session, self._error(exc, step))
                return None
            if session is None or session.id not in owned:
                raise ShardError("unknown_session", "no such session on this stream (expired?)")
            if op == "forward" and "chain" in header:
                spawn(session, header, tensor)
                return None
            if op == "forward":
                out = await self.forward(
                    session, header.get("position"), tensor, bool(header.get("last_only"))
                )
                return {"op": "result", "length": session.length}, out
            if op == "close":
                self.sessions.pop(session.id, None)
                owned.discard(session.id)
                return {"op": "closed"}, None
            raise ShardError("bad_op", f"unknown op {str(op)[:20]!r}")
        except (wire.WireError, ShardError, ModelError, RuntimeError) as exc:
            return self._error(exc, step), None

    def _error(self, exc: Exception, step: Any) -> dict[str, Any]:
        if isinstance(exc, wire.WireError):
            code = exc.reason
        elif isinstance(exc, ShardError):
            code = exc.code
        elif isinstance(exc, ModelError):  # the model's own checks, e.g. a full KV cache
            code = "model"
        else:  # torch refused (out of memory, a kernel error): this server's problem
            log.warning("shard compute failed: %r", exc)
            code = "compute"
        self._on_reject(code)
        error = {"op": "error", "code": code, "message": str(exc)}
        if isinstance(step, int) and not isinstance(step, bool):
            error["step"] = step
        return error

    async def _chained_step(
        self, session: Session, header: dict[str, Any], x: torch.Tensor | None
    ) -> None:
        """Compute this hop of a chained step, push the output on, and tell the owner."""
        step, position = header.get("step"), header.get("position")
        try:
            if not isinstance(step, int) or isinstance(step, bool):
                raise ShardError("bad_input", "a chained step needs an integer step number")
            chain = parse_chain(header.get("chain"))
            last_only = not chain and bool(header.get("last_only"))
            out = await self.forward(session, position, x, last_only)
        except (ShardError, ModelError, RuntimeError) as exc:
            await self._tell_owner(session, self._error(exc, step))
            return
        if not chain:
            await self._tell_owner(session, {"op": "result", "step": step}, out)
            return
        nxt = chain[0]
        push = {
            "op": "forward",
            "pushed": True,
            "session": nxt.session,
            "position": position,
            "step": step,
            "chain": [{"peer": h.peer, "session": h.session} for h in chain[1:]],
            "last_only": bool(header.get("last_only")),
        }
        partial: dict[str, Any] = {"op": "partial", "step": step, "position": position}
        try:
            await self._push(nxt.peer, wire.encode(push, out))
        except NetworkError as exc:
            # the owner decides: relay this step itself, or route around the next server
            partial.update(forward_error=str(exc)[:300], failed_peer=nxt.peer)
        await self._tell_owner(session, partial, out)

    async def _tell_owner(
        self, session: Session, header: dict[str, Any], tensor: torch.Tensor | None = None
    ) -> None:
        try:
            with trio.fail_after(TELL_OWNER_TIMEOUT_S):
                await session.owner.send(header, tensor)
        except NetworkError:  # the client is gone: its sessions end with its stream
            self.sessions.pop(session.id, None)
        except trio.TooSlowError:  # the client stopped reading: end its session, free its cache
            self._on_reject("owner_stalled")
            self.sessions.pop(session.id, None)

    async def _push(self, peer_id: str, frame: bytes) -> None:
        """Send a frame to the next server over a pooled stream (one fresh retry), within
        PUSH_BUDGET_S (plus time for the bytes)."""
        if self._opener is None:
            raise NetworkError("this server does not push to other servers")
        try:
            with trio.fail_after(PUSH_BUDGET_S + len(frame) / PUSH_BYTES_PER_S):
                for attempt in (1, 2):
                    outbox = await self._pooled(peer_id)
                    try:
                        await outbox.send_frame(frame)
                        return
                    except NetworkError:
                        await self._drop_peer(peer_id, outbox)
                        if attempt == 2:
                            raise
                    except BaseException:  # cancelled mid-frame: the stream is unusable
                        await self._drop_peer(peer_id, outbox)
                        raise
        except trio.TooSlowError:
            raise NetworkError(f"cannot push to {peer_id} in time") from None

    async def _pooled(self, peer_id: str) -> Outbox:
        """The pooled stream to a next server, opened once even when steps race for it."""
        if len(self._dialing) > 4 * MAX_PEERS:  # forget the locks of idle peers
            self._dialing = {p: lk for p, lk in self._dialing.items() if lk.locked()}
        lock = self._dialing.setdefault(peer_id, trio.Lock())
        async with lock:
            outbox = self._peers.get(peer_id)
            if outbox is None:
                assert self._opener is not None
                outbox = Outbox(await self._opener.open_stream(peer_id, SHARD_PROTOCOL))
                while len(self._peers) >= MAX_PEERS:
                    oldest = next(iter(self._peers))
                    await self._drop_peer(oldest, self._peers[oldest])
                self._peers[peer_id] = outbox
        return outbox

    async def _drop_peer(self, peer_id: str, outbox: Outbox) -> None:
        """Forget a pooled stream (only that one: a fresh one may have replaced it)."""
        if self._peers.get(peer_id) is outbox:
            del self._peers[peer_id]
        with trio.move_on_after(1) as scope:
            scope.shield = True
            await outbox.stream.close()


def available_memory(device: str) -> int:
    """Bytes free on `device` now: CUDA's free memory, or the host's MemAvailable."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30  # no /proc (macOS): assume 4 GiB
