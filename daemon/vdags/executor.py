"""Runs a compiled vDAG plan: every step as soon as the steps it reads are done (so
independent branches run in parallel, fan-out and fan-in fall out of the edges), each
step's input assembled from its feeds (daemon.vdags.values), the whole bounded by a
deadline. Sans transport: how a step is run on an instance of its block is the `Runner`'s,
which policy runs is the `Policies`'.

Per step: the preprocessing policy (if any) turns the assembled input into the block's
input; an instance is chosen (the assignment policy, else the least-loaded instance by the
load the servers report, ties taking turns); the block runs there; a failure that is the
instance's (unreachable, crashed, timed out, busy) is retried on another instance not yet
tried, up to `MAX_ATTEMPTS`; a failure that is the block's own (it raised) is not retried,
since another instance would run the same code on the same input. The postprocessing policy
(if any) turns the block's output into the step's output. The first failure cancels the
other steps and reaches the caller as `NodeFailed`, naming the step (its path through the
nesting: ``sub/summarize``).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio

from daemon.vdags.values import (
    INPUT,
    AssemblyError,
    Feed,
    ValueRefused,
    assemble,
    check_value,
    gather,
    named,
)
from scheduler.vdag import PlanStep, PolicyRule, VdagPlan

MAX_ATTEMPTS = 3
RETRY_PAUSE_S = 0.1  # times the attempt's number, before trying failed instances again
log = logging.getLogger(__name__)


class AttemptFailed(Exception):
    """One try of a step on one instance failed; `retryable`: another instance may do."""

    def __init__(self, message: str, *, retryable: bool, reason: str = "failed") -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.reason = reason


class NodeFailed(Exception):
    """The vDAG failed at step `node`; `reason` labels why (metrics, error data)."""

    def __init__(self, node: str, message: str, reason: str = "failed") -> None:
        super().__init__(f"vDAG node {node!r} failed: {message}")
        self.node = node
        self.detail = message
        self.reason = reason


class DeadlineExceeded(Exception):
    def __init__(self, deadline_s: float, running: list[str]) -> None:
        shown = ", ".join(repr(n) for n in running) or "none"
        super().__init__(
            f"the vDAG ran past its deadline of {deadline_s:g} s (still running: {shown})"
        )
        self.deadline_s = deadline_s
        self.running = running


@dataclass(frozen=True)
class RunContext:
    """What policies and blocks are told of the request."""

    vdag: str
    session: str | None = None
    api_key: str | None = None

    def for_step(self, step: PlanStep) -> dict[str, Any]:
        return {
            "vdag": self.vdag,
            "node": step.label,
            "block": step.block_id,
            "session": self.session,
        }


class Runner(Protocol):
    """Runs steps on the instances of their blocks."""

    def candidates(self, step: PlanStep) -> list[str]:
        """The instances that may run `step` now (AttemptFailed, not retryable, if none)."""
        ...

    def load(self, step: PlanStep, instance: str) -> float:
        """The instance's load as last reported, plus this node's calls running there."""
        ...

    async def call(self, step: PlanStep, instance: str, value: Any, ctx: RunContext) -> Any:
        """The block's output for `value` on `instance`; AttemptFailed otherwise."""
        ...

    def served_blocks(self) -> list[str]:
        """Every block that some instance serves now (what a node without a manualBlockId
        may be given by its assignment policy)."""
        ...


class Policies(Protocol):
    async def eval(self, rule: PolicyRule, step: PlanStep, input_data: Any, ctx: RunContext) -> Any:
        """The policy's `eval(rule.parameters, input_data, context)`; AttemptFailed (not
        retryable) when it cannot run or raises."""
        ...


@dataclass
class StepTrace:
    label: str
    block: str | None  # for a node without a manualBlockId: the block its policy chose
    started: float = math.nan
    finished: float = math.nan
    instance: str | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self, t0: float) -> dict[str, Any]:
        return {
            "label": self.label,
            "block": self.block,
            "instance": self.instance,
            "attempts": self.attempts,
            "started_s": None if math.isnan(self.started) else self.started - t0,
            "finished_s": None if math.isnan(self.finished) else self.finished - t0,
        }


