"""Continuous batching: the steps of the sessions of one loaded range that are ready at about
the same time run as one forward pass (and how a step is computed, alone or in a batch).

Why: a decode step of one session reads every weight of the range to compute one row; the
matrix products of 16 rows cost hardly more than those of one (a decode step is bound by
reading the weights, on a GPU above all). So the steps of different sessions that are ready
together are packed into one forward (`LlamaShard.forward_packed`): decode steps (one
position), and also prefills of sessions that join and replays after a failover (many
positions), so that a new session's prompt shares a pass with the others' decode steps
instead of holding them up with a pass of its own. Sessions join and leave the batch
between steps, as with vLLM's scheduler.

How a batch is gathered: there is no background task. A step that arrives while no batch is
being gathered makes its caller the *leader*. It waits until no other live session that ran
here is due back (sessions come back together: in lockstep), or the window (`window_s`,
grown to about one pass's time: `Batcher.window`) after the batch could have run (its oldest
step's arrival, or the end of the batch that step waited for), or until `max_batch` steps or
`max_positions` positions are pending, whichever is first. A session is due back when its
last batch ended plus how long it took to come back the time before (its client's round
trip; on a hop of a chain, the other hops' compute too). One due after the deadline is not
awaited: on a hop of a chain two groups of sessions out of step by more than the window are
two micro-batches of the pipeline, and waiting for the other would only leave this hop idle;
groups closer than that merge. One overdue by more than the window (its client went quiet,
its generation ended) is not awaited either. Then the leader takes the compute limiter (one
forward pass at a time per process), takes pending steps in arrival order up to `max_batch`
steps and `max_positions` positions (a step that would pass the latter waits for the next
batch, and nothing behind it is taken before it: a long prefill is not passed over for ever;
one longer than `max_positions` runs alone) and runs them as one forward in a worker thread.
Its callers get their own outputs. A leader whose own step is done leaves; if steps are
still pending, one of their callers leads next. So:
- a lone session never waits (nobody else is due);
- a slow or dead session holds a batch back by at most the window, and is then no longer
  awaited until it steps again (then it joins the next batch);
- nobody starves: steps are taken oldest first, at most `max_batch` at a time;
- a batch of one runs as any lone step (a static decoder, CUDA graphs, where configured);
- a caller cancelled while its step is pending withdraws it; once taken, its batch runs to
  the end (shielded) and the session's state is settled by the leader (`settle`), whether
  anyone still waits for the result or not, so a session's length never disagrees with its
  cache;
- a step whose session ended before its batch ran is dropped (`StepDropped`), the others run;
- a batch whose pass fails (out of memory, say) runs again one step at a time: a failure
  is only its own step's.

Why each session keeps its own KV cache (rather than vLLM's shared slots or pages): the
cache budget, `busy`, failover by replay and the sessions' lifetimes stay exactly as they
were, and `forward_packed` attends each session over its own cache with no copy. Gathering the
caches into one padded tensor per step would copy every cached position of every layer at
every step (as many bytes as the weights, for 16 sessions of 200 positions at hidden 512),
and shared slots would preallocate the longest length for every session or need paged
attention, which plain torch has no kernel for. The price is one small attention call per
session and layer; see bench/batching.py for what batching gains with it, and what the
gathers would cost. On a GPU, batches of several sessions run eagerly (no CUDA graph).

Pipelining (micro-batches across the hops of a chain): through a chain of D hops, sessions
that step together would form one batch that travels from hop to hop, each hop idle while the
D - 1 others compute. So on a range whose sessions belong to chains of D > 1 hops (each
session's opener declares its chain's depth, `wire.Open.depth`), a batch takes at most
ceil(n / D) steps, n being the sessions of the range that are due here (open and not gone
quiet: pending, running, never stepped here yet, or not yet overdue by more than their usual
round trip). With chains of different depths, each session due here weighs 1 / its chain's
depth, and a batch takes at most the ceiling of their sum: so a session that claims a very
deep chain (the depth is its opener's word) weighs next to nothing, and cannot split the
other sessions' batches. The steps of concurrent sessions then travel
as about D groups out of phase: while hop k runs step t of one group, hop k - 1 runs it for
the next. Why D groups: a pass costs a + c·b for b rows (a: reading the weights, c: the
rows' arithmetic), so one batch of all n sessions takes D·(a + c·n) per round, while D
groups of n / D keep every hop busy and take D·a + c·n per round: never more, and up to D
times less where the rows' arithmetic dominates (large batches, long prefills, a CPU). Once
the batch is at its cap nobody is awaited; below it the window and "due back" rules stand, so
a group's stragglers still join it, and the groups stay apart as they formed (steps are taken
oldest first, and each hop passes a group on whole). A lone session never waits (its cap is
1), nothing starves (oldest first), and a one-hop chain's sessions (or an old client's: no
depth) batch exactly as before. The server may turn it off (`ShardServer(pipeline=False)`).
"""

