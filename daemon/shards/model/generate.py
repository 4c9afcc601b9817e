"""The single-process reference generation loop over a chain of shards."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch

from daemon.serving.sampling import Sampled, Sampler, legacy_sampler
from daemon.shards.model.config import ModelError
from daemon.shards.model.decode import StaticDecoder
from daemon.shards.model.shard import LlamaShard


def _check_chain(shards: Sequence[LlamaShard]) -> None:
    if not shards:
        raise ModelError("no shards")
    if not shards[0].has_embedding or not shards[-1].has_head:
        raise ModelError("the chain must start at layer 0 and end at the last layer")
    for left, right in zip(shards, shards[1:], strict=False):
        if left.end != right.start:
            raise ModelError(
                f"shards [{left.start}, {left.end}) and [{right.start}, {right.end}) "
                "are not contiguous"
            )


def greedy_generate(
    shards: Sequence[LlamaShard],
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_id: int | Collection[int] | None = None,
    static: bool = False,
    sampler: Sampler | None = None,
    on_token: Callable[[Sampled], None] | None = None,
) -> list[int]:
    """The single-process reference loop over a chain of shards: prefill, then decode one
    token at a time with KV caches. Each token is chosen by `sampler`
    (daemon.serving.sampling), or without one greedily at temperature 0, else sampled from a
    CPU `torch.Generator` seeded by `seed`. Returns the new tokens (stopping after an eos id:
    `eos_id` is one id or several, as `eos_token_id` in a generation_config.json);
    `on_token` gets each one with its logprobs. `static`: decode with fixed-shape steps
    (`daemon.shards.model.decode`), CUDA graphs on a GPU."""
    _check_chain(shards)
    stop = stop_ids(eos_id)
    if not prompt_ids:
        raise ModelError("empty prompt")
    if max_new_tokens < 0 or temperature < 0:
        raise ModelError("max_new_tokens and temperature must be >= 0")
    if sampler is None:
        sampler = legacy_sampler(prompt_ids, temperature=temperature, seed=seed)
    elif temperature or seed is not None:
        raise ModelError("temperature and seed belong to the sampler when one is given")
    max_len = len(prompt_ids) + max(max_new_tokens, 1)
    caches = [shard.new_cache(batch=1, max_len=max_len) for shard in shards]
    device = shards[0].device
    tokens = torch.tensor([list(prompt_ids)], dtype=torch.int64, device=device)
    out: list[int] = []
    decoders = None
    if static:
        decoders = [StaticDecoder(s, c) for s, c in zip(shards, caches, strict=True)]
    for step in range(max_new_tokens):
        hidden = tokens
        if decoders is not None and step > 0:
            for decoder in decoders:
                hidden = decoder.step(hidden)
        else:
            for shard, cache in zip(shards, caches, strict=True):
                hidden = shard(hidden, cache)
        sampled = sampler(hidden[0, -1])
        if on_token is not None:
            on_token(sampled)
        token = sampled.token
        out.append(token)
        if token in stop:
            break
        tokens = torch.tensor([[token]], dtype=torch.int64, device=device)
    return out


def stop_ids(eos_id: int | Collection[int] | None) -> frozenset[int]:
    """The token ids that end a generation: none, one, or all of a collection (Llama 3 has
    two)."""
    if eos_id is None:
        return frozenset()
    if isinstance(eos_id, int):
        return frozenset((eos_id,))
    return frozenset(int(i) for i in eos_id)
