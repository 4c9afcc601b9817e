"""The shard client: generate through a chain of remote shard servers, surviving failures.

A route (scheduler.routing) is a chain of hops covering all layers. Each hop is a session on
one server, over one long-lived stream. Every step goes hop by hop; each hop keeps the inputs
it was sent, chunk by chunk with their positions. When a hop fails (stream reset or EOF,
an error reply, or a step past its deadline), the client re-routes from that hop's first layer
without the failed server, opens fresh sessions, and replays the recorded chunks through the
new hops with the positions they had, so the rebuilt caches are the ones that were lost, and
the generated tokens are exactly those of a run without the failure (Petals replays from
position 0 into a broken cache; #587).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import trio

from daemon.shards import wire
from daemon.shards.server import SHARD_PROTOCOL
from p2p.network import NetworkError, Stream
from scheduler.routing import NoRouteError, Server, find_route

log = logging.getLogger(__name__)


class StreamOpener(Protocol):
    async def open_stream(self, peer_id: str, protocol: str) -> Stream: ...


# server error codes that no other server would answer differently
REQUEST_ERRORS = {"bad_length", "too_long", "bad_input", "bad_position", "bad_range", "model"}


class HopFailed(Exception):
    def __init__(self, peer_id: str, reason: str) -> None:
        super().__init__(f"{peer_id}: {reason}")
        self.peer_id = peer_id
        self.reason = reason


class GenerationError(RuntimeError):
    pass


@dataclass
class Hop:
    peer_id: str
    start: int
    end: int
    stream: Stream
    session: str
    chunks: list[tuple[int, torch.Tensor]] = field(default_factory=list)

    async def call(
        self, header: dict[str, Any], tensor: torch.Tensor | None, timeout_s: float
    ) -> tuple[dict[str, Any], torch.Tensor | None]:
        try:
            with trio.fail_after(timeout_s):
                await self.stream.send(wire.encode(header, tensor))
                reply, out = wire.decode(await self.stream.receive())
        except trio.TooSlowError:
            raise HopFailed(self.peer_id, f"no answer within {timeout_s:.1f} s") from None
        except (NetworkError, wire.WireError) as exc:
            raise HopFailed(self.peer_id, str(exc)) from None
        if reply.get("op") == "error":
            message = f"{reply.get('code')}: {reply.get('message')}"
            if (
                reply.get("code") in REQUEST_ERRORS
            ):  # our request is wrong: another server won't help
                raise GenerationError(f"{self.peer_id} refused: {message}")
            raise HopFailed(self.peer_id, message)
        return reply, out


# () -> servers currently announced for the model (with RTTs); refreshed on every re-route
ServerSource = Callable[[], Awaitable[list[Server]]]


class RemoteModel:
    """A generation session spanning several shard servers."""

    def __init__(
        self,
        opener: StreamOpener,
        servers: ServerSource,
        *,
        model_id: str,
        num_layers: int,
        max_length: int,
        step_timeout_s: float = 10.0,
        max_recoveries: int = 8,
    ) -> None:
        self._opener = opener
        self._servers = servers
        self.model_id = model_id
        self.num_layers = num_layers
        self.max_length = max_length
        self.step_timeout_s = step_timeout_s
        self.max_recoveries = max_recoveries
        self.hops: list[Hop] = []
        self.failed: set[str] = set()
        self.length = 0
        self.recoveries: list[dict[str, Any]] = []

    @property
    def route(self) -> list[dict[str, Any]]:
        return [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in self.hops]

    async def _open_hops(self, start: int) -> list[Hop]:
        servers = await self._servers()
        spans = find_route(servers, self.num_layers, start=start, exclude=self.failed)
        hops = []
        for span in spans:
            try:
                stream = await self._opener.open_stream(span.peer_id, SHARD_PROTOCOL)
            except NetworkError as exc:
                raise HopFailed(span.peer_id, str(exc)) from None
            hop = Hop(span.peer_id, span.start, span.end, stream, session="")
            reply, _ = await hop.call(
                {
                    "op": "open",
                    "model": self.model_id,
                    "start": span.start,
                    "end": span.end,
                    "max_length": self.max_length,
                },
                None,
                self.step_timeout_s,
            )
            hop.session = str(reply["session"])
            hops.append(hop)
        return hops

    async def open(self) -> None:
        async def ensure_open() -> None:
            if not self.hops:
                self.hops = await self._open_hops(0)

        await self._with_recovery(ensure_open)

    def _tokens(self, hop: Hop) -> int:
        return sum(chunk.shape[1] for position, chunk in hop.chunks if position < self.length)

    async def _forward(self, hop: Hop, position: int, x: torch.Tensor, last: bool) -> torch.Tensor:
        header = {"op": "forward", "session": hop.session, "position": position, "last_only": last}
        _, out = await hop.call(header, x, self.step_timeout_s)
        if out is None:
            raise HopFailed(hop.peer_id, "a forward reply without a tensor")
        hop.chunks.append((position, x))
        return out

    async def _recover(self, failed: HopFailed, step: _Step | None) -> None:
        """Replace the failed hop and everything after it; replay their recorded inputs."""
        index = next((i for i, h in enumerate(self.hops) if h.peer_id == failed.peer_id), None)
        if index is None:  # failed while opening: nothing to replay yet
            index = len(self.hops)
        # the replay source must hold every earlier position; walk back to such a hop
        while index > 0 and (
            index == len(self.hops) or self._tokens(self.hops[index]) < self.length
        ):
            index -= 1
        old = self.hops[index] if index < len(self.hops) else None
        replay = [(p, c) for p, c in old.chunks if p < self.length] if old else []
        current = next((c for p, c in old.chunks if p >= self.length), None) if old else None
        start = old.start if old else 0
        for hop in self.hops[index:]:
            await hop.stream.close()
        self.hops = self.hops[:index] + await self._open_hops(start)
        for position, chunk in replay:
            x = chunk
            for i in range(index, len(self.hops)):
                x = await self._forward(self.hops[i], position, x, i == len(self.hops) - 1)
        if step is not None and step.next_hop > index:
            # hops index.. are new: the current chunk goes through them again
            step.next_hop = index
            step.x = current if current is not None else step.x

    async def _with_recovery(
        self, action: Callable[[], Awaitable[Any]], step: _Step | None = None
    ) -> Any:
        failure: HopFailed | None = None
        while True:
            try:
                if failure is not None:
                    started = time.monotonic()
                    await self._recover(failure, step)
                    self.recoveries.append(
                        {
                            "peer_id": failure.peer_id,
                            "reason": failure.reason,
                            "seconds": round(time.monotonic() - started, 3),
                        }
                    )
                    failure = None
                return await action()
            except HopFailed as exc:
                if len(self.recoveries) >= self.max_recoveries:
                    raise GenerationError(
                        f"giving up after {self.max_recoveries} recoveries: {exc}"
                    ) from exc
                log.warning("hop %s failed (%s); re-routing", exc.peer_id, exc.reason)
                self.failed.add(exc.peer_id)
                failure = exc
            except NoRouteError as exc:
                raise GenerationError(str(exc)) from None

    async def step(self, token_ids: list[int]) -> torch.Tensor:
        """Run new tokens through every hop; returns the logits of the last position."""
        if not token_ids:
            raise GenerationError("a step needs at least one token")
        if self.length + len(token_ids) > self.max_length:
            raise GenerationError(f"{self.length + len(token_ids)} tokens exceed {self.max_length}")
        step = _Step(self.length, 0, torch.tensor([token_ids], dtype=torch.int64))

        async def run() -> torch.Tensor:
            while step.next_hop < len(self.hops):
                last = step.next_hop == len(self.hops) - 1
                hop = self.hops[step.next_hop]
                step.x = await self._forward(hop, step.position, step.x, last)
                step.next_hop += 1
            return step.x

        logits = await self._with_recovery(run, step)
        self.length += len(token_ids)
        return logits[0, -1].float()

    async def close(self) -> None:
        for hop in self.hops:
            with trio.move_on_after(1):
                await hop.stream.close()
        self.hops = []


@dataclass
class _Step:
    """The step in flight: which hop is next and what it gets (survives re-routing)."""

    position: int
    next_hop: int
    x: torch.Tensor


async def generate(
    model: RemoteModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    eos_id: int | None = None,
) -> AsyncIterator[int]:
    """Yield generated token ids one by one (greedy, or seeded sampling)."""
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    logits = await model.step(prompt_ids)
    for _ in range(max_new_tokens):
        if temperature <= 0:
            token = int(torch.argmax(logits))
        else:
            probs = torch.softmax(logits / temperature, dim=-1)
            token = int(torch.multinomial(probs, 1, generator=generator))
        yield token
        if token == eos_id:
            return
        logits = await model.step([token])