from __future__ import annotations

import collections
import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Generic, TypeVar

import torch
import trio

from daemon.shards.blocks import ServedBlock
from daemon.shards.session import Session
from daemon.shards.wire import MAX_DEPTH

MAX_BATCH = 32
MAX_BATCH_POSITIONS = 4096  # a step may carry that many alone (server.MAX_STEP_TOKENS)
BATCH_WINDOW_S = 0.005
# the window grows to about one pass's time (see `Batcher.window`), up to this
MAX_ADAPTIVE_WINDOW_S = 0.25
PASS_EWMA = 0.2  # the weight of the newest pass in the pass time's moving average

K = TypeVar("K")


class StepDropped(Exception):
    """The step's session ended before its batch ran."""


@dataclass(eq=False)
class _Step(Generic[K]):
    key: K
    x: torch.Tensor
    positions: int
    last_only: bool
    arrived: float
    done: trio.Event = field(default_factory=trio.Event)
    wake: trio.Event = field(default_factory=trio.Event)  # done, or lead the steps left
    out: torch.Tensor | None = None
    error: BaseException | None = None
    taken: bool = False


class Batcher(Generic[K]):
    """Gathers steps of the sessions (`K`) of one loaded range and runs them together.

    `compute(keys, xs, last_only)`: runs in a worker thread, returns one output per step,
    in order; `settle(keys, positions)`: called on the event loop once a batch has run (the
    sessions advance by their steps' positions);
    `live(key)`: whether a session still exists (steps of ended ones are dropped);
    `limiter`: the compute limiter batches and every other step share; `depth(key)`: hops
    of the session's whole chain (1: no pipelining); `sessions()`: the live sessions of the
    range, also those that have not stepped here yet (they count towards the micro-batches).

    A batch holds at most `max_batch` steps (and, for sessions of chains of several hops,
    ceil(sessions due here / depth): see the module's docstring) and `max_positions`
    positions (a step longer than that runs alone).

    Read by metrics: `batch_sizes` (forward passes run, by number of steps in them),
    `batched_steps` (steps that ran in a batch of two or more), `shared_prefills` (steps of
    several positions, prefills and replays, that ran with other steps), `pending` (steps
    waiting)."""

    def __init__(
        self,
        compute: Callable[
            [Sequence[K], Sequence[torch.Tensor], Sequence[bool]], list[torch.Tensor]
        ],
        *,
        limiter: trio.CapacityLimiter,
        settle: Callable[[Sequence[K], Sequence[int]], None] = lambda keys, positions: None,
        live: Callable[[K], bool] = lambda key: True,
        depth: Callable[[K], int] = lambda key: 1,
        sessions: Callable[[], Iterable[K]] = tuple,
        max_batch: int = MAX_BATCH,
        max_positions: int = MAX_BATCH_POSITIONS,
        window_s: float = BATCH_WINDOW_S,
        max_window_s: float = MAX_ADAPTIVE_WINDOW_S,
    ) -> None:
        if max_batch < 1 or max_positions < 1 or window_s < 0:
            raise ValueError("max_batch and max_positions must be >= 1 and window_s >= 0")
        self._compute = compute
        self._settle = settle
        self._live = live
        self._depth = depth
        self._sessions = sessions
        self._limiter = limiter
        self.max_batch = max_batch
        self.max_positions = max_positions
        self.window_s = window_s
        self.max_window_s = max_window_s
        self.pass_s = 0.0  # the moving average of a pass's time (event loop's clock)
        self._pipelined = False  # whether the last `cap` made micro-batches
        self._pending: list[_Step[K]] = []
        self._running: set[int] = set()  # the sessions (by id) of the batch computing
        self._leading = False
        self._ran_at = float("-inf")  # when the last batch ended
        # per live session (by id): when its last batch ended, and how long it took to come
        # back with its next step after the one before (its client's round trip, or a whole
        # pipeline's)
        self._done_at: dict[int, tuple[K, float]] = {}
        self._back_s: dict[int, float] = {}
        self._changed = trio.Event()
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        self.batched_steps = 0
        self.shared_prefills = 0

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _notify(self) -> None:
        """Wake the leader: the steps pending changed."""
        self._changed.set()
        self._changed = trio.Event()

    def _finish(self, item: _Step[K]) -> None:
        item.done.set()
        item.wake.set()

    def _hand_over(self) -> None:
        """No leader: the oldest pending step's caller leads next (one task woken, not all)."""
        if not self._leading and self._pending:
            self._pending[0].wake.set()

    async def step(
        self, key: K, x: torch.Tensor, *, positions: int = 1, last_only: bool = False
    ) -> torch.Tensor:
        """`key`'s output for its input `x` of `positions` positions, computed in a batch
        with whatever other sessions' steps are ready. At most one step per key at a time
        (the caller's rule: the server refuses a second one)."""
        item = _Step(key, x, positions, last_only, trio.current_time())
        done = self._done_at.get(id(key))
        if done is not None and done[0] is key:
            self._back_s[id(key)] = item.arrived - done[1]
        self._pending.append(item)
        self._notify()
        try:
            while not item.done.is_set():
                if self._leading:
                    await item.wake.wait()
                    item.wake = trio.Event()
                    continue
                self._leading = True
                try:
                    await self._lead(item)
                finally:
                    self._leading = False
                    self._hand_over()  # a waiting caller leads the steps left, if any
        except BaseException:
            if not item.taken and item in self._pending:  # withdrawn before its batch
                self._pending.remove(item)
                self._notify()
                self._hand_over()
            raise
        if item.error is not None:
            raise item.error
        assert item.out is not None
        return item.out

    def cap(self) -> int:
        """The most steps the next batch takes: `max_batch`, and on a hop of chains of
        depth D > 1, ceil(sessions due here / D) (each session weighing 1 / its own
        chain's depth), so that concurrent chains' steps travel as D micro-batches out of
        phase (see the module's docstring)."""
        keys: dict[int, K] = {id(item.key): item.key for item in self._pending}
        for i, (key, _) in self._done_at.items():
            keys.setdefault(i, key)
        for key in self._sessions():
            keys.setdefault(id(key), key)
        busy = {id(item.key) for item in self._pending} | self._running
        now = trio.current_time()
        share, deep = Fraction(0), False  # each session due here weighs 1 / its depth
        for i, key in keys.items():
            if i in busy or (self._live(key) and not self._went_quiet(i, now)):
                depth = max(1, min(MAX_DEPTH, self._depth(key)))
                share += Fraction(1, depth)
                deep = deep or depth > 1
        self._pipelined = deep
        if not deep:  # one-hop chains (or old clients') only: as without pipelining
            return self.max_batch
        return max(1, min(self.max_batch, math.ceil(share)))

    def window(self) -> float:
        """How long a batch may wait for sessions due back: `window_s`, grown to the time
        of one pass here (at most `max_window_s`). Why one pass: a straggler left out runs
        in a pass of its own, which reads every weight again and holds the next batch back
        by about as long; waiting up to that long for it costs no more, and on a chain of
        hops whose passes take longer than `window_s` (daemons sharing cores, a big model
        on a CPU) a fixed window splits sessions that step together into a batch each.
        Micro-batches of a pipeline keep `window_s`: their groups are a pass apart by design,
        each hop on its own hardware, and waiting for the next group would idle this one."""
        if self._pipelined:
            return self.window_s
        return max(self.window_s, min(self.pass_s, self.max_window_s))

    def _went_quiet(self, i: int, now: float) -> bool:
        """Whether a session that stepped here is overdue by more than its usual round trip
        (and the window): it no longer counts towards the micro-batches until it steps."""
        done, back = self._done_at.get(i), self._back_s.get(i)
        if done is None or back is None:  # not stepped here yet, or only once
            return False
        return now > done[1] + back + max(self.window(), back)

    def _ready(self, deadline: float) -> bool:
        """Whether to run now: a full batch is pending (`cap` steps or `max_positions`
        positions), or no live session that ran here is due back with its next step before
        `deadline` (due: when its last batch ended plus how long it took to come back the
        time before; one overdue by more than the window is not awaited: its client went
        quiet, or its generation ended)."""
        pending = self._pending
        positions = sum(item.positions for item in pending)
        if len(pending) >= self.cap() or positions >= self.max_positions:
            return True
        waiting = {id(item.key) for item in self._pending}
        earliest = trio.current_time() - self.window()
        for i, (key, done) in self._done_at.items():
            due = done + self._back_s.get(i, 0.0)
            if i not in waiting and earliest <= due <= deadline and self._live(key):
                return False
        return True

    async def _lead(self, mine: _Step[K]) -> None:
        """Run batches until `mine` is done."""
        while not mine.done.is_set():
            if not self._pending:  # a step not done is pending or in a batch: never here
                mine.error = RuntimeError("a step was lost by its batcher")
                self._finish(mine)
                return
            # the window runs from when this batch could have run: its oldest step's
            # arrival, or the end of the batch that step waited for
            oldest = min(item.arrived for item in self._pending)
            self.cap()  # (whether this range makes micro-batches now: `window`)
            deadline = max(oldest, self._ran_at) + self.window()
            with trio.move_on_at(deadline):
                while not self._ready(deadline):
                    await self._changed.wait()
            with trio.CancelScope(shield=True):  # taken steps always finish
                async with self._limiter:
                    await self._run_batch()

    async def _run_batch(self) -> None:
        batch: list[_Step[K]] = []
        seen: set[int] = set()
        positions = 0
        cap = self.cap()
        for item in list(self._pending):
            if len(batch) == cap or (batch and positions + item.positions > self.max_positions):
                break  # the rest waits, in order: a long step is not passed over for ever
            if id(item.key) in seen:  # a session's second step (its caller gave up on the
                continue  # first, which is running): in a later batch, never twice in one
            seen.add(id(item.key))
            self._pending.remove(item)
            item.taken = True
            if self._live(item.key):
                batch.append(item)
                positions += item.positions
            else:
                item.error = StepDropped("the session ended")
                self._finish(item)
        if not batch:
            return
        self._running = {id(item.key) for item in batch}
        try:
            await self._run_taken(batch)
        finally:
            self._running = set()

    async def _run_taken(self, batch: list[_Step[K]]) -> None:
        outs = await self._attempt(batch)
        if outs is not None:
            self._finished(batch, outs)
            return
        if len(batch) > 1:
            # a batch that failed (out of memory, say) runs again one step at a time, so
            # that a failure is only its own step's (a failed pass advanced no session; the
            # positions it may have written are written again)
            try:
                for item in batch:
                    outs = await self._attempt([item])
                    if outs is not None:
                        self._finished([item], outs)
            except BaseException:
                for item in batch:
                    if not item.done.is_set():
                        item.error = StepDropped("its batch was interrupted")
                        self._finish(item)
                raise

    async def _attempt(self, batch: list[_Step[K]]) -> list[torch.Tensor] | None:
        """The batch's outputs (in a worker thread), or None if it failed: a lone step then
        fails with the error."""
        try:
            started = trio.current_time()
            outs = await trio.to_thread.run_sync(
                self._compute,
                [item.key for item in batch],
                [item.x for item in batch],
                [item.last_only for item in batch],
            )
            took = trio.current_time() - started
            self.pass_s += PASS_EWMA * (took - self.pass_s) if self.pass_s else took
            if len(outs) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} steps gave {len(outs)} outputs")
            return outs
        except Exception as exc:
            if len(batch) == 1:
                batch[0].error = exc
                self._finish(batch[0])
            return None
        except BaseException:
            for item in batch:
                item.error = StepDropped("its batch was interrupted")
                self._finish(item)
            raise

    def _finished(self, batch: list[_Step[K]], outs: list[torch.Tensor]) -> None:
        """Settle the sessions of a batch that ran, count it, and hand out the outputs."""
        keys = [item.key for item in batch]
        self._settle(keys, [item.positions for item in batch])
        self._ran_at = trio.current_time()
        for key in keys:
            self._done_at[id(key)] = (key, self._ran_at)
        for gone in [i for i, (key, _) in self._done_at.items() if not self._live(key)]:
            del self._done_at[gone]
            self._back_s.pop(gone, None)
        self.batch_sizes[len(batch)] += 1
        if len(batch) > 1:
            self.batched_steps += len(batch)
            self.shared_prefills += sum(item.positions > 1 for item in batch)
        for item, out in zip(batch, outs, strict=True):
            item.out = out
            self._finish(item)


