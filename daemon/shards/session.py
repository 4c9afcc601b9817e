"""A session of the shard server (`daemon.shards.server`): what it holds, and the checks a
step's input must pass against it before any compute."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from daemon.shards import wire
from daemon.shards.blocks import ServedBlock
from daemon.shards.model import KVCache
from daemon.shards.push import Outbox

MAX_STEP_TOKENS = 4096


class ShardError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class Session:
    id: str
    block: ServedBlock
    cache: KVCache
    max_length: int
    owner: Outbox
    """The stream that opened the session: results and errors of chained steps go there."""
    peer: str  # the owner's peer id
    link: str  # the token a push into this session must show (given to the owner only)
    prev: str | None = None  # the only peer that may push into this session
    next: wire.NextHop | None = None  # where chained steps push their output
    stepping: bool = False  # a chained step of this session is computing or pushing
    computing: bool = False  # a step of this session is queued or computing (any path)
    decoder: Any = None  # a StaticDecoder, made at the first one-token step if used
    paid: Any = None  # a paid session's receipts (daemon.payments.provider.PaidSession)
    depth: int = 1  # hops of the session's whole chain (its opener says; 1 if it does not)
    length: int = 0
    last_used: float = field(default_factory=time.monotonic)

    def advance(self, positions: int) -> None:
        """The session's cache now holds `positions` more (a step ran)."""
        self.length += positions
        self.last_used = time.monotonic()


def input_bytes_per_position(block: ServedBlock) -> int:
    """Bytes of one position of a step's input: a token id, or a hidden state."""
    if block.start == 0:
        return wire.element_size(torch.int64)
    return block.config.hidden_size * wire.element_size(block.dtype)


def check_step(session: Session, position: Any, x: torch.Tensor | None) -> None:
    """Refuse (ShardError) a step this session cannot take: no tensor, a wrong dtype or
    shape, another position than the session's next, more positions than it has left."""
    block = session.block
    if x is None:
        raise ShardError("bad_input", "forward needs a tensor")
    if position != session.length:
        raise ShardError(
            "bad_position", f"expected position {session.length}, got {str(position)[:20]}"
        )
    if x.dim() < 2 or not 0 < x.shape[1] <= MAX_STEP_TOKENS:
        raise ShardError("bad_input", f"a step carries 1..{MAX_STEP_TOKENS} positions")
    if block.start == 0:
        if x.dtype != torch.int64 or x.dim() != 2 or x.shape[0] != 1:
            raise ShardError("bad_input", "the first shard takes int64 token ids [1, seq]")
        if int(x.min()) < 0 or int(x.max()) >= block.config.vocab_size:
            raise ShardError("bad_input", "token id out of the vocabulary")
    else:
        hidden = block.config.hidden_size
        if x.dtype != block.dtype or x.dim() != 3 or x.shape[0] != 1 or x.shape[2] != hidden:
            raise ShardError(
                "bad_input",
                f"expected {wire.NAMES[block.dtype]} hidden states [1, seq, {hidden}]",
            )
    seq = x.shape[1]
    if session.length + seq > session.max_length:
        raise ShardError(
            "too_long",
            f"{session.length + seq} positions exceed the session's {session.max_length}",
        )
