"""The endpoint's real `Engine` (its fair queue, its `run`) over a real JobTable, with the
network's generations replaced by a script the test drives: each choice sends one piece per
permit the test gives (`allow`), and on its way out holds a shielded cleanup as
run_generation does when it closes its sessions on every shard server. No model, no
network: the HTTP layer's own behaviour (queue notices, clients that leave) in isolation."""

from __future__ import annotations

import math
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import trio

from daemon.api.openai_http import OpenAIServer
from daemon.metrics import Metrics
from daemon.serving.access import Access
from daemon.serving.engine import Engine, Piece, Plan
from daemon.serving.settings import ServingConfig
from daemon.shards.jobs import MAX_JOBS, JobTable
from registry.sync import Entries

MODEL = "scripted"


class ScriptedEngine(Engine):
    def __init__(self, *, gated: bool = True, **kw: Any) -> None:
        table = JobTable()
        table.replica = SimpleNamespace(entries=Entries())
        table.local_block = lambda model: None
        super().__init__(table, Metrics(), **kw)
        self.table = table
        self.gated = gated
        self.cleanup_s = 0.0
        self.on_cleanup: Callable[[], None] | None = None
        self.running = 0
        self._permits, self._granted = trio.open_memory_channel[None](math.inf)

    def allow(self, count: int = 1) -> None:
        """Let `count` more pieces through (shared by every running choice)."""
        for _ in range(count):
            self._permits.send_nowait(None)

    def hold_every_slot(self) -> list[Any]:
        """Take every job slot of the service, so that the next request waits."""
        return [self.table.new_job(f"holder{i}") for i in range(MAX_JOBS)]

    def free(self, jobs: list[Any]) -> None:
        for job in jobs:
            self.table.drop_job(job.id)
        self.admission.released()

    def _scripted(self, req: Any, max_tokens: int | None) -> Plan:
        return Plan(
            model=req.model,
            text=None,
            prompt_ids=[1, 2, 3],
            max_tokens=max_tokens or 4,
            n=req.n,
            params=None,
            vocab=16,
            stops=[],
            logprobs=False,
            top_logprobs=0,
        )

    async def plan_chat(self, req: Any) -> Plan:
        return self._scripted(req, req.limit())

    async def plan_completion(self, req: Any) -> Plan:
        return self._scripted(req, req.max_tokens)

    async def _one(self, plan: Plan, index: int, job: Any, send: Any, usage: Any) -> None:
        self.running += 1
        try:
            async with send:
                for i in range(plan.max_tokens):
                    if self.gated:
                        await self._granted.receive()
                    usage.completion_tokens += 1
                    await send.send(Piece(index, f"t{i} "))
                await send.send(Piece(index, "", finish_reason="length"))
        finally:
            with trio.CancelScope(shield=True):  # as run_generation closes its sessions
                if self.on_cleanup is not None:
                    self.on_cleanup()
                await trio.sleep(self.cleanup_s)
            self.running -= 1


def scripted_server(**kw: Any) -> tuple[OpenAIServer, ScriptedEngine]:
    notice_s = kw.pop("queue_notice_s", None)
    engine = ScriptedEngine(**kw)
    extra = {} if notice_s is None else {"queue_notice_s": notice_s}
    server = OpenAIServer(engine, Access(ServingConfig(openai=True)), engine.metrics, **extra)
    return server, engine


def rejected(engine: ScriptedEngine, reason: str) -> float:
    return engine.metrics.rejected.labels("openai", reason)._value.get()


def answered(engine: ScriptedEngine, status: int) -> float:
    """Requests counted with `status`, over every route."""
    total = 0.0
    for metric in engine.metrics.serving_requests.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels["status"] == str(status):
                total += sample.value
    return total


async def until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Wait for `condition` (checked every 10 ms), at most `timeout_s` seconds."""
    with trio.move_on_after(timeout_s):
        while True:
            if condition():
                return
            await trio.sleep(0.01)  # a poll under the deadline above
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