class Batchers(Generic[K]):
    """The batchers of a server's loaded ranges (one each, made by `make` at its first
    step), and their metrics summed for /metrics."""

    def __init__(self, make: Callable[[ServedBlock], Batcher[K]]) -> None:
        self._make = make
        self._held: dict[str, tuple[ServedBlock, Batcher[K]]] = {}

    def of(self, block: ServedBlock) -> Batcher[K]:
        held = self._held.get(block.model_id)
        if held is None or held[0] is not block:  # first step, or the range was reloaded
            held = (block, self._make(block))
            self._held[block.model_id] = held
        return held[1]

    def drop(self, model_id: str) -> None:
        self._held.pop(model_id, None)

    def by_model(self) -> dict[str, Batcher[K]]:
        """The batcher of each loaded range, by model id (for /metrics per model)."""
        return {model: batcher for model, (_, batcher) in self._held.items()}

    @property
    def batch_sizes(self) -> dict[int, int]:
        """Forward passes run, by how many sessions' steps each held (1: alone)."""
        sizes: collections.Counter[int] = collections.Counter()
        for _, batcher in self._held.values():
            sizes.update(batcher.batch_sizes)
        return dict(sorted(sizes.items()))

    @property
    def batched_steps(self) -> int:
        """Steps that ran in a forward pass together with another session's."""
        return sum(batcher.batched_steps for _, batcher in self._held.values())

    @property
    def shared_prefills(self) -> int:
        """Steps of several positions (prefills, replays) that ran with other steps."""
        return sum(batcher.shared_prefills for _, batcher in self._held.values())

    @property
    def pending(self) -> int:
        return sum(batcher.pending for _, batcher in self._held.values())


