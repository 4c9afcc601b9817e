"""One generation through the network's shard servers, as the local APIs run it: free, or as
a paid job (`job_id`, daemon.payments.requester) whose receipts are checked step by step and
whose vouchers are sent to the providers before the generation's sessions close. Tokens are
chosen here, at the requester, by a `Sampler` (daemon.serving.sampling); a streaming
consumer gets each one with its logprobs through `on_token`."""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection
from typing import TYPE_CHECKING, Any

import trio

from daemon import errors
from daemon.serving.sampling import Sampled, Sampler, SamplingError, legacy_sampler
from daemon.shards import recent
from daemon.shards.jobs import ShardServiceError

if TYPE_CHECKING:
    from daemon.shards.jobs import Job

log = logging.getLogger(__name__)


async def _paid(service: Any, job: Job, job_id: bytes) -> Any:
    """The paid side of a generation of `job_id`, or None with `job` failed (no chain here,
    or not a job this node deposited for)."""
    from daemon.payments.requester import PaymentError

    if service.requester is None:
        job.fail(
            "paid work needs a chain: no contracts are deployed for this node's [chain] "
            "network (gridmesh chain deploy)",
            errors.FailedPrecondition,
        )
        return None
    try:
        return await service.requester.generation(job_id)
    except PaymentError as exc:
        job.fail(str(exc), errors.FailedPrecondition)
        return None


async def run_generation(
    service: Any,  # the ShardService (not imported: it imports this module)
    job: Job,
    model_id: str,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    relay: bool = False,
    max_price_per_unit: int | None = None,
    job_id: bytes | None = None,
    sampler: Sampler | None = None,
    on_token: Callable[[Sampled], Awaitable[None] | None] | None = None,
    eos_ids: Collection[int] | None = None,
) -> Job:
    """Fill `job` with the tokens of a generation (its error, route, recoveries when done).

    `sampler` chooses each token (without one: greedy at `temperature` 0, else sampled with
    `seed`, as the JSON-RPC and gRPC `generate` always did); `on_token(Sampled)` is called
    (and awaited, when it returns an awaitable: back-pressure from a slow consumer) for each
    token as it is generated. `eos_ids`: the ids that end the generation (default: the
    tokenizer's of a model served here, if any)."""
    if sampler is None:
        try:
            sampler = legacy_sampler(prompt_ids, temperature=temperature, seed=seed)
        except SamplingError as exc:
            job.fail(str(exc), errors.InvalidParams)
            job.done, job.finished = True, time.time()
            return job
    elif temperature or seed is not None:
        raise ValueError("temperature and seed belong to the sampler when one is given")
    from daemon.shards.client import GenerationError, RemoteModel
    from daemon.shards.client import generate as generate_tokens

    await service.ensure_torch()
    announced = service.announced(model_id)
    if not announced:
        job.fail(f"no server announces model {model_id!r}", errors.ModelNotServed)
        job.done = True
        return job
    paid = await _paid(service, job, job_id) if job_id is not None else None
    if job_id is not None and paid is None:
        job.done, job.finished = True, time.time()
        return job
    num_layers = max(item["end"] for item in announced)
    try:
        tokenizer = await service.tokenizer(model_id)
    except ShardServiceError:
        tokenizer = None  # token ids in, token ids out: text is a convenience
    max_length = len(prompt_ids) + max_new_tokens
    max_price = service.default_max_price if max_price_per_unit is None else max_price_per_unit
    if paid is not None:  # receipts over the job's maximum would be refused: route within it
        job_max = paid.max_price_per_unit
        max_price = job_max if max_price is None else min(max_price, job_max)
    # spot checks (daemon.verify), where the service has a verifier: a paid step's receipt
    # waits for its checks, and a wrong one is never acknowledged
    verifier = getattr(service, "verifier", None)
    checks = verifier.generation(paid) if verifier is not None else None
    model = RemoteModel(
        service,
        lambda: service.servers(model_id, need_tokens=max_length),
        model_id=model_id,
        num_layers=num_layers,
        max_length=max_length,
        chained=not relay,
        max_price_per_unit=max_price,
        payments=checks.payments if checks is not None and paid is not None else paid,
        verifier=checks,
    )
    # its live route, failovers and speed, for generation_list and the dashboard
    entry = recent.begin(service, job.id, model_id, model, len(prompt_ids), paid is not None)
    try:
        async with paid.running() if paid is not None else contextlib.nullcontext():
            try:  # on leaving, the paid side sends the vouchers still owed (bounded)
                await model.open()
                job.route = model.route
                eos = eos_ids if eos_ids is not None else tokenizer.eos_id if tokenizer else None
                async for token in generate_tokens(
                    model,
                    prompt_ids,
                    max_new_tokens,
                    eos_id=eos,
                    sampler=sampler,
                    on_token=on_token,
                ):
                    job.tokens.append(token)
                    entry.token()
                    if tokenizer is not None:
                        job.text = tokenizer.decode(job.tokens)
                job.route = model.route
            except GenerationError as exc:
                job.fail(str(exc), errors.generation_failure(exc))
            except SamplingError as exc:  # e.g. a logit_bias id past this model's vocabulary
                job.fail(str(exc), errors.InvalidParams)
            except Exception as exc:  # a background job must never take the daemon down
                log.exception("generation %s failed", job.id)
                job.fail(f"internal error: {type(exc).__name__}: {exc}")
            finally:
                if checks is not None:  # the receipts still held by checks
                    checks.flush()
    finally:
        job.recoveries = model.recoveries
        job.forwarding = "chained" if model.chained else "relayed"
        entry.end(job)  # before the close: the route as it ended
        with trio.CancelScope(shield=True):
            await model.close()
        if paid is not None:
            job.payment = paid.to_json()
        job.done, job.finished = True, time.time()
    return job
