"""The token loop: sample each next token from the last logits and step it through the
model (a daemon.shards.client.RemoteModel, or anything with its `step`)."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Protocol

import torch
import trio

from daemon.serving.sampling import Sampled, Sampler, legacy_sampler


class Stepper(Protocol):
    """What the loop asks of a model: run new tokens, get the last position's logits."""

    async def step(self, token_ids: list[int]) -> torch.Tensor: ...


async def generate(
    model: Stepper,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_id: int | Collection[int] | None = None,
    sampler: Sampler | None = None,
    on_token: Callable[[Sampled], Awaitable[None] | None] | None = None,
) -> AsyncIterator[int]:
    """Yield token ids up to and including an eos id (`eos_id`: one or several), chosen here
    by `sampler` (without one: greedy at temperature 0, else seeded by `seed`); replays stay
    in `model.step`, away from it. `on_token` gets each token with its logprobs before it is
    yielded (awaited if it returns an awaitable)."""
    if sampler is None:
        sampler = legacy_sampler(prompt_ids, temperature=temperature, seed=seed)
    elif temperature or seed is not None:
        raise ValueError("temperature and seed belong to the sampler when one is given")
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    logits = await model.step(prompt_ids)
    for _ in range(max_new_tokens):
        if sampler.cheap(len(logits)):
            sampled = sampler(logits)
        else:  # milliseconds over a large vocabulary: off the event loop
            sampled = await trio.to_thread.run_sync(sampler, logits)
        if on_token is not None:
            pending = on_token(sampled)
            if inspect.isawaitable(pending):
                await pending
        yield sampled.token
        if sampled.token in stop:
            return
        logits = await model.step([sampled.token])
