"""A bounded, read-only record of the generations this node ran lately, with their routes.

Every generation the local APIs run goes through `daemon.shards.generation.run_generation`
(JSON-RPC and gRPC `generate`, the OpenAI endpoint): it is recorded here from the moment its
route is planned. While it runs, its route is read from its live `RemoteModel` (which peer
serves which layer range now: a failover changes it), with the failovers so far and what
failed; when it ends, route and failovers are frozen. Also: tokens, time to first token
(from the start, route opening included) and tokens per second (after the first token).

At most `MAX_GENERATIONS` are kept: at the cap the oldest finished one goes (a running one
only if none has finished). Nothing here reaches the network; reading it is a walk over at
most 64 entries. Read by the `generation_list` JSON-RPC method (daemon.generation_methods)
and the dashboard.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import trio

MAX_GENERATIONS = 64
MAX_HOPS = 64  # hops of one route reported (a route has at most one per layer)
MAX_FAILOVERS = 16  # failovers of one generation reported in full (all are counted)
MAX_REASON_CHARS = 200
STATES = ("running", "done", "failed", "cancelled")


class LiveModel(Protocol):
    """What is read of a running generation (daemon.shards.client.RemoteModel)."""

    @property
    def route(self) -> list[dict[str, Any]]: ...

    recoveries: list[dict[str, Any]]
    chained: bool


class FinishedJob(Protocol):
    """What is read of a generation's job when it ends (daemon.shards.jobs.Job)."""

    id: str
    error: str | None
    scope: trio.CancelScope


# (state, failovers) when a generation ends: the metrics' hook
EndHook = Callable[[str, int], None]


def _hops(route: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"peer": h["peer_id"], "start": h["start"], "end": h["end"]} for h in route[:MAX_HOPS]]


def _failures(recoveries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        {
            "peer": r.get("peer_id"),
            "reason": str(r.get("reason", ""))[:MAX_REASON_CHARS],
            "from_layer": r.get("from_layer"),
            "seconds": r.get("seconds"),
        }
        for r in recoveries[-MAX_FAILOVERS:]
    ]


@dataclass
class Generation:
    """One generation as recorded: live while `source` is set, frozen once it ended."""

    job: str
    model: str
    prompt_tokens: int
    paid: bool
    started: float  # on the record's clock
    started_at: float  # unix time, for people
    clock: Callable[[], float] = field(repr=False)
    source: LiveModel | None = field(default=None, repr=False)
    on_end: EndHook | None = field(default=None, repr=False)
    tokens: int = 0
    first_token: float | None = None
    last_token: float | None = None
    ended: float | None = None
    state: str = "running"
    error: str | None = None
    route: list[dict[str, Any]] = field(default_factory=list)
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    forwarding: str = "chained"

    def token(self) -> None:
        """One more token generated (called as each arrives)."""
        now = self.clock()
        if self.first_token is None:
            self.first_token = now
        self.last_token = now
        self.tokens += 1

    def end(self, job: FinishedJob) -> None:
        """The generation is over: freeze its route and failovers (drops the live model)."""
        if self.ended is not None:
            return
        self.ended = self.clock()
        if self.source is not None:
            self.route = _hops(self.source.route)
            self.recoveries = list(self.source.recoveries)
            self.forwarding = "chained" if self.source.chained else "relayed"
            self.source = None
        if job.error is not None:
            self.state, self.error = "failed", job.error[:MAX_REASON_CHARS]
        elif job.scope.cancel_called:
            self.state = "cancelled"
        else:
            self.state = "done"
        if self.on_end is not None:
            self.on_end(self.state, len(self.recoveries))

    def to_json(self) -> dict[str, Any]:
        live = self.source
        route = _hops(live.route) if live is not None else self.route
        recoveries = list(live.recoveries) if live is not None else self.recoveries
        forwarding = ("chained" if live.chained else "relayed") if live else self.forwarding
        now = self.ended if self.ended is not None else self.clock()
        first, last = self.first_token, self.last_token
        decode = last - first if first is not None and last is not None else 0.0
        return {
            "job": self.job,
            "model": self.model,
            "state": self.state,
            "paid": self.paid,
            "started_at": round(self.started_at, 3),
            "seconds": round(now - self.started, 3),
            "prompt_tokens": self.prompt_tokens,
            "tokens": self.tokens,
            "ttft_s": None if first is None else round(first - self.started, 4),
            "tokens_per_s": round((self.tokens - 1) / decode, 2) if decode > 0 else None,
            "route": route,
            "forwarding": forwarding,
            "failovers": len(recoveries),
            "failed": _failures(recoveries),
            "error": self.error,
        }


class _Unrecorded:
    """Stands in for a Generation where nothing is recorded (a service without a record)."""

    def token(self) -> None:
        pass

    def end(self, job: FinishedJob) -> None:
        pass


class RecentGenerations:
    """The last `cap` generations of one node, newest last."""

    def __init__(
        self,
        cap: int = MAX_GENERATIONS,
        *,
        clock: Callable[[], float] = trio.current_time,
        on_end: EndHook | None = None,
    ) -> None:
        """`clock`: seconds for durations (trio's: virtual in tests); `on_end(state,
        failovers)`: told as each generation ends (metrics)."""
        if cap < 1:
            raise ValueError("cap must be at least 1")
        self.cap, self.clock, self.on_end = cap, clock, on_end
        self._items: OrderedDict[str, Generation] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def begin(
        self, job_id: str, model_id: str, source: LiveModel, *, prompt_tokens: int, paid: bool
    ) -> Generation:
        """Record a generation from now on; `source` is read for its live route."""
        self._items.pop(job_id, None)
        while len(self._items) >= self.cap:
            done = next((k for k, g in self._items.items() if g.ended is not None), None)
            self._items.pop(done if done is not None else next(iter(self._items)))
        entry = Generation(
            job=job_id,
            model=model_id,
            prompt_tokens=prompt_tokens,
            paid=paid,
            started=self.clock(),
            started_at=time.time(),
            clock=self.clock,
            source=source,
            on_end=self.on_end,
        )
        self._items[job_id] = entry
        return entry

    def list(
        self, limit: int = MAX_GENERATIONS, *, model: str | None = None, state: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first, at most `limit`, only of `model` / in `state` when given."""
        out: list[dict[str, Any]] = []
        for entry in reversed(self._items.values()):
            if len(out) >= limit:
                break
            if (model is None or entry.model == model) and (state is None or entry.state == state):
                out.append(entry.to_json())
        return out


def begin(
    service: Any, job_id: str, model_id: str, source: LiveModel, prompt_tokens: int, paid: bool
) -> Generation | _Unrecorded:
    """Record a generation in `service.generations` (a RecentGenerations), if it has one."""
    record = getattr(service, "generations", None)  # test doubles may lack it
    if not isinstance(record, RecentGenerations):
        return _Unrecorded()
    return record.begin(job_id, model_id, source, prompt_tokens=prompt_tokens, paid=paid)
