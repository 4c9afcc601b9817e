"""The shard client: generate through a chain of remote shard servers, surviving failures.

A route (scheduler.routing) is a chain of hops covering all layers. Each hop is a session on
one server, over one long-lived stream. A step is either chained (default: the client sends
the first hop its input and the rest of the route; each server pushes its output to the next
and the last one answers the client, see daemon.shards.server) or relayed (the client sends
each hop its input and gets the output back). Either way the client records every hop's
inputs, chunk by chunk with their positions: in a chained step each server sends the client
a copy of what it pushed on.

When a hop fails (stream reset or EOF, an error reply, or no progress within the step
timeout), the client re-routes from that hop's first layer without the failed server, opens
fresh sessions, and replays the recorded chunks through the new hops with the positions they
had, so the rebuilt caches are the ones that were lost, and the generated tokens are exactly
those of a run without the failure (Petals replays from position 0 into a broken cache;
#587). A server that cannot push to the next one (servers that cannot reach each other, e.g.
behind NAT) makes the client relay the rest of the generation itself.

A server at one of its caps (sessions, sessions of one peer, KV cache) answers an open with
`busy`; the client routes around it like a failed hop. When the servers that answered busy
are all that stands between it and a route, it raises ServersBusyError ("busy: ..."), which
the APIs report as busy (JSON-RPC -32031, gRPC RESOURCE_EXHAUSTED: retry later), not as a
missing route.

One hop and its errors are in daemon.shards.hops, the token loop (`generate`) in
daemon.shards.token_loop; both are importable from here too.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import torch
import trio

from daemon.shards import SHARD_PROTOCOL, wire
from daemon.shards.hops import (  # noqa: F401 - RequestRefused: re-exported
    GenerationError,
    Hop,
    HopFailed,
    RequestRefused,
    ServersBusyError,
    close_all,
)
from daemon.shards.token_loop import generate  # noqa: F401 - re-exported: the token loop
from p2p.network import NetworkError, Stream, StreamOpener
from scheduler.routing import NoRouteError, Server, find_route

log = logging.getLogger(__name__)


class _BusyNoRoute(NoRouteError):
    """No route avoids the failed servers, but one would if those that answered busy were
    used: they are what stands in the way."""

    def __init__(self, exc: NoRouteError, busy: list[str]) -> None:
        super().__init__(
            str(exc),
            missing=exc.missing,
            first_missing=exc.first_missing,
            considered=exc.considered,
            skipped=exc.skipped,
            priced_out=exc.priced_out,
        )
        self.busy = busy


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
        chained: bool = True,
        max_price_per_unit: int | None = None,
        payments: Any = None,
        verifier: Any = None,
    ) -> None:
        """`step_timeout_s`: how long a step may make no progress before its hop counts as
        failed. `chained`: servers push to each other (else the client relays every hop).
        `max_price_per_unit`: routes (and re-routes) use no server over it (None: any).
        `payments`: a paid job's generation (`daemon.payments.requester.PaidGeneration`):
        sessions are opened for its job and every step's receipt must pass its check, else
        the hop failed (None: free work). `verifier`: spot checks of the steps
        (`daemon.verify.verifier.GenerationChecks`; None: none), told when a step starts and
        when each hop's input is known (its checks run beside the step) and, at the step's
        end, asked for the verdicts (a hop found wrong raises HopFailed there), or, in a
        speculative step, told that it ended: its verdicts come in later (`settle`), and a
        step found wrong is rolled back to."""
        self._opener = opener
        self._servers = servers
        self.model_id = model_id
        self.num_layers = num_layers
        self.max_length = max_length
        self.step_timeout_s = step_timeout_s
        self.max_recoveries = max_recoveries
        self.hops: list[Hop] = []
        self.failed: set[str] = set()
        self.busy: set[str] = set()  # failed peers that answered busy (alive, but full)
        self.chained = chained
        self.max_price_per_unit = max_price_per_unit
        self.payments = payments
        self.verifier = verifier
        self.length = 0
        self.recoveries: list[dict[str, Any]] = []
        self._step_numbers = itertools.count(1)
        # peers whose stream broke: when each broke, and which were given their one retry
        self._broke_at: dict[str, float] = {}
        self._retried: set[str] = set()
        self._why_failed: dict[str, str] = {}  # each failed peer's last failure, for errors
        self._resume_at: int | None = None  # the hop a failed re-route started from
        # speculative steps whose checks are still judged, oldest first (see `settle`)
        self._unsettled: list[_Unsettled] = []
        self._replaying = False  # a roll-back replays its prefix: no checks are drawn
        self.ahead_step = False  # the step running does not wait for its checks

    @property
    def route(self) -> list[dict[str, Any]]:
        return [{"peer_id": h.peer_id, "start": h.start, "end": h.end} for h in self.hops]

    async def _open_hops(self, start: int, prev: Hop | None = None) -> list[Hop]:
        """Sessions on a route from layer `start`, after hop `prev` (None: from the client);
        on failure the ones opened are closed.

        They open from the last to the first, so that each is opened knowing where its output
        goes (the next hop's session and link token) and who may push into it (the previous
        hop's peer); `prev` is then re-pointed at the first of them."""
        servers = await self._servers()
        if self.verifier is not None:  # without excluded providers, reputation breaks ties
            servers = self.verifier.routable(servers)
        price = self.max_price_per_unit
        try:
            spans = find_route(
                servers, self.num_layers, start=start, exclude=self.failed, max_price_per_unit=price
            )
        except NoRouteError as exc:
            busy = self.failed & self.busy
            if busy:
                try:  # would the servers that answered busy make a route?
                    find_route(
                        servers,
                        self.num_layers,
                        start=start,
                        exclude=self.failed - busy,
                        max_price_per_unit=price,
                    )
                except NoRouteError:
                    raise exc from None  # no: a route is missing, busy or not
                raise _BusyNoRoute(exc, sorted(busy)) from None
            raise
        hops: list[Hop] = []
        try:
            for i in reversed(range(len(spans))):
                span = spans[i]
                stream = await self._dial(span.peer_id)
                hop = Hop(span.peer_id, span.start, span.end, stream, session="")
                hops.insert(0, hop)
                before = spans[i - 1].peer_id if i else (prev.peer_id if prev else None)
                # the whole chain's hops: those kept before `prev` and the new ones
                kept = next((j + 1 for j, h in enumerate(self.hops) if h is prev), 0)
                reply, _ = await hop.call(
                    wire.Open(
                        model=self.model_id,
                        start=span.start,
                        end=span.end,
                        max_length=self.max_length,
                        prev=before,
                        next=hops[1].next_hop if len(hops) > 1 else None,
                        job=self.payments.job_id if self.payments is not None else None,
                        depth=min(wire.MAX_DEPTH, kept + len(spans)),
                    ),
                    None,
                    self.step_timeout_s,
                )
                if not isinstance(reply, wire.Opened):
                    raise HopFailed(span.peer_id, f"{type(reply).__name__} answers an open")
                hop.session, hop.link = reply.session, reply.link
                if self.payments is not None:
                    why = await self.payments.opened(
                        hop.peer_id, hop.session, self.model_id, hop.start, hop.end
                    )
                    if why is not None:
                        raise HopFailed(hop.peer_id, why)
            if prev is not None and hops:
                reply, _ = await prev.call(
                    wire.Link(session=prev.session, next=hops[0].next_hop),
                    None,
                    self.step_timeout_s,
                )
                if not isinstance(reply, wire.Linked):
                    raise HopFailed(prev.peer_id, f"{type(reply).__name__} answers a link")
        except BaseException:
            await close_all(hops)
            raise
        return hops

    async def _dial(self, peer_id: str) -> Stream:
        """A stream to a hop. A peer whose stream broke and that is being given its one
        more chance is dialled again until the step deadline after it broke."""
        broke = self._broke_at.get(peer_id)
        deadline = broke + self.step_timeout_s if broke is not None else -math.inf
        delay = 0.05
        while True:
            limit = self.step_timeout_s
            if broke is not None:  # a retried peer's dials end at its deadline too
                limit = max(0.05, min(limit, deadline - trio.current_time()))
            try:
                with trio.fail_after(limit):
                    stream = await self._opener.open_stream(peer_id, SHARD_PROTOCOL)
                self._broke_at.pop(peer_id, None)  # it is back
                return stream
            except (NetworkError, trio.TooSlowError) as exc:
                if trio.current_time() + delay > deadline:  # unreachable just now
                    raise HopFailed(peer_id, repr(exc), transient=True) from None
            await trio.sleep(delay)
            delay = min(1.0, 2 * delay)

    async def open(self) -> None:
        async def ensure_open() -> None:
            if not self.hops:
                self.hops = await self._open_hops(0)

        await self._with_recovery(ensure_open)

    def _tokens(self, hop: Hop) -> int:
        return sum(chunk.shape[1] for position, chunk in hop.chunks if position < self.length)

    def _input_known(self, hop: Hop, position: int, x: torch.Tensor) -> None:
        """`hop`'s input at `position` is known: a check of it may start on a replica."""
        if self.verifier is not None:
            self.verifier.input_known(hop, position, x)

    async def _forward(self, hop: Hop, position: int, x: torch.Tensor, last: bool) -> torch.Tensor:
        self._input_known(hop, position, x)
        header = wire.Forward(session=hop.session, position=position, last_only=last)
        reply, out = await hop.call(header, x, self.step_timeout_s)
        if out is None or not isinstance(reply, wire.Result):
            raise HopFailed(hop.peer_id, "a forward reply without a tensor")
        self._check_receipt(hop, reply, x, out)
        hop.record(position, x)
        return out

    def _check_receipt(
        self, hop: Hop, reply: wire.Message, given: torch.Tensor, got: torch.Tensor
    ) -> None:
        """In a paid generation, the hop's receipt of a step must pass (else HopFailed: the
        step fails over and the receipt is never acknowledged)."""
        if self.payments is not None:
            receipt = getattr(reply, "receipt", None)
            why = self.payments.check(
                hop.peer_id, hop.session, receipt, wire.tensor_bytes(given), wire.tensor_bytes(got)
            )
            if why is not None:
                raise HopFailed(hop.peer_id, why)

    async def _recover(self, failed: HopFailed, step: _Step | None) -> int:
        """Replace the failed hop and everything after it; replay their recorded inputs.
        Returns the first layer re-routed."""
        index = next((i for i, h in enumerate(self.hops) if h.peer_id == failed.peer_id), None)
        if index is None:  # failed while opening: re-routing from a hop, or from the start
            index = self._resume_at if self._resume_at is not None else len(self.hops)
        # the replay source must hold every earlier position; walk back to such a hop
        while index > 0 and (
            index == len(self.hops) or self._tokens(self.hops[index]) < self.length
        ):
            index -= 1
        old = self.hops[index] if index < len(self.hops) else None
        replay = [(p, c) for p, c in old.chunks if p < self.length] if old else []
        current = next((c for p, c in old.chunks if p >= self.length), None) if old else None
        start = old.start if old else 0
        await close_all(self.hops[index:])
        # if opening fails, the next recovery starts here again (the closed hops keep the
        # inputs to replay)
        self._resume_at = index
        prev = self.hops[index - 1] if index else None
        self.hops = self.hops[:index] + await self._open_hops(start, prev)
        self._resume_at = None
        for position, chunk in replay:
            x = chunk
            for i in range(index, len(self.hops)):
                x = await self._forward(self.hops[i], position, x, i == len(self.hops) - 1)
        if step is not None and step.next_hop > index:
            # hops index.. are new: the current chunk goes through them again
            step.next_hop = index
            step.x = current if current is not None else step.x
        return start

    async def _with_recovery(
        self, action: Callable[[], Awaitable[Any]], step: _Step | None = None
    ) -> Any:
        failure: HopFailed | None = None
        while True:
            try:
                if failure is not None:
                    started = time.monotonic()
                    from_layer = await self._recover(failure, step)
                    self.recoveries.append(
                        {
                            "peer_id": failure.peer_id,
                            "reason": failure.reason,
                            "from_layer": from_layer,
                            "seconds": round(time.monotonic() - started, 3),
                        }
                    )
                    failure = None
                return await action()
            except HopFailed as exc:
                if len(self.recoveries) >= self.max_recoveries:
                    # the last hop was only busy: a retry later may go through
                    give_up = ServersBusyError if exc.busy else GenerationError
                    raise give_up(
                        f"giving up after {self.max_recoveries} recoveries: {exc}"
                    ) from exc
                log.warning("hop %s failed (%s); re-routing", exc.peer_id, exc.reason)
                self.failed.add(exc.peer_id)
                self._why_failed[exc.peer_id] = exc.reason[:200]
                if exc.busy:
                    self.busy.add(exc.peer_id)
                if exc.transient and exc.peer_id not in self._retried:
                    self._broke_at.setdefault(exc.peer_id, trio.current_time())
                failure = exc
            except NoRouteError as exc:
                # no route avoids the hops that failed: one whose stream merely broke (e.g.
                # its daemon reconnecting) gets one more chance, until the step deadline
                again = {p for p in self._broke_at if p in self.failed and p not in self._retried}
                if failure is None or not again:
                    if isinstance(exc, _BusyNoRoute):
                        names = ", ".join(p[-12:] for p in exc.busy[:8])
                        raise ServersBusyError(
                            f"busy: the servers that could serve layers from "
                            f"{exc.first_missing} on are at their session or cache limits "
                            f"({names}); try again later"
                        ) from None
                    raise GenerationError(str(exc) + self._failures_told()) from None
                log.warning("no route without %s: trying them again", sorted(again))
                self.failed -= again
                self._retried |= again

    def _failures_told(self) -> str:
        """Why the peers this generation excluded failed (for the no-route error)."""
        told = [f"{p[-12:]}: {why}" for p, why in sorted(self._why_failed.items())[:4]]
        return f"; failed here: {'; '.join(told)}" if told else ""

    @property
    def speculating(self) -> bool:
        """Whether a speculative step goes on without waiting for its checks (a verifier
        that allows it: `daemon.verify.verifier.GenerationChecks.speculative`)."""
        return self.verifier is not None and bool(getattr(self.verifier, "speculative", False))

    def unsettled(self, position: int) -> bool:
        """Whether the step that started at `position` has checks still being judged."""
        return any(u.position == position for u in self._unsettled)

    @property
    def settled_length(self) -> int:
        """Every step that started before this position is settled: its checks, if any,
        passed (a token drawn from such a step's logits may be let out)."""
        return self._unsettled[0].position if self._unsettled else self.length

    async def settle(self, *, wait: bool) -> tuple[int, torch.Tensor] | None:
        """Take in the verdicts of the speculative steps, oldest first (`wait`: wait for all
        of them; else those in already, and waiting only where a later one failed: the roll-
        back may go further back). A step found wrong is rolled back to: the route is
        rebuilt without the provider that failed, its prefix replayed and the step run
        again; returns (its position, its new logits), and every later step is gone (their
        tokens must be drawn again). None: nothing to roll back to (yet)."""
        while self._unsettled:
            first = self._unsettled[0]
            if not first.pending.done.is_set():
                failed = any(u.pending.done.is_set() and u.failed for u in self._unsettled)
                if not wait and not failed:
                    return None
                hurry = getattr(self.verifier, "hurry", None)
                if hurry is not None:  # its checks gathering with others: they go now
                    hurry()
                await first.pending.done.wait()
            if first.pending.error is not None:
                raise first.pending.error
            if first.pending.failure is None:
                self._unsettled.pop(0).pending.release()  # its verdicts stand
                continue
            return first.position, await self._roll_back(first)
        return None

    async def _roll_back(self, wrong: _Unsettled) -> torch.Tensor:
        """Go back to the step at `wrong.position` (its check failed after the generation
        went on): every session holds positions computed from that step's output, and a
        server cannot forget positions, so the whole route is opened again without the
        provider found wrong, the first hop's recorded inputs before the step are replayed
        (step by step, as they ran: the rebuilt caches are the honest ones) and the step runs
        again. Returns its logits."""
        failure = wrong.pending.failure
        assert failure is not None
        if len(self.recoveries) >= self.max_recoveries:
            raise GenerationError(f"giving up after {self.max_recoveries} recoveries: {failure}")
        log.warning("hop %s failed (%s); rolling back", failure.peer_id, failure.reason)
        started = time.monotonic()
        self.failed.add(failure.peer_id)
        self._why_failed[failure.peer_id] = failure.reason[:200]
        inputs = [(p, c) for p, c in self.hops[0].chunks if p < wrong.position] if self.hops else []
        if sum(int(c.shape[1]) for _, c in inputs) != wrong.position:
            raise GenerationError("cannot roll back: the first hop's inputs are not all recorded")
        wrong.pending.release()
        for gone in self._unsettled[1:]:  # the later steps are gone: their checks' verdicts
            gone.pending.discard()  # count for nothing, as if they had never run
        self._unsettled.clear()
        await close_all(self.hops)
        self.hops, self.length = [], 0
        self._replaying = True
        try:
            for _, chunk in inputs:
                await self.step([int(t) for t in chunk[0]])
        finally:
            self._replaying = False
        logits = await self.step(wrong.token_ids, speculative=True)
        self.recoveries.append(
            {
                "peer_id": failure.peer_id,
                "reason": failure.reason,
                "from_layer": 0,
                "rolled_back_to": wrong.position,
                "seconds": round(time.monotonic() - started, 3),
            }
        )
        return logits

    async def step(self, token_ids: list[int], *, speculative: bool = False) -> torch.Tensor:
        """Run new tokens through every hop; returns the logits of the last position.

        `speculative` (where `speculating`): the step's checks are judged in the background
        and the step returns at once; the caller must `settle` before it lets out a token
        drawn from a step that is not settled (`settled_length`), and draw again from the
        step `settle` rolls back to (daemon.shards.token_loop does). Else the step waits for
        its checks, and a step found wrong fails over before it returns."""
        if not token_ids:
            raise GenerationError("a step needs at least one token")
        if self.length + len(token_ids) > self.max_length:
            raise GenerationError(f"{self.length + len(token_ids)} tokens exceed {self.max_length}")
        if self._unsettled and not speculative:
            raise GenerationError("earlier steps' checks are not settled: settle them first")
        hooks = self.verifier is not None and not self._replaying
        ahead = hooks and speculative and self.speculating
        self.ahead_step = ahead  # (the verifier's checks of it need not hurry)
        step = _Step(self.length, 0, torch.tensor([token_ids], dtype=torch.int64))

        async def relay_one() -> None:
            last = step.next_hop == len(self.hops) - 1
            hop = self.hops[step.next_hop]
            step.x = await self._forward(hop, step.position, step.x, last)
            step.next_hop += 1

        async def run() -> torch.Tensor:
            if not self.hops:  # not opened yet (or its opening failed): open here
                self.hops = await self._open_hops(0)
            if hooks:  # the hops drawn for a check: they run beside the step, on replicas
                self.verifier.before_step(self, step.position)
            if self.chained and step.next_hop < len(self.hops):
                await self._run_chained(step)
                if step.next_hop < len(self.hops):  # a server could not push to the next
                    await relay_one()  # a dead next server raises HopFailed here
                    log.warning("servers cannot reach each other: relaying from now on")
                    self.chained = False
            while step.next_hop < len(self.hops):
                await relay_one()
            if hooks and not ahead:  # a wrong hop found here fails over (HopFailed)
                await self.verifier.after_step(self, step.position, step.x)
            return step.x

        logits = await self._with_recovery(run, step)
        if ahead:  # judged in the background: `settle` takes the verdict in
            pending = self.verifier.after_step_speculative(self, step.position, logits)
            if pending is not None:
                self._unsettled.append(_Unsettled(step.position, list(token_ids), pending))
        self.length += len(token_ids)
        return logits[0, -1].float()

    async def _run_chained(self, step: _Step) -> None:
        """One chained step from hop `step.next_hop` on; advances `step` as hops report.

        Every hop answers once: a `partial` (a copy of what it pushed on, recorded as the
        next hop's input) or, from the last hop, the `result`. Raises HopFailed for the
        earliest hop that broke or made no progress within the step timeout; hops before it
        are heard out first, so every kept hop's stream is left between frames.
        """
        number = next(self._step_numbers)
        first = step.next_hop
        hops = self.hops[first:]
        header = wire.Forward(
            session=hops[0].session, position=step.position, step=number, last_only=True
        )
        hops[0].record(step.position, step.x)
        self._input_known(hops[0], step.position, step.x)
        with trio.move_on_after(self.step_timeout_s) as sending:
            await hops[0].send(header, step.x)
        if sending.cancelled_caught:
            raise HopFailed(hops[0].peer_id, f"no progress within {self.step_timeout_s:.1f} s")
        reports_in, reports_out = trio.open_memory_channel[_Report](len(hops))
        heard: dict[int, tuple[wire.Message, torch.Tensor | None]] = {}
        failure: tuple[int, HopFailed] | None = None
        refused: GenerationError | None = None
        relay_from: int | None = None

        async def listen(i: int) -> None:
            try:
                while True:
                    reply, out = await hops[i].receive()
                    if getattr(reply, "step", None) == number:
                        break
                report: _Report = (i, reply, out, None)
            except HopFailed as exc:
                report = (i, None, None, exc)
            await reports_in.send(report)

        async with trio.open_nursery() as nursery:
            for i in range(len(hops)):
                nursery.start_soon(listen, i)
            with trio.CancelScope(deadline=trio.current_time() + self.step_timeout_s) as waiting:
                while len(heard) < len(hops):
                    stop = min(failure[0] if failure else len(hops), relay_from or len(hops))
                    if stop < len(hops) and all(i in heard for i in range(stop)):
                        break  # every hop before the break has answered
                    i, reply, out, error = await reports_out.receive()
                    waiting.deadline = trio.current_time() + self.step_timeout_s  # progress
                    try:
                        if error is not None:
                            raise error
                        assert reply is not None
                        hops[i].check(reply)
                        if out is None or not isinstance(reply, wire.Partial | wire.Result):
                            raise HopFailed(hops[i].peer_id, "a step reply without a tensor")
                    except HopFailed as exc:
                        failure = min(failure or (i, exc), (i, exc), key=lambda f: f[0])
                        continue
                    except GenerationError as exc:  # raised below: the body's errors get
                        refused = exc  # wrapped in an ExceptionGroup by the nursery
                        break
                    heard[i] = reply, out
                    if i + 1 < len(hops):
                        hops[i + 1].record(step.position, out)
                        self._input_known(hops[i + 1], step.position, out)
                        if isinstance(reply, wire.Partial) and reply.forward_error:
                            # hop i could not reach hop i + 1
                            relay_from = i + 1 if relay_from is None else min(relay_from, i + 1)
            nursery.cancel_scope.cancel()
        for i in range(len(hops) if self.payments is not None else 0):
            if i not in heard:
                break
            try:  # in route order: each hop's input is the previous hop's output
                given = heard[i - 1][1] if i else step.x
                self._check_receipt(hops[i], heard[i][0], given, heard[i][1])  # type: ignore[arg-type]
            except HopFailed as exc:
                for j in [j for j in heard if j >= i]:
                    del heard[j]
                failure = min(failure or (i, exc), (i, exc), key=lambda f: f[0])
                break
        if refused is not None:
            raise refused
        missing = next((i for i in range(len(hops)) if i not in heard), None)
        if relay_from is not None and missing == relay_from:
            # hop relay_from never got the step: the caller relays it there itself
            step.next_hop, step.x = first + relay_from, heard[relay_from - 1][1]
            return
        if missing is None:
            step.next_hop, step.x = len(self.hops), heard[len(hops) - 1][1]
            return
        # hops before `missing` are done with this step: it resumes at `missing`
        step.next_hop, step.x = first + missing, heard[missing - 1][1] if missing else step.x
        if failure is not None and failure[0] <= missing:
            raise failure[1]
        raise HopFailed(hops[missing].peer_id, f"no progress within {self.step_timeout_s:.1f} s")

    async def close(self) -> None:
        for gone in self._unsettled:  # (a generation left before its checks were in)
            gone.pending.discard()
        self._unsettled.clear()
        await close_all(self.hops)
        self.hops = []


# one hop's answer to a chained step: (index in the chain, reply, tensor, failure)
_Report = tuple[int, "wire.Message | None", "torch.Tensor | None", "HopFailed | None"]


@dataclass
class _Step:
    """The step in flight: which hop is next and what it gets (survives re-routing)."""

    position: int
    next_hop: int
    x: torch.Tensor


@dataclass
class _Unsettled:
    """A speculative step whose checks are judged in the background: where it started, its
    tokens (to run it again after a roll-back) and its verdict to come
    (`daemon.verify.verifier.Pending`: `done`, `failure`, `error`)."""

    position: int
    token_ids: list[int]
    pending: Any

    @property
    def failed(self) -> bool:
        return self.pending.failure is not None or self.pending.error is not None
