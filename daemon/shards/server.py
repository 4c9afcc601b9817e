"""The shard server: holds loaded ranges of layers and runs sessions for remote clients.

One long-lived stream per (client, hop). On it the client opens sessions (each holds the KV
cache of this hop for one generation), sends forward steps, and closes them. Every frame is
checked before any compute: known session, contiguous positions, dtype and shape, length
limits. Errors answer `{"op": "error", "code", "message"}` and leave the stream usable;
sessions die with their stream, on `close`, or after `session_idle_s` without use.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import trio

from daemon.shards import wire
from daemon.shards.model import KVCache, LlamaConfig, LlamaShard, ModelError, load_shard
from p2p.network import NetworkError, Stream

log = logging.getLogger(__name__)

SHARD_PROTOCOL = "/gridmesh/shard/1.0.0"
MAX_SESSIONS = 64
SESSION_IDLE_S = 120.0
MAX_STEP_TOKENS = 4096


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


@dataclass
class Session:
    id: str
    block: ServedBlock
    cache: KVCache
    max_length: int
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)


class ShardServer:
    def __init__(
        self,
        *,
        max_sessions: int = MAX_SESSIONS,
        session_idle_s: float = SESSION_IDLE_S,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self.blocks: dict[str, ServedBlock] = {}
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
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
        return block

    def unload(self, model_id: str) -> bool:
        block = self.blocks.pop(model_id, None)
        for session_id in [s.id for s in self.sessions.values() if s.block is block]:
            del self.sessions[session_id]
        return block is not None

    # -- sessions ----------------------------------------------------------------------

    def open_session(self, header: dict[str, Any]) -> Session:
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
        session_id = secrets.token_hex(8)
        cache = block.shard.new_cache(batch=1, max_len=max_length)
        session = Session(session_id, block, cache, max_length)
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
        if not 0 < seq <= MAX_STEP_TOKENS:
            raise ShardError("bad_input", f"a step carries 1..{MAX_STEP_TOKENS} positions")
        if session.length + seq > session.max_length:
            raise ShardError(
                "too_long",
                f"{session.length + seq} positions exceed the session's {session.max_length}",
            )

    async def forward(
        self, session: Session, position: Any, x: torch.Tensor | None, last_only: bool
    ) -> torch.Tensor:
        self._check_input(session, position, x)
        assert x is not None
        block = session.block

        def run() -> torch.Tensor:
            started = time.perf_counter()
            with torch.inference_mode():
                positions = torch.arange(
                    session.length, session.length + x.shape[1], device=block.device
                )
                out = block.shard(x.to(block.device), session.cache, positions)
                if last_only:
                    out = out[:, -1:, :]
                out = out.cpu()
            block.compute_s += time.perf_counter() - started
            block.steps += 1
            return out

        async with self._compute:
            out = await trio.to_thread.run_sync(run)
        session.length += x.shape[1]
        session.last_used = time.monotonic()
        return out

    # -- protocol ----------------------------------------------------------------------

    async def handle_stream(self, stream: Stream) -> None:
        """Serve one client stream until it closes; its sessions end with it."""
        owned: set[str] = set()
        try:
            while True:
                try:
                    frame = await stream.receive()
                except NetworkError:
                    return
                reply, tensor = await self._handle_frame(frame, owned)
                await stream.send(wire.encode(reply, tensor))
        finally:
            for session_id in owned:
                self.sessions.pop(session_id, None)

    async def _handle_frame(
        self, frame: bytes, owned: set[str]
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        try:
            header, tensor = wire.decode(frame)
            op = header.get("op")
            if op == "open":
                session = self.open_session(header)
                owned.add(session.id)
                return {"op": "opened", "session": session.id}, None
            session = self.sessions.get(str(header.get("session")))
            if session is None or session.id not in owned:
                raise ShardError("unknown_session", "no such session on this stream (expired?)")
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
        except wire.WireError as exc:
            self._on_reject(exc.reason)
            return {"op": "error", "code": exc.reason, "message": str(exc)}, None
        except ShardError as exc:
            self._on_reject(exc.code)
            return {"op": "error", "code": exc.code, "message": str(exc)}, None
        except ModelError as exc:  # the model's own checks, e.g. a full KV cache
            self._on_reject("model")
            return {"op": "error", "code": "model", "message": str(exc)}, None