@dataclass
class Result:
    output: Any
    steps: list[StepTrace]
    t0: float

    def trace(self) -> list[dict[str, Any]]:
        return [s.to_json(self.t0) for s in self.steps]


class Executor:
    """Runs plans with one `Runner` and one `Policies`; keeps the turn counters of the
    default assignment (per block), so equal instances share the requests."""

    def __init__(self, runner: Runner, policies: Policies) -> None:
        self.runner = runner
        self.policies = policies
        self._turns: Counter[str] = Counter()

    async def run(
        self, plan: VdagPlan, value: Any, ctx: RunContext, *, deadline_s: float
    ) -> Result:
        """The vDAG's output for `value`; NodeFailed naming the step that failed, or
        DeadlineExceeded naming the steps still running when `deadline_s` passed."""
        outputs: dict[str, Any] = {}
        done = {step.label: trio.Event() for step in plan.steps}
        traces = {step.label: StepTrace(step.label, step.block_id) for step in plan.steps}
        failure: list[NodeFailed] = []
        into: dict[str, list[Any]] = {step.label: [] for step in plan.steps}
        for edge in plan.edges:
            into[edge.dst].append(edge)
        t0 = trio.current_time()

        async def one(step: PlanStep, cancel: trio.CancelScope) -> None:
            for before in step.after:
                await done[before].wait()
            trace = traces[step.label]
            trace.started = trio.current_time()
            try:
                feeds = _feeds(plan, step, value, outputs, into[step.label])
                outputs[step.label] = await self._step(step, feeds, ctx, trace)
            except NodeFailed as exc:
                if not failure:
                    failure.append(exc)
                cancel.cancel()
                return
            except Exception as exc:  # a bug must fail the request, never the daemon
                log.exception("vDAG step %s failed", step.label)
                if not failure:
                    problem = f"internal error: {type(exc).__name__}: {exc}"
                    failure.append(NodeFailed(step.label, problem, "internal"))
                cancel.cancel()
                return
            trace.finished = trio.current_time()
            done[step.label].set()

        with trio.move_on_after(deadline_s) as deadline:
            async with trio.open_nursery() as nursery:
                for step in plan.steps:
                    nursery.start_soon(one, step, nursery.cancel_scope)
        if failure:
            raise failure[0]
        if deadline.cancelled_caught:
            running = [
                t.label
                for t in traces.values()
                if not math.isnan(t.started) and math.isnan(t.finished)
            ]
            raise DeadlineExceeded(deadline_s, running)
        answer = [(port.step, _select_out(port.step, port.names, outputs)) for port in plan.outputs]
        result = gather(answer)
        return Result(result, list(traces.values()), t0)

    async def _step(
        self, step: PlanStep, feeds: list[Feed], ctx: RunContext, trace: StepTrace
    ) -> Any:
        try:
            value = assemble(feeds)
        except AssemblyError as exc:
            raise NodeFailed(step.label, f"its input: {exc}", "input") from None
        try:
            if step.preprocessing is not None:
                value = await self.policies.eval(step.preprocessing, step, value, ctx)
                check_value(value, "the preprocessing policy's output")
            if step.block_id is None:  # its assignment policy picks the block
                step = await self._pick_block(step, value, ctx)
                trace.block = step.block_id
            output = await self._attempts(step, value, ctx, trace)
            check_value(output, "its output")
            if step.postprocessing is not None:
                output = await self.policies.eval(step.postprocessing, step, output, ctx)
                check_value(output, "the postprocessing policy's output")
        except AttemptFailed as exc:
            raise NodeFailed(step.label, exc.message, exc.reason) from None
        except ValueRefused as exc:
            raise NodeFailed(step.label, str(exc), exc.reason) from None
        return output

    async def _attempts(self, step: PlanStep, value: Any, ctx: RunContext, trace: StepTrace) -> Any:
        """Try instances not yet tried; once every instance has failed (for its own sake: a
        stream that would not open, a restart), try them again after a short pause, up to
        MAX_ATTEMPTS tries in all."""
        tried: list[str] = []
        last: AttemptFailed | None = None
        for attempt in range(MAX_ATTEMPTS):
            everyone = self.runner.candidates(step)
            left = [c for c in everyone if c not in tried]
            if not left and everyone and last is not None:
                await trio.sleep(RETRY_PAUSE_S * attempt)  # all failed once: again, later
                tried.clear()
                left = everyone
            if not left:
                break
            instance = await self._assign(step, left, value, ctx)
            trace.instance = instance
            try:
                output = await self.runner.call(step, instance, value, ctx)
            except AttemptFailed as exc:
                trace.attempts.append({"instance": instance, "error": exc.message})
                if not exc.retryable:
                    raise
                tried.append(instance)
                last = exc
                continue
            trace.attempts.append({"instance": instance, "error": None})
            return output
        if last is None:
            raise AttemptFailed(
                f"no instance of block {step.block_id!r} is available",
                retryable=False,
                reason="no_instance",
            )
        instances = len({a["instance"] for a in trace.attempts})
        raise AttemptFailed(
            f"failed {len(trace.attempts)} time(s) on {instances} instance(s) of block "
            f"{step.block_id!r}; last: {last.message}",
            retryable=False,
            reason=last.reason,
        )

    async def _pick_block(self, step: PlanStep, value: Any, ctx: RunContext) -> PlanStep:
        """A node without a manualBlockId: its assignment policy is asked for the block
        (input `{"blocks": [ids], "input"}` -> `{"block": id}`); the instance is then the
        least-loaded one of that block."""
        assert step.assignment is not None  # compile_plan refuses a node with neither
        blocks = self.runner.served_blocks()
        answer = await self.policies.eval(
            step.assignment, step, {"blocks": blocks, "input": value}, ctx
        )
        chosen = answer.get("block") if isinstance(answer, dict) else answer
        if chosen not in blocks:
            raise AttemptFailed(
                f"the assignment policy chose block {str(chosen)[:80]!r}, not one of the "
                f"{len(blocks)} blocks served now",
                retryable=False,
                reason="assignment",
            )
        return msgspec.structs.replace(step, block_id=str(chosen), assignment=None)

    async def _assign(
        self, step: PlanStep, candidates: list[str], value: Any, ctx: RunContext
    ) -> str:
        if len(candidates) == 1 and step.assignment is None:
            return candidates[0]
        loads = [{"id": c, "load": self.runner.load(step, c)} for c in candidates]
        if step.assignment is None:
            return least_loaded(loads, self._turns, step.block_id or step.label)
        answer = await self.policies.eval(
            step.assignment, step, {"instances": loads, "input": value}, ctx
        )
        chosen = answer.get("instance") if isinstance(answer, dict) else answer
        if chosen not in candidates:
            raise AttemptFailed(
                f"the assignment policy chose {str(chosen)[:80]!r}, not one of the instances "
                f"{candidates}",
                retryable=False,
                reason="assignment",
            )
        return str(chosen)