# -- computing steps (in a worker thread) ---------------------------------------------------


def run_alone(
    session: Session, x: torch.Tensor, last_only: bool, static: bool | None
) -> torch.Tensor:
    """One step of one session at its next positions; one-position steps through a static
    decoder (CUDA graphs, `daemon.shards.model.decode`) when `static` (None: on CUDA)."""
    block = session.block
    started = time.perf_counter()
    if static is None:
        static = block.device.startswith("cuda")
    if static and x.shape[1] == 1:
        if session.decoder is None:
            from daemon.shards.model import StaticDecoder

            session.decoder = StaticDecoder(block.shard, session.cache)
        out = session.decoder.step(x).cpu()
    else:
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


def run_steps(
    sessions: Sequence[Session],
    xs: Sequence[torch.Tensor],
    last_only: Sequence[bool],
    static: bool | None,
) -> list[torch.Tensor]:
    """A step of each of `sessions` (all of one range): one alone as any step, several as
    one forward pass (`LlamaShard.forward_packed`); `last_only`: that session wants its
    last position's output only. A block's `steps` and `compute_s` count forward passes,
    so its `ms_per_layer` stays what a step waits. A step that fails leaves every cache at
    its session's length (the session's, advanced only once its step is through, is what
    counts), so that running it again writes the same positions."""
    try:
        if len(sessions) == 1:
            return [run_alone(sessions[0], xs[0], last_only[0], static)]
        block = sessions[0].block
        started = time.perf_counter()
        with torch.inference_mode():
            outs = block.shard.forward_packed(
                [x.to(block.device) for x in xs], [session.cache for session in sessions]
            )
            outs = [o[:, -1:] if last else o for o, last in zip(outs, last_only, strict=True)]
            outs = [o.cpu() if o.device.type != "cpu" else o.clone() for o in outs]
        block.compute_s += time.perf_counter() - started
        block.steps += 1
        return outs
    except BaseException:
        for session in sessions:
            session.cache.length = session.length
        raise
