"""The executor on compiled plans, on trio's virtual clock, with a Runner whose blocks are
Python functions that take a set virtual time on named instances: steps start when their
inputs are done (branches overlap), inputs are assembled from feeds, a nested vDAG's steps
run inside the whole, a failing instance is retried on another, the deadline holds and
every failure names the node."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio

from daemon.vdags.executor import (
    AttemptFailed,
    DeadlineExceeded,
    Executor,
    NodeFailed,
    RunContext,
)
from scheduler.vdag import Catalog, PlanStep, compile_plan, parse


def block(label: str, block_id: str, **extra: Any) -> dict[str, Any]:
    return {"nodeLabel": label, "nodeType": "block", "manualBlockId": block_id, **extra}


def spec(name: str, nodes: list[dict], edges: list[tuple[str, str]], version: str = "1") -> Any:
    heads = [n["nodeLabel"] for n in nodes if all(b != n["nodeLabel"] for _, b in edges)]
    tails = [n["nodeLabel"] for n in nodes if all(a != n["nodeLabel"] for a, _ in edges)]
    value = {
        "vdagName": name,
        "vdagVersion": version,
        "nodes": nodes,
        "graph": {
            "input": heads,
            "output": tails,
            "connections": [{"from": a, "to": b} for a, b in edges],
        },
    }
    return parse(value, f"{name}:{version}")


def plan_of(top: Any, *subs: Any) -> Any:
    catalog = Catalog.of([top, *subs])
    return compile_plan(top, catalog.versions)


@dataclass
class FakeRunner:
    """Blocks: id -> (function, virtual seconds); instances: id -> names; `broken`: instances
    that fail as an unreachable server would; `calls`: (block, instance) run."""

    blocks: dict[str, tuple[Any, float]]
    instances: dict[str, list[str]] = field(default_factory=dict)
    broken: set[str] = field(default_factory=set)
    flaky: Counter[str] = field(default_factory=Counter)  # failures left per instance
    calls: list[tuple[str, str]] = field(default_factory=list)
    running: Counter[str] = field(default_factory=Counter)

    def candidates(self, step: PlanStep) -> list[str]:
        return self.instances.get(step.block_id or "", ["only"])

    def load(self, step: PlanStep, instance: str) -> float:
        return float(self.running[instance])

    def served_blocks(self) -> list[str]:
        return sorted(self.blocks)

    async def call(self, step: PlanStep, instance: str, value: Any, ctx: RunContext) -> Any:
        fn, seconds = self.blocks[step.block_id or ""]
        self.calls.append((step.label, instance))
        self.running[instance] += 1
        try:
            await trio.sleep(seconds)
        finally:
            self.running[instance] -= 1
        if instance in self.broken or self.flaky[instance] > 0:
            self.flaky[instance] -= 1
            raise AttemptFailed(f"{instance} cannot be reached", retryable=True)
        try:
            return fn(value)
        except Exception as exc:
            raise AttemptFailed(f"the block raised {exc}", retryable=False) from None


class NoPolicies:
    async def eval(self, rule: Any, step: PlanStep, input_data: Any, ctx: RunContext) -> Any:
        raise AssertionError("no policy in these plans")


BLOCKS = {
    "upper": (lambda v: v.upper(), 1.0),
    "rev": (lambda v: v[::-1], 2.0),
    "join": (lambda v: f"{v['a']}+{v['b']}", 0.5),
    "len": (lambda v: len(v), 0.25),
    "boom": (lambda v: 1 / 0, 0.1),
    "slow": (lambda v: v, 50.0),
}
CTX = RunContext("t:1")


async def run(plan: Any, value: Any, runner: FakeRunner | None = None, deadline: float = 30.0):
    executor = Executor(runner or FakeRunner(BLOCKS), NoPolicies())
    return await executor.run(plan, value, CTX, deadline_s=deadline)


async def test_linear_chain_passes_values_straight_through(autojump_clock):
    plan = plan_of(spec("t", [block("a", "upper"), block("b", "rev")], [("a", "b")]))
    result = await run(plan, "abc")
    assert result.output == "CBA"
    trace = {s["label"]: s for s in result.trace()}
    assert trace["a"]["finished_s"] == pytest.approx(1.0)
    assert trace["b"]["started_s"] == pytest.approx(1.0)  # after a, not before
    assert trace["b"]["finished_s"] == pytest.approx(3.0)


async def test_fan_out_branches_run_in_parallel_and_fan_in(autojump_clock):
    plan = plan_of(
        spec(
            "t",
            [block("src", "upper"), block("a", "rev"), block("b", "upper"), block("j", "join")],
            [("src", "a"), ("src", "b"), ("a", "j"), ("b", "j")],
        )
    )
    result = await run(plan, "xy")
    assert result.output == "YX+XY"
    trace = {s["label"]: s for s in result.trace()}
    # a (2 s) and b (1 s) both start when src ends: they overlap in virtual time
    assert trace["a"]["started_s"] == trace["b"]["started_s"] == pytest.approx(1.0)
    assert trace["b"]["finished_s"] == pytest.approx(2.0)
    assert trace["a"]["finished_s"] == pytest.approx(3.0)
    assert trace["j"]["started_s"] == pytest.approx(3.0)  # fan-in waits for both
    # the whole took src + the longer branch + join, not the sum of the branches
    assert trace["j"]["finished_s"] == pytest.approx(3.5)


async def test_a_nested_vdag_runs_inside_the_whole(autojump_clock):
    inner = spec(
        "inner",
        [block("x", "upper"), block("y", "rev"), block("j", "join")],
        [("x", "j"), ("y", "j")],
    )
    # j joins by its inputs' node labels: name them as the block expects (a, b)
    inner_value = {
        "vdagName": "inner",
        "vdagVersion": "1",
        "nodes": [block("a", "upper"), block("b", "rev"), block("j", "join")],
        "graph": {
            "input": ["a", "b"],
            "output": ["j"],
            "connections": [
                {"from": "a", "to": "j", "inputNames": ["a"]},
                {"from": "b", "to": "j", "inputNames": ["b"]},
            ],
        },
    }
    inner = parse(inner_value, "inner:1")
    outer = spec(
        "outer",
        [
            block("pre", "upper"),
            {"nodeLabel": "sub", "nodeType": "vdag", "vdagURI": "inner:1"},
            block("n", "len"),
        ],
        [("pre", "sub"), ("sub", "n")],
    )
    plan = plan_of(outer, inner)
    assert plan.levels == [["pre"], ["sub/a", "sub/b"], ["sub/j"], ["n"]]
    result = await run(plan, "hey")
    assert result.output == len("HEY+YEH")
    trace = {s["label"]: s for s in result.trace()}
    assert trace["sub/a"]["started_s"] == trace["sub/b"]["started_s"] == pytest.approx(1.0)


async def test_a_failed_instance_is_retried_on_another(autojump_clock):
    plan = plan_of(spec("t", [block("a", "upper")], []))
    runner = FakeRunner(BLOCKS, instances={"upper": ["i1", "i2"]}, broken={"i1", "i2"})
    runner.broken = {"i2"}
    for _ in range(2):  # whichever it picks first, the answer comes from i1
        result = await run(plan, "q", runner)
        assert result.output == "Q"
        assert result.trace()[0]["instance"] == "i1"
    tried = [attempt["instance"] for attempt in result.trace()[0]["attempts"]]
    assert "i2" in {i for _, i in runner.calls}  # it was tried, and failed over
    assert tried[-1] == "i1"
    # every instance failing: the error names the node and the last failure
    runner.broken = {"i1", "i2"}
    with pytest.raises(NodeFailed) as info:
        await run(plan, "q", runner)
    assert info.value.node == "a"
    assert "failed 3 time(s) on 2 instance(s) of block 'upper'" in str(info.value)


async def test_a_lone_instance_that_fails_for_its_own_sake_is_tried_again(autojump_clock):
    plan = plan_of(spec("t", [block("a", "upper")], []))
    runner = FakeRunner(BLOCKS, instances={"upper": ["only"]}, flaky=Counter({"only": 2}))
    start = trio.current_time()
    result = await run(plan, "q", runner)
    assert result.output == "Q"
    attempts = result.trace()[0]["attempts"]
    assert [a["instance"] for a in attempts] == ["only"] * 3
    assert [a["error"] is None for a in attempts] == [False, False, True]
    # three runs of the block (1 s each) and the pauses before the 2nd and 3rd (0.1, 0.2 s)
    assert trio.current_time() - start == pytest.approx(3.3)


async def test_an_error_of_the_block_names_the_node_and_cancels_the_rest(autojump_clock):
    plan = plan_of(
        spec(
            "t",
            [
                block("src", "upper"),
                block("bad", "boom"),
                block("slow", "slow"),
                block("j", "join"),
            ],
            [("src", "bad"), ("src", "slow"), ("bad", "j"), ("slow", "j")],
        )
    )
    runner = FakeRunner(BLOCKS, instances={"boom": ["i1", "i2"]})
    start = trio.current_time()
    with pytest.raises(NodeFailed) as info:
        await run(plan, "x", runner)
    assert info.value.node == "bad"
    assert str(info.value) == "vDAG node 'bad' failed: the block raised division by zero"
    # its own error is not retried elsewhere (same code, same input), and the slow branch
    # was cancelled rather than waited for
    assert len([c for c in runner.calls if c[0] == "bad"]) == 1
    assert trio.current_time() - start == pytest.approx(1.1)


async def test_the_deadline_bounds_the_whole_and_names_what_ran(autojump_clock):
    plan = plan_of(spec("t", [block("a", "upper"), block("s", "slow")], [("a", "s")]))
    start = trio.current_time()
    with pytest.raises(DeadlineExceeded) as info:
        await run(plan, "x", deadline=5.0)
    assert trio.current_time() - start == pytest.approx(5.0)
    assert info.value.running == ["s"]
    assert "deadline of 5 s" in str(info.value) and "'s'" in str(info.value)


async def test_input_assembly_by_names_and_a_missing_name_names_the_node(autojump_clock):
    value = {
        "vdagName": "t",
        "vdagVersion": "1",
        "nodes": [block("a", "upper"), block("b", "len"), block("j", "join")],
        "graph": {
            "input": [{"nodeLabel": "a", "inputNames": ["text"]}, "b"],
            "output": ["j"],
            "connections": [
                {"nodeLabel": "j", "inputs": ["a", "b"]},
            ],
        },
    }
    runner = FakeRunner({**BLOCKS, "upper": (lambda v: v["text"].upper(), 1.0)})
    plan = plan_of(parse(value, "t:1"))
    # a gets {"text": ...} (graph.input names it), b the whole input; unnamed feeds are
    # keyed by their node's label: j gets {"a": ..., "b": ...}
    result = await run(plan, {"text": "ab", "other": 1}, runner)
    assert result.output == "AB+2"
    # a feed naming an output its producer did not give fails at the consumer
    value["graph"]["connections"] = [
        {"from": "a", "to": "j", "outputNames": ["nope"], "inputNames": ["a"]},
        {"from": "b", "to": "j", "inputNames": ["b"]},
    ]
    runner = FakeRunner({**BLOCKS, "upper": (lambda v: {"text": v["text"].upper()}, 1.0)})
    with pytest.raises(NodeFailed) as info:
        await run(plan_of(parse(value, "t:1")), {"text": "ab"}, runner)
    assert info.value.node == "j"
    assert "'a' gave no 'nope'" in str(info.value)


async def test_default_assignment_spreads_over_equal_instances(autojump_clock):
    plan = plan_of(spec("t", [block("a", "upper")], []))
    runner = FakeRunner(BLOCKS, instances={"upper": ["i1", "i2"]})
    executor = Executor(runner, NoPolicies())  # one per daemon: it keeps the turns
    for _ in range(4):
        await executor.run(plan, "z", CTX, deadline_s=10)
    assert [i for _, i in runner.calls] == ["i2", "i1", "i2", "i1"]  # equal: turns
    # concurrent requests go to the instance with fewer running
    runner.calls.clear()
    async with trio.open_nursery() as nursery:
        for _ in range(4):
            nursery.start_soon(lambda: executor.run(plan, "z", CTX, deadline_s=10))
    assert Counter(i for _, i in runner.calls) == {"i1": 2, "i2": 2}
    # an instance with more running is passed over
    runner.running["i1"] = 5
    runner.calls.clear()
    for _ in range(3):
        await executor.run(plan, "z", CTX, deadline_s=10)
    assert [i for _, i in runner.calls] == ["i2", "i2", "i2"]


class PickPolicy:
    """An assignment policy that picks the block named by the input's first word."""

    async def eval(self, rule: Any, step: PlanStep, input_data: Any, ctx: RunContext) -> Any:
        assert sorted(input_data["blocks"]) == sorted(BLOCKS)
        return {"block": input_data["input"].split()[0]}


async def test_a_node_without_a_block_gets_one_from_its_assignment_policy(autojump_clock):
    value = {
        "vdagName": "t",
        "vdagVersion": "1",
        "nodes": [
            {
                "nodeLabel": "any",
                "nodeType": "block",
                "assignmentPolicyRule": {"policyRuleURI": "builtin:pick"},
            },
        ],
        "graph": {"input": ["any"], "output": ["any"]},
    }
    plan = plan_of(parse(value, "t:1"))
    executor = Executor(FakeRunner(BLOCKS), PickPolicy())
    result = await executor.run(plan, "upper case", CTX, deadline_s=10)
    assert result.output == "UPPER CASE" and result.trace()[0]["block"] == "upper"
    result = await executor.run(plan, "rev it", CTX, deadline_s=10)
    assert result.output == "ti ver" and result.trace()[0]["block"] == "rev"
    with pytest.raises(NodeFailed, match="chose block 'nope', not one of the 6 blocks"):
        await executor.run(plan, "nope x", CTX, deadline_s=10)