def least_loaded(loads: list[dict[str, Any]], turns: Counter[str], key: str) -> str:
    """The least-loaded instance; those tied take turns (as daemon.sandbox.defaults'
    least-loaded policy, without a sandbox call on the hot path)."""
    low = min(item["load"] for item in loads)
    tied = sorted(item["id"] for item in loads if item["load"] <= low)
    turns[key] += 1
    return tied[turns[key] % len(tied)]


def _feeds(
    plan: VdagPlan, step: PlanStep, value: Any, outputs: dict[str, Any], edges: list[Any]
) -> list[Feed]:
    # graph.input's inputNames: those keys of the vDAG's input, under the same names
    feeds = [
        Feed(INPUT, value, *((port.names, port.names) if isinstance(value, dict) else ((), ())))
        for port in plan.inputs
        if port.step == step.label
    ]
    feeds += [
        Feed(edge.src, outputs[edge.src], edge.output_names, edge.input_names) for edge in edges
    ]
    return feeds


def _select_out(label: str, names: tuple[str, ...], outputs: dict[str, Any]) -> Any:
    """graph.output's outputNames: those keys of the node's output (a map of them)."""
    try:
        output = outputs[label]
        return named(Feed(label, output, names, names)) if names else output
    except AssemblyError as exc:
        raise NodeFailed(label, f"its output: {exc}", "output") from None
