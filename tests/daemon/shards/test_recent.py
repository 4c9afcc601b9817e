"""The record of recent generations (daemon.shards.recent): bounded, live route while a
generation runs and frozen after, failovers counted with what failed, TTFT and tokens per
second; and `generation_list` on whole daemons, where a generation's server is killed
mid-way and the failover shows in the record and in /metrics."""

from __future__ import annotations

import pytest
import trio

from daemon.api.client import RPCCallError
from daemon.shards.recent import MAX_FAILOVERS, Generation, RecentGenerations, begin
from tests.daemon.harness import inline_threads, memory_cluster

LAYERS = 4
PROMPT = list(b"route me")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeModel:
    """What the record reads of a RemoteModel."""

    def __init__(self, hops: list[tuple[str, int, int]]) -> None:
        self.hops = hops
        self.recoveries: list[dict] = []
        self.chained = True

    @property
    def route(self) -> list[dict]:
        return [{"peer_id": p, "start": a, "end": b} for p, a, b in self.hops]


class FakeJob:
    def __init__(self, job_id: str, error: str | None = None) -> None:
        self.id, self.error = job_id, error
        self.scope = trio.CancelScope()


async def test_live_route_failovers_and_speed_then_frozen():
    clock = Clock()
    ended: list[tuple[str, int]] = []
    record = RecentGenerations(clock=clock, on_end=lambda s, f: ended.append((s, f)))
    model = FakeModel([("peer-a", 0, 2), ("peer-b", 2, 4)])
    entry = record.begin("job1", "tiny", model, prompt_tokens=5, paid=False)
    (row,) = record.list()
    assert row["state"] == "running" and row["tokens"] == 0 and row["ttft_s"] is None
    assert row["route"] == [
        {"peer": "peer-a", "start": 0, "end": 2},
        {"peer": "peer-b", "start": 2, "end": 4},
    ]
    clock.now += 0.5
    entry.token()  # the first token, half a second after the start
    clock.now += 1.0
    entry.token()
    entry.token()  # two more in one second after the first
    # peer-b fails: the live route changes at once
    model.recoveries.append(
        {"peer_id": "peer-b", "reason": "stream reset" * 50, "from_layer": 2, "seconds": 0.1}
    )
    model.hops[1] = ("peer-c", 2, 4)
    model.chained = False
    (row,) = record.list()
    assert row["ttft_s"] == 0.5 and row["tokens"] == 3 and row["tokens_per_s"] == 2.0
    assert row["route"][1] == {"peer": "peer-c", "start": 2, "end": 4}
    assert row["failovers"] == 1 and row["forwarding"] == "relayed"
    (failed,) = row["failed"]
    assert failed["peer"] == "peer-b" and failed["from_layer"] == 2
    assert len(failed["reason"]) == 200  # bounded
    assert row["seconds"] == 1.5

    entry.end(FakeJob("job1"))
    model.hops[0] = ("peer-z", 0, 2)  # the model is not read after the end
    clock.now += 10
    (row,) = record.list()
    assert row["state"] == "done" and row["route"][0]["peer"] == "peer-a"
    assert row["seconds"] == 1.5 and row["failovers"] == 1
    assert ended == [("done", 1)]
    entry.end(FakeJob("job1"))  # once only
    assert ended == [("done", 1)]


async def test_failed_and_cancelled_and_many_failovers():
    record = RecentGenerations(clock=Clock())
    model = FakeModel([("a", 0, 4)])
    model.recoveries = [{"peer_id": f"p{i}", "reason": "x"} for i in range(40)]
    record.begin("j1", "tiny", model, prompt_tokens=1, paid=True).end(FakeJob("j1", "no route"))
    job = FakeJob("j2")
    job.scope.cancel()
    record.begin("j2", "tiny", FakeModel([("a", 0, 4)]), prompt_tokens=1, paid=False).end(job)
    cancelled, failed = record.list()
    assert cancelled["state"] == "cancelled" and cancelled["error"] is None
    assert failed["state"] == "failed" and failed["error"] == "no route" and failed["paid"]
    assert failed["failovers"] == 40 and len(failed["failed"]) == MAX_FAILOVERS
    assert failed["failed"][-1]["peer"] == "p39"  # the latest ones are shown


