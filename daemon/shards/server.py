"""The shard server: holds loaded ranges of layers and runs sessions for remote clients.

One long-lived stream per (client, hop). On it the client opens sessions (each holds the KV
cache of this hop for one generation), sends forward steps, and closes them. Every frame is
checked before any compute: known session, contiguous positions, dtype and shape, length
limits. Errors answer `{"op": "error", "code", "message"}` and leave the stream usable;
sessions die with their stream, on `close`, or after `session_idle_s` without use.

Two ways to run a step through a chain of servers:
- relayed: the client sends each hop its input and gets that hop's output back (`result`);
- chained: the client sends the first hop a `forward` with a `step` number. Each server
  computes, pushes its output straight to its session's next hop (`pushed: true`, over one
  pooled stream per next peer), and sends the session's owner (the client) a copy as
  `partial`, which the client keeps to replay that span after a failure. The last server
  sends the `result` to its owner. A step's critical path thus crosses the network once per
  hop plus once back, instead of twice per hop (the copies travel beside it, so the bytes
  sent are the same as relayed). Errors go to the session's owner too, tagged with the step.

A session belongs to the peer that opened it (the authenticated identity of its stream:
libp2p's, or the local socket's mutual hello) and is used only on that stream. Its opener
alone says where its output goes (`next`: a server, that server's session and the link token
it gave the opener) and who may push into it (`prev`: one peer id); a push must also show
the session's link token, which this server gives only to the opener. A push from anyone
else, or naming an unknown session, is dropped and counted, never answered: knowing a
session id lets nobody read from it, push into it or redirect it.

Streams are bounded: a frame by what the sessions of this server can take (its header, plus
a step of `MAX_STEP_TOKENS` positions of the widest input; then by the named session's
remaining positions), a stream without a live session by `stream_idle_s` without a frame, and
a peer by `max_streams_per_peer` streams at once.

Every session's KV cache is preallocated, and all of them together stay within the cache
budget; `free_cache_tokens` is what servers announce, and a session that does not fit is
refused as `busy` (the client then routes around this server).

A session opened with a job id is paid work (daemon.payments.provider): admitted only for a
live, funded job; each of its steps answers with this node's signed receipt of the step.

Compute: one forward pass at a time per process (torch already uses every core for one).
The steps of the sessions of one loaded range that are ready together run as one forward
pass (`daemon.shards.batching`): decode steps, prefills and replays alike, each session with
its own KV cache and positions, and each gets its own output back (its receipt, push and
reply as alone). Sessions of chains of D hops (their opener says D) run as about D
micro-batches out of phase, so that every hop of their chains computes at once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import trio

from daemon.shards import wire
from daemon.shards.batching import (
    BATCH_WINDOW_S,
    MAX_BATCH,
    Batcher,
    Batchers,
    StepDropped,
    run_steps,
)
from daemon.shards.blocks import ServedBlock, available_memory
from daemon.shards.model import LlamaConfig, LlamaShard, ModelError, load_shard
from daemon.shards.model.linear import pack_linears
from daemon.shards.push import Outbox, PushPool
from daemon.shards.session import (
    MAX_STEP_TOKENS,
    Session,
    ShardError,
    check_step,
    input_bytes_per_position,
)
from p2p.network import NetworkError, Stream, StreamOpener

log = logging.getLogger(__name__)

MAX_SESSIONS = 64
SESSION_IDLE_S = 120.0
STREAM_IDLE_S = 30.0  # a stream without a live session and without a frame is closed
MAX_STREAMS_PER_PEER = MAX_SESSIONS // 2 + 8  # a session each, plus pushes and spares
TELL_OWNER_TIMEOUT_S = 5.0
# wire errors of a frame that does not decode at all (not one a session refuses)
GARBAGE = frozenset({"malformed", "bad_header", "bad_shape", "bad_dtype"})


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
        stream_idle_s: float = STREAM_IDLE_S,
        max_streams_per_peer: int = MAX_STREAMS_PER_PEER,
        payments: Any = None,
        max_batch: int = MAX_BATCH,
        batch_window_s: float = BATCH_WINDOW_S,
        pipeline: bool = True,
        batched_layout: bool = False,
    ) -> None:
        """`cache_budget_bytes`: KV cache all sessions may hold together (None: half of the
        memory available when the first range is loaded). `opener`: how to reach the next
        server of a chained step (None: chained steps that need a push are refused).
        `static_decode`: one-token steps as fixed-shape steps, CUDA graphs on a GPU
        (`daemon.shards.model.decode`); None: on CUDA devices only. `stream_idle_s`: how long a
        stream holding no live session may send nothing before it is closed;
        `max_streams_per_peer`: streams one peer may hold open at once. `payments`: the
        provider's side of paid work (`daemon.payments.provider.Provider`; None: sessions
        opened for a job are refused). `max_batch`: most steps in one forward pass (1: no
        batching); `batch_window_s`: how long a batch may wait for sessions due back
        (`daemon.shards.batching`); `pipeline`: the steps of sessions of chains of several
        hops run as that many micro-batches out of phase (else as one batch);
        `batched_layout`: CPU float32 weights in oneDNN's layout for batched products
        (`daemon.shards.model.linear.pack_linears`)."""
        self.blocks: dict[str, ServedBlock] = {}
        self.sessions: dict[str, Session] = {}
        self.max_sessions = max_sessions
        self.session_idle_s = session_idle_s
        self.cache_budget_bytes = cache_budget_bytes
        self.pushes = PushPool(opener)
        self.static_decode = static_decode
        self._on_reject = on_reject or (lambda reason: None)
        self.stream_idle_s = stream_idle_s
        self.max_streams_per_peer = max_streams_per_peer
        self._streams: dict[str, int] = {}  # peer -> streams it holds open here
        # one step at a time per process: torch already uses every core for one
        self._compute = trio.CapacityLimiter(1)
        self.payments = payments
        if max_batch < 1 or not 0 <= batch_window_s <= 1:
            raise ValueError("max_batch must be >= 1 and batch_window_s within 0..1 s")
        self.max_batch = max_batch
        self.batch_window_s = batch_window_s
        self.pipeline = pipeline
        self.batched_layout = batched_layout
        # the batchers of decode steps, per loaded range; `batching.batch_sizes` (a histogram
        # of forward passes by steps in them) and `batching.batched_steps` for /metrics
        self.batching: Batchers[Session] = Batchers(self._batcher)

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
                lambda: self._load_shard(model_dir, start, end, dtype=dtype, device=device)
            )
        except (ModelError, OSError) as exc:
            raise ShardError("bad_model", f"cannot load {model_dir}: {exc}") from None
        block = ServedBlock(model_id, model_dir, start, end, config, shard, dtype, device)
        self.blocks[model_id] = block
        if self.cache_budget_bytes is None:
            self.cache_budget_bytes = available_memory(device) // 2
        return block

    def _load_shard(self, model_dir: Path, start: int, end: int, **where: Any) -> LlamaShard:
        """Load a range; on a batching server, its CPU float32 weights in the layout made for
        batched products (`daemon.shards.model.linear`)."""
        shard = load_shard(model_dir, start, end, **where)
        if self.batched_layout and self.max_batch > 1:
            pack_linears(shard)
        return shard

    def unload(self, model_id: str) -> bool:
        block = self.blocks.pop(model_id, None)
        self.batching.drop(model_id)
        for session_id in [s.id for s in self.sessions.values() if s.block is block]:
            self.end_session(session_id)
        return block is not None

    # -- sessions ----------------------------------------------------------------------

    @property
    def cache_used_bytes(self) -> int:
        return sum(session.cache.nbytes for session in self.sessions.values())

    def free_cache_tokens(self, block: ServedBlock) -> int:
        """Positions of `block` that one more session could still hold in its KV cache."""
        return block.tokens_for((self.cache_budget_bytes or 0) - self.cache_used_bytes)

    @property
    def max_frame_bytes(self) -> int:
        """The largest frame any session here can take: a header and a step of
        `MAX_STEP_TOKENS` positions of the widest input (a header alone, serving nothing).
        The transports refuse longer frames before reading them."""
        widest = max(
            (
                min(MAX_STEP_TOKENS, b.config.max_position_embeddings) * input_bytes_per_position(b)
                for b in self.blocks.values()
            ),
            default=0,
        )
        return 4 + wire.MAX_HEADER_BYTES + widest

    def session_input_limit(self, session: Session) -> int:
        """The most tensor bytes a step of this session can carry (its remaining positions)."""
        positions = min(MAX_STEP_TOKENS, max(0, session.max_length - session.length))
        return positions * input_bytes_per_position(session.block)

    def open_session(self, header: wire.Open, owner: Outbox) -> Session:
        block = self.blocks.get(header.model)
        if block is None:
            raise ShardError("unknown_model", f"model {header.model[:80]!r} not served")
        if header.start != block.start or header.end != block.end:
            raise ShardError("bad_range", f"this server holds layers [{block.start}, {block.end})")
        max_length = header.max_length
        limit = block.config.max_position_embeddings
        if not 0 < max_length <= limit:
            raise ShardError("bad_length", f"max_length must be 1..{limit}")
        if len(self.sessions) >= self.max_sessions:
            self.reap_idle()
            if len(self.sessions) >= self.max_sessions:
                raise ShardError("busy", f"{self.max_sessions} sessions already open")
        peer = owner.stream.peer_id
        if sum(s.peer == peer for s in self.sessions.values()) >= (
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
        session = Session(
            session_id,
            block,
            cache,
            max_length,
            owner,
            peer=peer,
            link=secrets.token_hex(16),
            prev=header.prev,
            next=header.next,
            depth=header.depth or 1,
        )
        self.sessions[session_id] = session
        return session

    def reap_idle(self) -> int:
        cutoff = time.monotonic() - self.session_idle_s
        idle = [s.id for s in self.sessions.values() if s.last_used < cutoff]
        for session_id in idle:
            self.end_session(session_id)
        return len(idle)

    def end_session(self, session_id: str) -> None:
        """Forget a session (closed, its stream gone, idle, unloaded); a paid one's job may
        be settled now."""
        session = self.sessions.pop(session_id, None)
        if session is not None and session.paid is not None and self.payments is not None:
            self.payments.ended(session.paid)

    async def _admit(self, session: Session, job_id: bytes) -> None:
        """Make `session` paid work for `job_id`, or drop it and raise ShardError with the
        provider's reason (an unknown, expired or unfunded job gets no free work)."""
        from daemon.payments.provider import PaymentRefused

        try:
            if self.payments is None:
                raise ShardError("unpaid", "this node does no paid work (no chain configured)")
            block = session.block
            session.paid = await self.payments.admit(
                job_id, session.id, block.model_id, block.start, block.end, opener=session.peer
            )
        except PaymentRefused as exc:
            self.end_session(session.id)
            raise ShardError(exc.code, str(exc)) from None
        except BaseException:
            self.end_session(session.id)
            raise

    async def _receipt(self, session: Session, x: torch.Tensor, out: torch.Tensor) -> bytes | None:
        """A paid session's signed receipt of the step that took `x` and gave `out`."""
        if session.paid is None or self.payments is None:
            return None
        try:
            return await self.payments.sign(
                session.paid, wire.tensor_bytes(x), wire.tensor_bytes(out), x.shape[1]
            )
        except Exception as exc:  # the store failed: the step fails, the client re-routes
            log.warning("cannot sign a receipt: %r", exc)
            raise ShardError("receipt", "this server cannot record the step's receipt") from None

    # -- batching ----------------------------------------------------------------------

    def _batcher(self, block: ServedBlock) -> Batcher[Session]:
        return Batcher(
            lambda sessions, xs, last_only: run_steps(sessions, xs, last_only, self.static_decode),
            limiter=self._compute,
            settle=self._settle,
            live=lambda session: self.sessions.get(session.id) is session,
            depth=lambda session: session.depth if self.pipeline else 1,
            sessions=lambda: [s for s in self.sessions.values() if s.block is block],
            max_batch=self.max_batch,
            window_s=self.batch_window_s,
        )

    @staticmethod
    def _settle(sessions: Sequence[Session], positions: Sequence[int]) -> None:
        for session, count in zip(sessions, positions, strict=True):
            session.advance(count)

    @property
    def waiting_steps(self) -> int:
        """Steps waiting for compute: gathered for a batch, or waiting while another pass
        runs (a batch takes its steps once it holds the compute)."""
        return self.batching.pending

    # -- steps ---------------------------------------------------------------------------

    async def forward(
        self, session: Session, position: Any, x: torch.Tensor | None, last_only: bool
    ) -> torch.Tensor:
        """Compute one step of `session`, in one forward pass with the steps of other
        sessions of its range that are ready (`daemon.shards.batching`). At most one step
        of a session is queued or computing."""
        check_step(session, position, x)
        assert x is not None
        if session.computing:
            raise ShardError("bad_position", "a step of this session is running")
        session.computing = True
        try:
            batcher = self.batching.of(session.block)
            return await batcher.step(session, x, positions=x.shape[1], last_only=last_only)
        except StepDropped:
            raise ShardError("unknown_session", "the session ended") from None
        finally:
            session.computing = False

    # -- protocol ----------------------------------------------------------------------

    async def handle_stream(self, stream: Stream) -> None:
        """Serve one stream (a client's, or a previous server's pushes) until it closes;
        the sessions opened on it end with it.

        Chained steps run beside the reader, so pushes between servers of crossing routes
        (A->B, B->C, C->A) cannot all wait on each other. At most one step per session is in
        flight, so a stream holds at most `max_sessions` of them (and as many final replies).
        """
        peer = stream.peer_id
        if self._streams.get(peer, 0) >= self.max_streams_per_peer:
            log.info(
                "refusing a shard stream of %s: %d open", peer[-12:], self.max_streams_per_peer
            )
            self._on_reject("too_many_streams")
            return  # the transport closes it
        self._streams[peer] = self._streams.get(peer, 0) + 1
        outbox = Outbox(stream)
        owned: set[str] = set()

        async def run_step(session: Session, header: wire.Forward, x: torch.Tensor) -> None:
            try:
                await self._chained_step(session, header, x)
            except BaseException:
                session.stepping = False
                raise

        try:
            async with trio.open_nursery() as steps:

                def spawn(session: Session, header: wire.Forward, x: torch.Tensor | None) -> None:
                    if session.stepping:  # a client waits for each step before the next
                        raise ShardError("bad_position", "a step of this session is running")
                    check_step(session, header.position, x)  # before parking x
                    assert x is not None
                    session.stepping = True
                    steps.start_soon(run_step, session, header, x)

                frames_in, frames_out = trio.open_memory_channel[bytes](0)
                reading = trio.CancelScope()

                async def pump() -> None:
                    """Read frames beside the loop, so that waking up for the idle check
                    never cuts a frame in half."""
                    with reading:
                        async with frames_in:
                            while True:
                                try:
                                    frame = await stream.receive()
                                except NetworkError:
                                    return
                                await frames_in.send(frame)

                steps.start_soon(pump)
                try:
                    await self._serve_frames(frames_out, outbox, owned, spawn)
                finally:
                    reading.cancel()  # in-flight steps finish (or fail) by themselves
        finally:
            self._streams[peer] -= 1
            if not self._streams[peer]:
                del self._streams[peer]
            for session_id in owned:
                self.end_session(session_id)

    async def _serve_frames(
        self,
        frames: trio.MemoryReceiveChannel[bytes],
        outbox: Outbox,
        owned: set[str],
        spawn: Callable[[Session, wire.Forward, torch.Tensor | None], None],
    ) -> None:
        while True:
            with trio.move_on_after(self.stream_idle_s) as idle:
                try:
                    frame = await frames.receive()
                except trio.EndOfChannel:
                    return
            if idle.cancelled_caught:
                if any(session_id in self.sessions for session_id in owned):
                    continue  # e.g. a chained hop's owner stream: its client only listens
                log.info("closing an idle shard stream of %s", outbox.stream.peer_id[-12:])
                self._on_reject("idle_stream")
                return
            reply = await self._handle_frame(frame, outbox, owned, spawn)
            if reply is not None:
                try:
                    await outbox.send(*reply)
                except NetworkError:
                    return

    async def _handle_frame(
        self,
        frame: bytes,
        outbox: Outbox,
        owned: set[str],
        spawn: Callable[[Session, wire.Forward, torch.Tensor | None], None],
    ) -> tuple[wire.Reply, torch.Tensor | None] | None:
        """The reply to send back on this stream, or None: chained steps run beside the
        stream's reader (`spawn`) and answer the session's owner."""
        step: int | None = None
        try:
            header, payload = wire.decode_header(frame)
            if isinstance(header, wire.Open):
                wire.decode_tensor(header, payload, 0)
                session = self.open_session(header, outbox)
                if header.job is not None:
                    await self._admit(session, header.job)
                owned.add(session.id)
                return wire.Opened(session=session.id, link=session.link), None
            if isinstance(header, wire.Forward) and header.pushed:
                await self._pushed(header, payload, outbox, spawn)
                return None
            if not isinstance(header, wire.Forward | wire.Link | wire.Close):
                raise ShardError("bad_op", f"{type(header).__name__.lower()} is not a request")
            step = header.step if isinstance(header, wire.Forward) else None
            session = self.sessions.get(header.session)
            if session is None or session.id not in owned:
                raise ShardError("unknown_session", "no such session on this stream (expired?)")
            tensor = wire.decode_tensor(header, payload, self.session_input_limit(session))
            if isinstance(header, wire.Forward) and header.step is not None:
                spawn(session, header, tensor)
                return None
            if isinstance(header, wire.Forward):
                out = await self.forward(session, header.position, tensor, header.last_only)
                receipt = await self._receipt(session, tensor, out)  # type: ignore[arg-type]
                return wire.Result(length=session.length, receipt=receipt), out
            if isinstance(header, wire.Link):
                session.next = header.next
                return wire.Linked(session=session.id), None
            self.end_session(session.id)
            owned.discard(session.id)
            return wire.Closed(), None
        except (wire.WireError, ShardError, ModelError, RuntimeError) as exc:
            if isinstance(exc, wire.WireError) and exc.reason in GARBAGE:
                # no client of ours sends a frame that does not decode: held against the
                # peer's score, so its bytes are read more slowly (p2p.inbound); local and
                # in-memory streams have no score (no `misbehaved`)
                misbehaved = getattr(outbox.stream, "misbehaved", None)
                if misbehaved is not None:
                    misbehaved()
            return self._error(exc, step), None

    async def _pushed(
        self,
        header: wire.Forward,
        payload: memoryview,
        outbox: Outbox,
        spawn: Callable[[Session, wire.Forward, torch.Tensor | None], None],
    ) -> None:
        """A step pushed by the previous server of a chain. Only the peer the session's
        opener named, showing the session's link token, may push; anything else is dropped
        and counted (an answer would tell a prober which sessions exist)."""
        session = self.sessions.get(header.session)
        if session is None:
            self._on_reject("unknown_session")
            return
        if outbox.stream.peer_id != session.prev or header.link != session.link:
            self._on_reject("foreign_push")
            return
        try:
            if header.step is None:
                raise ShardError("bad_input", "a pushed step needs a step number")
            tensor = wire.decode_tensor(header, payload, self.session_input_limit(session))
            spawn(session, header, tensor)
        except (wire.WireError, ShardError) as exc:
            await self._tell_owner(session, self._error(exc, header.step))

    def _error(self, exc: Exception, step: int | None) -> wire.Error:
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
        return wire.Error(code=code, message=str(exc)[:1000], step=step)

    async def _chained_step(self, session: Session, header: wire.Forward, x: torch.Tensor) -> None:
        """Compute this hop of a chained step, push the output on, and tell the owner.

        The session may take its next step as soon as this one's last message to the owner
        is on its way: `stepping` is cleared before that send, since the client answers it
        with the next step at once (clearing it after raced that step, issue 12 item 16)."""
        step, position, nxt = header.step, header.position, session.next
        assert step is not None
        try:
            out = await self.forward(session, position, x, nxt is None and header.last_only)
            receipt = await self._receipt(session, x, out)
        except (ShardError, ModelError, RuntimeError) as exc:
            session.stepping = False
            await self._tell_owner(session, self._error(exc, step))
            return
        if nxt is None:
            session.stepping = False
            await self._tell_owner(session, wire.Result(step=step, receipt=receipt), out)
            return
        push = wire.Forward(
            session=nxt.session,
            position=position,
            step=step,
            last_only=header.last_only,
            pushed=True,
            link=nxt.link,
        )
        partial = wire.Partial(step=step, position=position, receipt=receipt)
        try:
            await self.pushes.push(nxt.peer, wire.encode(push, out))
        except NetworkError as exc:
            # the owner decides: relay this step itself, or route around the next server
            partial = wire.Partial(
                step=step,
                position=position,
                forward_error=str(exc)[:300],
                failed_peer=nxt.peer,
                receipt=receipt,
            )
        session.stepping = False
        await self._tell_owner(session, partial, out)

    async def _tell_owner(
        self, session: Session, header: wire.Reply, tensor: torch.Tensor | None = None
    ) -> None:
        try:
            with trio.fail_after(TELL_OWNER_TIMEOUT_S):
                await session.owner.send(header, tensor)
        except NetworkError:  # the client is gone: its sessions end with its stream
            self.end_session(session.id)
        except trio.TooSlowError:  # the client stopped reading: end its session, free its cache
            self._on_reject("owner_stalled")
            self.end_session(session.id)
