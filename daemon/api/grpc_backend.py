"""What the gRPC inference API serves: the `InferenceBackend` protocol (the trio-side
operations the servicer calls) and `ShardBackend`, the daemon's own, over its block shards.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from daemon import errors
from daemon.api.generation import paid_job_id
from daemon.errors import status_of
from daemon.shards.jobs import ShardServiceError

if TYPE_CHECKING:
    from daemon.shards.service import ShardService

log = logging.getLogger(__name__)


class InferenceBackend(Protocol):
    """The trio-side operations the servicer needs. Every method runs on the trio thread.

    Methods raise a `daemon.errors.GridmeshError` kind for failures a client should see
    with a specific status (the table in `daemon.errors` decides which); any other
    exception is logged and answered with INTERNAL.
    """

    async def start_generation(
        self,
        model: str,
        prompt: str | None,
        token_ids: list[int] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        owner: str = "",
        job_id: str | None = None,
    ) -> str:
        """Start generating (exactly one of `prompt` and `token_ids` is given); the job id.
        `owner` names the requester, for per-requester caps; `job_id` makes it a paid job."""
        ...

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        """The job's state, shaped like JSON-RPC `generate_poll`: `tokens` (from index
        `since` on), `text` (all decoded so far), `done`, `error` (str or None), `route`
        ([{peer_id, start, end}]), `recoveries` (a list or a count), `n_tokens`, `seconds`;
        optionally `error_code` (the `code` of a `daemon.errors` kind; a `ShardFailure`,
        ABORTED, when absent). A finished job may be forgotten once its final state was
        returned."""
        ...

    def cancel(self, job_id: str) -> None:
        """Stop a generation nobody reads any more (its client hung up), and forget it."""
        ...

    async def forward(self, model: str, token_ids: list[int]) -> tuple[Sequence[float], int]:
        """One step through the whole chain in a fresh session: the last position's logits
        and the greedy next token."""
        ...


def _job_error_code(kind: type[errors.GridmeshError]) -> str:
    """The gRPC status (lowercase name) a generation that failed as `kind` ends with."""
    return status_of(kind).grpc.lower()


class ShardBackend:
    """`InferenceBackend` over the daemon's `ShardService`: generation through the chain of
    block shards the network announces."""

    def __init__(self, service: ShardService) -> None:
        self.service = service

    def _require_announced(self, model: str) -> list[dict[str, Any]]:
        announced = self.service.announced(model)
        if not announced:
            raise errors.ModelNotServed(f"no server announces model {model!r}")
        return announced

    async def _encode(self, model: str, prompt: str) -> list[int]:
        await self.service.ensure_torch()
        try:
            return await self.service.encode_prompt(model, prompt)
        except ShardServiceError as exc:
            raise errors.from_encoding(exc) from None

    async def start_generation(
        self,
        model: str,
        prompt: str | None,
        token_ids: list[int] | None,
        max_tokens: int,
        temperature: float,
        seed: int | None,
        owner: str = "",
        job_id: str | None = None,
    ) -> str:
        self._require_announced(model)
        ids = token_ids if token_ids is not None else await self._encode(model, prompt or "")
        try:
            job = self.service.new_job(owner)
        except ShardServiceError as exc:
            raise errors.Busy(f"busy: {exc}") from None

        async def run() -> None:
            try:
                with job.scope:
                    await self.service.generate(
                        job,
                        model,
                        ids,
                        max_tokens,
                        temperature=temperature,
                        seed=seed,
                        **paid_job_id(job_id),
                    )
                if job.scope.cancelled_caught and job.error is None:
                    job.fail("cancelled", errors.Cancelled)
            except Exception as exc:  # one generation must never take the daemon down
                log.exception("generation %s failed", job.id)
                job.fail(f"internal error: {type(exc).__name__}: {exc}")
            finally:
                if not job.done:  # cancelled before generate() took charge of the job
                    if job.error is None:
                        job.fail("cancelled", errors.Cancelled)
                    job.done, job.finished = True, time.time()

        self.service.spawn(run)
        return job.id

    def poll(self, job_id: str, since: int) -> dict[str, Any]:
        state = self.service.read_job(job_id, since)  # a finished job is dropped once read
        if state is None:
            raise errors.NotFound(f"unknown job {job_id[:40]!r}")
        return state  # its error_code: the job's error kind (Job.fail)

    def cancel(self, job_id: str) -> None:
        self.service.cancel_job(job_id)

    async def forward(self, model: str, token_ids: list[int]) -> tuple[Sequence[float], int]:
        announced = self._require_announced(model)
        await self.service.ensure_torch()
        from daemon.shards.client import GenerationError, RemoteModel

        remote = RemoteModel(
            self.service,
            lambda: self.service.servers(model),
            model_id=model,
            num_layers=max(item["end"] for item in announced),
            max_length=len(token_ids),
        )
        try:
            await remote.open()
            logits = await remote.step(token_ids)
        except GenerationError as exc:
            raise errors.from_generation(exc) from None
        finally:
            with trio.CancelScope(shield=True):
                await remote.close()
        return logits.tolist(), int(logits.argmax())


def forward_error_code(exc: Exception) -> str:
    """The gRPC status (lowercase name) of a failed `Forward` step: busy servers are
    RESOURCE_EXHAUSTED (come back later), a refused request INVALID_ARGUMENT, anything else
    UNAVAILABLE (`errors.from_generation`)."""
    return status_of(errors.from_generation(exc)).grpc.lower()
