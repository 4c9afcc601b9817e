"""The token loop: sample each next token from the last logits and step it through the
model (a daemon.shards.client.RemoteModel, or anything with its `step`).

Speculation (a model whose steps' spot checks may run behind it: `speculating`): the loop does
not wait for a step's checks; it draws the next token and steps on, and holds every token
drawn from a step not yet settled. A token goes out (`on_token`, the yield) only once every
step it depends on (its own and every earlier one) is settled: its checks passed. A check
that fails rolls the model back to its step (`settle`: the step runs again on an honest
route); the tokens held from that step on are dropped and drawn again from the new logits,
with the sampler as it was before that step (its random state, its penalties' counts), so
that the output is exactly the one a generation that waited at every check would give.
Why: waiting for a check (a replica's pass and its protocol, milliseconds) after a checked
step made the generation miss its batch on the route's servers, about a pass more per check.
"""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Collection
from typing import Any, Protocol

import torch
import trio

from daemon.serving.sampling import Sampled, Sampler, legacy_sampler


class Stepper(Protocol):
    """What the loop asks of a model: run new tokens, get the last position's logits."""

    async def step(self, token_ids: list[int]) -> torch.Tensor: ...


class Speculator(Protocol):
    """A model whose steps may be checked behind the loop (daemon.shards.client.RemoteModel)."""

    length: int
    speculating: bool
    settled_length: int

    async def step(self, token_ids: list[int], *, speculative: bool = False) -> torch.Tensor: ...

    def unsettled(self, position: int) -> bool: ...

    async def settle(self, *, wait: bool) -> tuple[int, torch.Tensor] | None: ...


# tokens drawn ahead of the checks at most: past it the loop waits for them (a replica that
# is slow to answer does not make the loop compute far ahead of what it may let out)
MAX_AHEAD = 32


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
    if getattr(model, "speculating", False):
        async for token in _speculate(model, prompt_ids, max_new_tokens, stop, sampler, on_token):
            yield token
        return
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


async def _speculate(
    model: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    stop: set[int],
    sampler: Sampler,
    on_token: Callable[[Sampled], Awaitable[None] | None] | None,
) -> AsyncIterator[int]:
    """`generate` for a model that speculates (`Speculator`; see the module doc)."""
    spec: Speculator = model
    position = spec.length  # where the step whose logits are at hand started
    logits = await spec.step(prompt_ids, speculative=True)
    held: list[tuple[int, Sampled]] = []  # drawn, not let out: (its step's position, token)
    saved: dict[int, dict[str, Any]] = {}  # the sampler before drawing from an unsettled step
    out = 0  # tokens let out
    while True:
        if spec.unsettled(position):
            saved[position] = _save(sampler)
        if sampler.cheap(len(logits)):
            sampled = sampler(logits)
        else:  # milliseconds over a large vocabulary: off the event loop
            sampled = await trio.to_thread.run_sync(sampler, logits)
        held.append((position, sampled))
        last = sampled.token in stop or out + len(held) >= max_new_tokens
        back = await spec.settle(wait=last or len(held) >= MAX_AHEAD)
        if back is not None:  # a step found wrong: draw again from its honest logits
            position, logits = back
            held = [(p, s) for p, s in held if p < position]
            _restore(sampler, saved[position])
            saved = {p: state for p, state in saved.items() if p < position}
            continue
        settled = spec.settled_length
        while held and held[0][0] < settled:
            _, token = held.pop(0)
            if on_token is not None:
                pending = on_token(token)
                if inspect.isawaitable(pending):
                    await pending
            out += 1
            yield token.token
        saved = {p: state for p, state in saved.items() if p >= settled}
        if last and not held:
            if sampled.token not in stop:  # the step after the last token, as the loop
                await spec.step([sampled.token])  # without speculation takes (everything
            return  # is settled: it waits for its checks)
        position = spec.length
        logits = await spec.step([sampled.token], speculative=True)


def _save(sampler: Sampler) -> dict[str, Any]:
    """The sampler's state (its random generator's, its lists and tensors copied): what a
    roll-back restores, so that the tokens drawn again are those an unspeculated run draws."""
    state: dict[str, Any] = {}
    for name, value in vars(sampler).items():
        if isinstance(value, torch.Generator):
            state[name] = value.get_state()
        elif isinstance(value, torch.Tensor):
            state[name] = value.clone()
        elif isinstance(value, list | dict | set):
            state[name] = value.copy()
        else:
            state[name] = value
    return state


def _restore(sampler: Sampler, state: dict[str, Any]) -> None:
    for name, value in state.items():
        current = getattr(sampler, name, None)
        if isinstance(current, torch.Generator):
            current.set_state(value)
        elif isinstance(value, torch.Tensor):
            setattr(sampler, name, value.clone())
        elif isinstance(value, list | dict | set):
            setattr(sampler, name, value.copy())
        else:
            setattr(sampler, name, value)
