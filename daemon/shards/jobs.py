"""Generations that the local APIs run in the background and clients poll: their caps and
their lifetime (`generate` with stream=true, then `generate_poll`)."""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from daemon import errors

# Generations running at once, all requesters together: at most half a shard server's 64
# sessions, the share one peer (this daemon) may hold there, so our own load is refused by
# us as "busy" and never surfaces as a shard server refusing it (or as "no route").
MAX_JOBS = 32
MAX_JOBS_PER_REQUESTER = 8  # running at once per requester (gRPC connection, RPC client)
MAX_FINISHED_JOBS = 64  # finished but never read: beyond this the oldest is dropped
JOB_TTL_S = 600.0  # a finished job nobody reads is dropped this long after it finished


class ShardServiceError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Job:
    """A generation that clients poll.

    Only running jobs count against the caps; a finished one is dropped as soon as its
    final state has been read (`read_job`) or it is cancelled, else after `JOB_TTL_S`.
    """

    id: str
    owner: str = ""  # who asked: caps are per owner; "" counts only against the total
    # whoever runs the job runs it inside this scope, so that `cancel_job` can stop it
    scope: trio.CancelScope = field(default_factory=trio.CancelScope, repr=False)
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    done: bool = False
    error: str | None = None
    # what `error` is, as the local APIs report it (their codes and statuses: daemon.errors)
    error_kind: type[errors.GridmeshError] = errors.ShardFailure
    route: list[dict[str, Any]] = field(default_factory=list)
    forwarding: str = "chained"  # or "relayed": how activations went from hop to hop
    recoveries: list[dict[str, Any]] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    finished: float | None = None
    payment: dict[str, Any] | None = None  # a paid job's receipts and vouchers (to_json)

    def fail(self, message: str, kind: type[errors.GridmeshError] = errors.ShardFailure) -> None:
        """Record why the job failed, and as which kind of error it is reported."""
        self.error, self.error_kind = message, kind

    def failure(self) -> errors.GridmeshError:
        """The job's error as the APIs raise it, with the job's state as its data."""
        return self.error_kind(self.error or "", self.to_json())

    def to_json(self, since: int = 0) -> dict[str, Any]:
        """What the APIs report: tokens from index `since` on, and the state so far."""
        return {
            "job": self.id,
            "tokens": self.tokens[max(0, since) :],
            "n_tokens": len(self.tokens),
            "text": self.text,
            "done": self.done,
            "error": self.error,
            "error_code": self.error_kind.code if self.error is not None else None,
            "route": self.route,
            "forwarding": self.forwarding,
            "recoveries": self.recoveries,
            "seconds": round(self.finished - self.started, 3) if self.finished else None,
            **({"payment": self.payment} if self.payment is not None else {}),
        }


class JobTable:
    """The jobs of one daemon, keyed by id, with the caps of `new_job`."""

    def __init__(self) -> None:
        self.jobs: dict[str, Job] = {}

    def new_job(self, owner: str = "") -> Job:
        """Track a new generation for `owner`; ShardServiceError("busy") when at a cap."""
        self._reap_jobs()
        running = [j for j in self.jobs.values() if not j.done]
        if len(running) >= MAX_JOBS:
            raise ShardServiceError("busy", f"{MAX_JOBS} generations are already running")
        if owner and sum(j.owner == owner for j in running) >= MAX_JOBS_PER_REQUESTER:
            raise ShardServiceError(
                "busy", f"this client already runs {MAX_JOBS_PER_REQUESTER} generations"
            )
        job = Job(secrets.token_hex(16), owner=owner)
        self.jobs[job.id] = job
        return job

    def read_job(self, job_id: str, since: int = 0) -> dict[str, Any] | None:
        """The job's state (None if unknown); a finished job is dropped once read."""
        job = self.jobs.get(job_id)
        if job is None:
            return None
        if job.done:
            del self.jobs[job_id]
        return job.to_json(since)

    def cancel_job(self, job_id: str) -> Job | None:
        """Stop a job and forget it; returns it, or None if unknown."""
        job = self.jobs.pop(job_id, None)
        if job is not None:
            job.scope.cancel()
        return job

    def drop_job(self, job_id: str) -> None:
        """Forget a job whose result was handed over some other way."""
        self.jobs.pop(job_id, None)

    def _reap_jobs(self) -> None:
        now = time.time()
        finished = sorted(
            (j for j in self.jobs.values() if j.done), key=lambda j: j.finished or j.started
        )
        for i, job in enumerate(finished):
            expired = now - (job.finished or job.started) > JOB_TTL_S
            if expired or len(finished) - i > MAX_FINISHED_JOBS:
                del self.jobs[job.id]
