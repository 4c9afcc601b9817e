"""The endpoint's fair queue (daemon.serving.admission) over a real JobTable: first come
first served, a request held back only by its own owner's cap passed over, 429 when the
queue is full, 503 after waiting too long, nothing leaked by a request cancelled while it
waits. Also the engine's coverage rule for /v1/models."""

from __future__ import annotations

import pytest
import trio

from daemon.serving.admission import Admission
from daemon.serving.engine import _covered
from daemon.serving.openai_wire import OpenAIError
from daemon.shards.jobs import MAX_JOBS, JobTable


def _admission(table: JobTable, **kw) -> tuple[Admission, dict[str, int]]:
    queued: dict[str, int] = {}

    def on_queue(model: str, delta: int) -> None:
        queued[model] = queued.get(model, 0) + delta

    settings = {"max_queue": 8, "max_per_owner": 4, "timeout_s": 60.0, **kw}
    return Admission(table, on_queue=on_queue, **settings), queued


def _fill(table: JobTable, count: int) -> list:
    return [table.new_job("") for _ in range(count)]


async def test_first_come_first_served_when_the_total_cap_frees(autojump_clock):
    table = JobTable()
    admission, queued = _admission(table)
    held = _fill(table, MAX_JOBS)
    order: list[str] = []

    async def ask(owner: str) -> None:
        jobs = await admission.acquire(owner, 1, "m")
        order.append(owner)
        assert [j.owner for j in jobs] == [owner]

    async with trio.open_nursery() as nursery:
        for owner in ("first", "second", "third"):
            nursery.start_soon(ask, owner)
            await trio.sleep(0.01)  # virtual time (autojump_clock): they arrive in this order
        assert admission.waiting == 3 and queued == {"m": 3}
        for job in held[:3]:
            job.done = True
            admission.released()
            await trio.sleep(0.01)  # virtual time (autojump_clock): one admitted at a time
    assert order == ["first", "second", "third"]
    assert queued == {"m": 0}


async def test_a_request_held_back_by_its_own_cap_is_passed_over(autojump_clock):
    table = JobTable()
    admission, _ = _admission(table, max_per_owner=2)
    busy = [table.new_job("greedy") for _ in range(2)]  # greedy is at its own cap
    others = _fill(table, MAX_JOBS - 2)
    order: list[str] = []

    async def ask(owner: str) -> None:
        await admission.acquire(owner, 1, "m")
        order.append(owner)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask, "greedy")
        await trio.sleep(0.01)  # virtual time (autojump_clock): greedy queues first
        nursery.start_soon(ask, "patient")
        await trio.sleep(0.01)  # virtual time: then patient
        others[0].done = True  # one slot frees: greedy may not take it, patient does
        admission.released()
        await trio.sleep(0.01)  # virtual time: the freed slot is handed out
        assert order == ["patient"]
        busy[0].done = True  # now greedy is under its cap, and a slot is free
        admission.released()
    assert order == ["patient", "greedy"]


async def test_queue_full_is_429_and_a_long_wait_is_503(autojump_clock):
    table = JobTable()
    admission, queued = _admission(table, max_queue=1, timeout_s=5.0)
    _fill(table, MAX_JOBS)
    with pytest.raises(OpenAIError) as too_many:
        await admission.acquire("a", 9, "m")  # over the per-owner cap: never admissible
    assert too_many.value.status == 429 and too_many.value.param == "n"

    async with trio.open_nursery() as nursery:

        async def wait() -> None:
            with pytest.raises(OpenAIError) as slow:
                await admission.acquire("a", 1, "m")
            assert slow.value.status == 503 and slow.value.code == "server_busy"

        nursery.start_soon(wait)
        await trio.sleep(0.01)  # virtual time (autojump_clock): the waiter queues
        with pytest.raises(OpenAIError) as full:
            await admission.acquire("b", 1, "m")
        assert full.value.status == 429 and full.value.code == "queue_full"
    assert admission.waiting == 0 and queued == {"m": 0}


async def test_a_cancelled_waiter_takes_no_slot_with_it(autojump_clock):
    table = JobTable()
    admission, queued = _admission(table)
    held = _fill(table, MAX_JOBS)
    with trio.move_on_after(1.0):
        await admission.acquire("a", 2, "m")
    assert admission.waiting == 0 and queued == {"m": 0}
    for job in held:
        job.done = True
    jobs = await admission.acquire("b", 4, "m")  # every free slot is there to take
    assert len(jobs) == 4 and not any(j.owner == "a" for j in table.jobs.values())


def test_a_model_is_listed_only_when_its_layers_chain_from_zero():
    assert _covered([(0, 2), (2, 4), (4, 6)])
    assert _covered([(0, 3), (2, 6), (0, 2)])
    assert not _covered([(0, 2), (3, 6)])
    assert not _covered([(2, 6)])


async def test_a_request_that_can_run_does_not_queue_behind_one_held_by_its_own_cap(
    autojump_clock,
):
    table = JobTable()
    admission, queued = _admission(table, max_per_owner=2, max_queue=1)
    busy = [table.new_job("greedy") for _ in range(2)]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(admission.acquire, "greedy", 1, "m")
        await trio.sleep(0.01)  # virtual time (autojump_clock): the waiter queues
        assert admission.waiting == 1 and queued == {"m": 1}
        start = trio.current_time()
        jobs = await admission.acquire("fresh", 2, "m")  # the queue is full, but it can run
        assert trio.current_time() == start and len(jobs) == 2
        assert admission.waiting == 1 and queued == {"m": 1}
        busy[0].done = True
        admission.released()
    assert admission.waiting == 0 and queued == {"m": 0}


async def test_a_waiting_request_is_told_its_position_as_those_ahead_leave(autojump_clock):
    table = JobTable()
    admission, _ = _admission(table)
    held = _fill(table, MAX_JOBS)
    told: dict[str, list[int]] = {"a": [], "b": [], "c": []}

    def teller(owner: str):
        async def on_wait(position: int) -> None:
            if not told[owner] or told[owner][-1] != position:
                told[owner].append(position)

        return on_wait

    async with trio.open_nursery() as nursery:
        for owner in ("a", "b", "c"):
            nursery.start_soon(admission.acquire, owner, 1, "m", teller(owner))
            await trio.sleep(0.01)  # virtual time (autojump_clock): they arrive in this order
        assert told == {"a": [1], "b": [2], "c": [3]}
        for job in held[:3]:
            job.done = True
            admission.released()
            await trio.sleep(1)  # virtual time: at least one poll of every waiter
    assert told == {"a": [1], "b": [2, 1], "c": [3, 2, 1]}
