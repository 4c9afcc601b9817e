"""Adversarial providers, for tests and benchmarks only: a shard server that cheats.

`Cheat(server, mode).install()` replaces the server's `forward` (its one compute entry point)
with one that computes the step honestly, so that the session's cache stays what an honest
server's would be, and then, on a drawn `fraction` of steps, returns something else:

- ``corrupt``: random values of the output's scale;
- ``skip``: what the range returns without its layers (the input itself; embedded token ids
  on the first range, the head applied to the input on the last);
- ``replay``: an earlier output of the same shape (any session's);
- ``noise``: the output plus Gaussian noise of `noise` times each row's largest magnitude;
- ``lowprec``: the output rounded to bfloat16 (what a provider computing in half precision
  returns, less the error it would accumulate across the layers).

Nothing in the daemon imports this module; no config or flag reaches it.
"""

from __future__ import annotations

import random
from typing import Any

import torch

MODES = ("corrupt", "skip", "replay", "noise", "lowprec")


class Cheat:
    """Wraps one `ShardServer`'s compute (see the module doc)."""

    def __init__(
        self, server: Any, mode: str, *, fraction: float = 1.0, seed: int = 0, noise: float = 1e-3
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"unknown cheating mode {mode!r}: one of {', '.join(MODES)}")
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be within 0..1")
        self.server = server
        self.mode = mode
        self.fraction = fraction
        self.noise = noise
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.honest = server.forward
        self.steps = 0
        self.cheated = 0
        self.positions: list[int] = []  # where each step it served started
        self._earlier: dict[tuple[int, ...], torch.Tensor] = {}

    def steps_through(self, recoveries: list[dict[str, Any]]) -> int:
        """Its steps up to and including the one caught (the first recovery's): a generation
        that speculates goes on for a step or two while a check runs, and rolls back to the
        step caught (`rolled_back_to`); without speculation it stops there (`steps`)."""
        back = recoveries[0].get("rolled_back_to") if recoveries else None
        if back is None:
            return self.steps
        return sum(1 for p in self.positions if p <= back)

    def install(self) -> Cheat:
        self.server.forward = self.forward
        return self

    async def forward(
        self, session: Any, position: Any, x: torch.Tensor | None, last_only: bool
    ) -> torch.Tensor:
        out = await self.honest(session, position, x, last_only)
        self.steps += 1
        self.positions.append(int(position))
        earlier = self._earlier.get(tuple(out.shape))
        self._earlier[tuple(out.shape)] = out
        if self.rng.random() >= self.fraction:
            return out
        if self.mode == "replay":
            if earlier is None:
                return out
            wrong = earlier
        elif self.mode == "corrupt":
            scale = float(out.float().abs().mean()) or 1.0
            wrong = (torch.randn(out.shape, generator=self.gen) * scale).to(out.dtype)
        elif self.mode == "skip":
            assert x is not None
            wrong = _without_layers(session.block.shard, x, last_only).to(out.dtype)
        elif self.mode == "noise":
            rows = out.float().abs().amax(dim=-1, keepdim=True)
            noise = torch.randn(out.shape, generator=self.gen) * rows * self.noise
            wrong = (out.float() + noise).to(out.dtype)
        else:  # lowprec
            wrong = out.to(torch.bfloat16).to(out.dtype)
        self.cheated += 1
        return wrong


def _without_layers(shard: Any, x: torch.Tensor, last_only: bool) -> torch.Tensor:
    with torch.inference_mode():
        hidden = shard.embed_tokens(x) if shard.embed_tokens is not None else x
        if shard.norm is not None and shard.lm_head is not None:
            hidden = shard.lm_head(shard.norm(hidden)).float()
        return hidden[:, -1:] if last_only else hidden
