"""The endpoint's fair queue: a request waits here for the shard-service jobs of its `n`
generations (`JobTable.new_job`, whose caps are per requester and in total).

Order: first come, first served, except that a request held back only by its own owner's
cap (`max_per_owner` generations at once, per API key or per connection) is passed over, so
one busy key cannot hold up everyone behind it; a request held back by the total cap holds
back all behind it (nobody jumps ahead of it). At most `max_queue` requests wait: one more
is refused at once with 429, and one that waits longer than `timeout_s` gets 503. The queue
is woken whenever one of its requests releases its jobs, and polls every `POLL_S` for jobs
ended by the daemon's other APIs.

A waiting request's position is 1 + the number of requests queued ahead of it (first come,
first served; one of them held back by its own cap may yet be passed). A caller that passes
`on_wait` is told it when it starts to wait and at every wake-up (at least every `POLL_S`),
so that it can tell its client (the endpoint sends it in the stream: daemon.api.openai_sse).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from daemon.serving.openai_wire import OpenAIError
from daemon.shards.jobs import ShardServiceError

POLL_S = 0.25

Waiting = Callable[[int], Awaitable[None]]
"""Told a waiting request's position (1: next in line) while it waits."""


class _Waiter:
    def __init__(self, owner: str, n: int) -> None:
        self.owner = owner
        self.n = n
        self.granted: list[Any] | None = None
        self.event = trio.Event()


class Admission:
    def __init__(
        self,
        service: Any,  # a JobTable: new_job, drop_job, jobs
        *,
        max_queue: int,
        max_per_owner: int,
        timeout_s: float,
        on_queue: Callable[[str, int], None] = lambda model, delta: None,
    ) -> None:
        self.service = service
        self.max_queue = max_queue
        self.max_per_owner = max_per_owner
        self.timeout_s = timeout_s
        self.on_queue = on_queue
        self._waiting: list[_Waiter] = []

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def position(self, waiter: _Waiter) -> int:
        """1 + the requests queued ahead of `waiter`; 0 once it is no longer waiting."""
        try:
            return self._waiting.index(waiter) + 1
        except ValueError:
            return 0

    async def acquire(
        self, owner: str, n: int, model: str, on_wait: Waiting | None = None
    ) -> list[Any]:
        """`n` new jobs for `owner`, after waiting in the queue if need be; `on_wait` is
        awaited with the request's position when it starts to wait and at each wake-up (the
        time it takes counts against the queue's timeout only once it returns)."""
        if n > self.max_per_owner:
            raise OpenAIError(
                429,
                f"n={n} is more than the {self.max_per_owner} generations one client may run "
                "at once on this server",
                param="n",
                code="rate_limit_exceeded",
            )
        waiter = _Waiter(owner, n)
        self._waiting.append(waiter)
        self._grant()  # at once if nobody it must not pass is waiting
        if waiter.granted is not None:
            return waiter.granted
        if len(self._waiting) > self.max_queue:
            self._waiting.remove(waiter)
            raise OpenAIError(
                429,
                f"the server is busy: {len(self._waiting)} requests are already waiting "
                "(the queue is full); retry later",
                code="queue_full",
            )
        self.on_queue(model, 1)
        handed = False
        deadline = trio.current_time() + self.timeout_s
        try:
            while waiter.granted is None:
                if on_wait is not None:
                    await on_wait(self.position(waiter))
                    if waiter.granted is not None:
                        break
                now = trio.current_time()
                if now >= deadline:
                    break
                with trio.move_on_at(min(deadline, now + POLL_S)):
                    await waiter.event.wait()
                waiter.event = trio.Event()
                self._grant()
            if waiter.granted is None:
                raise OpenAIError(
                    503,
                    f"the server is busy: no generation slot came free within "
                    f"{self.timeout_s:g} s; retry later",
                    code="server_busy",
                )
            handed = True
            return waiter.granted
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)
            self.on_queue(model, -1)
            if not handed and waiter.granted:  # cancelled just as it was granted
                for job in waiter.granted:
                    self.service.drop_job(job.id)
                self._grant()

    def released(self) -> None:
        """Some jobs ended: hand the free slots to those waiting."""
        self._grant()

    def _running(self, owner: str) -> int:
        return sum(1 for j in self.service.jobs.values() if j.owner == owner and not j.done)

    def _fits(self, owner: str, n: int) -> bool:
        return self._running(owner) + n <= self.max_per_owner

    def _grant(self) -> None:
        for waiter in list(self._waiting):
            if not self._fits(waiter.owner, waiter.n):
                continue  # held back by its own cap only: others may pass
            jobs = self._try(waiter.owner, waiter.n)
            if jobs is None:
                return  # the total cap: nobody behind it goes first
            waiter.granted = jobs
            self._waiting.remove(waiter)
            waiter.event.set()

    def _try(self, owner: str, n: int) -> list[Any] | None:
        jobs: list[Any] = []
        try:
            for _ in range(n):
                jobs.append(self.service.new_job(owner))
        except ShardServiceError:
            for job in jobs:
                self.service.drop_job(job.id)
            return None
        return jobs