async def test_bounded_oldest_finished_go_first_and_filters():
    record = RecentGenerations(cap=4, clock=Clock())
    entries = {}
    for i in range(4):
        model = "tiny" if i % 2 else "big"
        entries[i] = record.begin(f"j{i}", model, FakeModel([]), prompt_tokens=1, paid=False)
    entries[2].end(FakeJob("j2"))
    record.begin("j4", "tiny", FakeModel([]), prompt_tokens=1, paid=False)
    assert [g["job"] for g in record.list()] == ["j4", "j3", "j1", "j0"]  # j2 had finished
    record.begin("j5", "tiny", FakeModel([]), prompt_tokens=1, paid=False)  # all running
    assert [g["job"] for g in record.list()] == ["j5", "j4", "j3", "j1"]
    assert len(record) == 4
    assert [g["job"] for g in record.list(2)] == ["j5", "j4"]
    assert [g["job"] for g in record.list(model="tiny")] == ["j5", "j4", "j3", "j1"]
    entries[3].end(FakeJob("j3"))
    assert [g["job"] for g in record.list(state="done")] == ["j3"]
    assert record.list(model="big") == []
    with pytest.raises(ValueError):
        RecentGenerations(cap=0)


async def test_a_service_without_a_record_records_nothing():
    entry = begin(object(), "j", "tiny", FakeModel([]), 1, False)
    assert not isinstance(entry, Generation)
    entry.token()
    entry.end(FakeJob("j"))  # no error, nothing kept
    service = type("Service", (), {"generations": RecentGenerations(clock=Clock())})()
    recorded = begin(service, "j", "tiny", FakeModel([("a", 0, 4)]), 1, False)
    assert isinstance(recorded, Generation) and len(service.generations) == 1


@pytest.fixture
def _inline(monkeypatch):
    inline_threads(monkeypatch)


async def test_a_generations_failover_on_whole_daemons(autojump_clock, tmp_path, _inline):
    """A client and two servers of the whole model: the route's server is killed at the
    3rd token; generation_list shows the live route before, then the other server, one
    failover naming the killed peer, and the tokens; /metrics counts it."""
    pytest.importorskip("torch")
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    async with memory_cluster(tmp_path / "net", 3) as net:
        client, s1, s2 = net.daemons
        await net.deploy(model_dir, [s1, s2], [(0, LAYERS), (0, LAYERS)])
        job = (
            await client.call(
                "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": 12, "stream": True}
            )
        )["job"]
        seen: dict = {}

        def kill() -> None:  # as the 3rd token arrives: note the live record, kill the server
            (live,) = client.daemon.shards.generations.list()
            seen.update(live)
            net.kill(next(d for d in (s1, s2) if d.peer_id == live["route"][0]["peer"]))

        client.at_token(job, 3, kill)

        async def finished() -> dict | None:
            state = await client.call("generate_poll", {"job": job})
            return state if state["done"] else None

        state = await net.wait_for(finished, 60, "the generation to end")
        assert state["error"] is None and len(state["recoveries"]) == 1
        assert seen["state"] == "running" and seen["job"] == job and seen["tokens"] == 2
        killed = seen["route"][0]["peer"]
        assert seen["route"] == [{"peer": killed, "start": 0, "end": LAYERS}]
        assert seen["ttft_s"] is not None and seen["failovers"] == 0

        listed = await client.call("generation_list", {"model": "tiny", "limit": 5})
        assert listed["kept"] == 1 and listed["max_kept"] == 64
        (row,) = listed["generations"]
        survivor = s2.peer_id if killed == s1.peer_id else s1.peer_id
        assert row["route"] == [{"peer": survivor, "start": 0, "end": LAYERS}]
        assert row["state"] == "done" and row["tokens"] == len(state["tokens"])
        assert row["failovers"] == 1 and row["failed"][0]["peer"] == killed
        assert row["failed"][0]["from_layer"] == 0 and row["tokens_per_s"] is not None
        assert row["prompt_tokens"] == len(PROMPT) and row["paid"] is False
        assert (await client.call("generation_list", {"state": "running"}))["generations"] == []
        assert client.metric("gridmesh_generations_total", outcome="done") == 1
        assert client.metric("gridmesh_generation_failovers_total") == 1

        # bounded parameters, refused with -32602 and counted
        for bad in ({"limit": 0}, {"limit": 65}, {"state": "bogus"}, {"model": ""}, {"x": 1}):
            with pytest.raises(RPCCallError) as err:
                await client.call("generation_list", bad)
            assert err.value.code == -32602, bad
        refused = client.metric("gridmesh_rpc_requests_total", method="generation_list")
        assert refused == 7  # 2 answered, 5 refused
