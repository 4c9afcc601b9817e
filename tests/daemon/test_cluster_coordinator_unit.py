"""The coordinator and a member's side with small fakes of the runtime, shard service,
directory and registry: what members do with commands, refusals, the table's bounds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import trio

from daemon.cluster import coordinator_wire as wire
from daemon.cluster.coordinator import ClusterCoordinator, CoordinatorSettings
from daemon.cluster.coordinator_member import TableFile
from daemon.errors import FailedPrecondition
from daemon.shards.jobs import ShardServiceError
from p2p import codec
from p2p.network import NetworkError
from registry.sync import Entries

ME = "me"
C = "lab"


class FakeRuntime:
    def __init__(self, members: dict[str, str], *, coordinating: bool = True) -> None:
        self.members = members
        self.coordinating = coordinating
        self.sent: list[tuple[str, dict, frozenset[str] | None]] = []
        self.refuse: dict[str, str] = {}  # peer -> why it refuses commands
        self.handlers: dict[str, Any] = {}

    def coordinator(self, cluster: str) -> tuple[str | None, int]:
        return (ME if self.coordinating else "boss"), 3

    def is_coordinator(self, cluster: str) -> bool:
        return self.coordinating

    def member_states(self, cluster: str) -> dict[str, str]:
        return dict(self.members)

    def clusters(self) -> list[str]:
        return [C]

    async def command(self, cluster, action, body, to=None) -> dict[str, str | None]:
        self.sent.append((action, body, None if to is None else frozenset(to)))
        targets = to if to is not None else [p for p in self.members if p != ME]
        return {p: self.refuse.get(p) for p in targets}

    def on_command(self, action, handler) -> None:
        self.handlers[action] = handler

    def on_member_dead(self, handler) -> None:
        pass


class FakeShards:
    def __init__(self, *, allow: bool = True, fail: bool = False) -> None:
        self.ident = SimpleNamespace(peer_id=ME)
        self.net = SimpleNamespace(
            peers={}, set_request_handler=lambda *a, **k: None, request=self._request
        )
        self.allow_remote_deploy = allow
        self.fail = fail
        self.blocks: dict[str, tuple[int, int]] = {}
        self.loads: list[tuple] = []

    async def _request(self, *args: Any, **kwargs: Any) -> bytes:
        raise NetworkError("no network in these tests: no member answers")

    def local_block(self, model: str) -> Any:
        rng = self.blocks.get(model)
        return None if rng is None else SimpleNamespace(start=rng[0], end=rng[1])

    async def load(self, model, model_dir, start, end, dtype) -> dict:
        if self.fail:
            raise ShardServiceError("bad_model", "no such checkpoint")
        if model in self.blocks:
            raise ShardServiceError("already_loaded", "undeploy first")
        self.blocks[model] = (start, end)
        self.loads.append((model, model_dir, start, end, dtype))
        return {}

    async def unload(self, model: str) -> bool:
        return self.blocks.pop(model, None) is not None


def record(peer: str, free: int = 10_000) -> SimpleNamespace:
    return SimpleNamespace(
        peer_id=peer,
        resources={"memory": {"available_bytes": free}, "accepts_deploys": True},
    )


def coordinator(
    runtime: FakeRuntime, shards: FakeShards, records=(), tables: TableFile | None = None
) -> ClusterCoordinator:
    rejected: list[str] = []

    async def find() -> list:
        return list(records)

    made = ClusterCoordinator(
        runtime=runtime,  # type: ignore[arg-type]
        shards=shards,  # type: ignore[arg-type]
        directory=SimpleNamespace(find=find),  # type: ignore[arg-type]
        replica=SimpleNamespace(entries=Entries()),  # type: ignore[arg-type]
        on_reject=rejected.append,
        settings=CoordinatorSettings(assign_timeout_s=5.0, failed_cooldown_s=60.0),
        tables=tables,
    )
    made.rejected = rejected  # type: ignore[attr-defined]
    return made


def spec(model: str = "m", model_dir: str = "/models/m", **kw) -> wire.DeploySpec:
    return wire.DeploySpec(model, model_dir, wire.ModelShape(4, 1000, 0, 0), **kw)


async def test_a_member_loads_what_it_is_assigned_and_refuses_what_it_may_not():
    runtime, shards = FakeRuntime({ME: "alive"}, coordinating=False), FakeShards()
    member = coordinator(runtime, shards)
    order = wire.to_body(wire.AssignBody("m", "/models/m", 0, 2))
    await runtime.handlers[wire.ASSIGN](C, "boss", order)
    assert shards.blocks == {"m": (0, 2)}
    # another range of the same model: the old one goes first (one range per model)
    await runtime.handlers[wire.ASSIGN](C, "boss", {**order, "start": 2, "end": 4})
    assert shards.blocks == {"m": (2, 4)}
    # a release of another range leaves it; of this one, unloads
    await runtime.handlers[wire.RELEASE](C, "boss", {"model": "m", "start": 0, "end": 2})
    assert shards.blocks == {"m": (2, 4)}
    await runtime.handlers[wire.RELEASE](C, "boss", {"model": "m", "start": 2, "end": 4})
    assert shards.blocks == {}
    # odd bodies, a signer other than the coordinator known here, a node closed to deploys
    await runtime.handlers[wire.ASSIGN](C, "boss", {"model": "m", "start": 0})
    await runtime.handlers[wire.ASSIGN](C, "mallory", order)
    shards.allow_remote_deploy = False
    await runtime.handlers[wire.ASSIGN](C, "boss", order)
    shards.allow_remote_deploy, shards.fail = True, True
    await runtime.handlers[wire.ASSIGN](C, "boss", order)
    assert shards.blocks == {}
    assert member.rejected == [  # type: ignore[attr-defined]
        "assign_bad_body",
        "assign_not_the_coordinator",
        "assign_forbidden",
        "assign_failed",
    ]


async def test_a_member_keeps_the_newest_table():
    runtime = FakeRuntime({ME: "alive"}, coordinating=False)
    member = coordinator(runtime, FakeShards())
    table = runtime.handlers[wire.DEPLOYMENTS]
    newer = wire.to_body(wire.TableBody(3, 5, [wire.Deployment(spec(), 1)]))
    older = wire.to_body(wire.TableBody(2, 9, []))
    await table(C, "boss", newer)
    await table(C, "boss", older)
    assert list(member.tables[C].deployments) == ["m"]
    await table(C, "boss", {"term": 4, "version": "x", "deployments": []})
    assert member.tables[C].term == 3
    reply = codec.decode(member.member.table_reply(C))
    assert reply["table"]["version"] == 5


async def test_a_refused_assignment_is_placed_elsewhere_and_a_shortfall_explained(
    autojump_clock,
):
    runtime = FakeRuntime({ME: "alive", "a": "alive", "b": "alive", "dead": "dead"})
    runtime.refuse["a"] = "unreachable"
    shards = FakeShards()
    records = [record("a", 50_000), record("b", 20_000), record("dead", 90_000)]
    boss = coordinator(runtime, shards, records)
    result = await boss.deploy(C, spec(), wait_s=0.0)
    assigns = [(body["start"], to) for action, body, to in runtime.sent if action == wire.ASSIGN]
    # a scores best (most memory) but refuses; b takes the range; the dead member never asked
    assert assigns == [(0, frozenset({"a"})), (0, frozenset({"b"}))]
    assert result["ok"] is False  # nothing announced yet
    assert [s["state"] for s in result["servers"]] == ["assigned"]
    actions = [e["action"] for e in result["events"]]
    assert actions == ["deploy", "assign", "assign_refused", "assign"]
    # a gave no answer, so it may have the order all the same: its range is released, so
    # that it unloads it once loaded rather than serve a copy beside b's
    releases = [(b["start"], b["end"], to) for action, b, to in runtime.sent if action == "release"]
    assert releases == [(0, 4, frozenset({"a"}))]
    # b never announces: given up after the timeout, left out; nobody else can hold it
    await trio.sleep(6)
    await boss.reconcile(C)
    status = boss.status(C, "m")
    assert [e["action"] for e in status["events"]][-2:] == ["give_up", "stuck"]
    assert "layers 0..4" in status["events"][-1]["reason"]
    assert boss.placements(C)[0]["target"] == 1


async def test_the_table_is_bounded_by_one_command():
    runtime = FakeRuntime({ME: "alive"})
    boss = coordinator(runtime, FakeShards())
    long_dir = "/" + "d" * 4000
    with pytest.raises(FailedPrecondition, match="would not fit one command"):
        for i in range(wire.MAX_DEPLOYMENTS):
            await boss.deploy(C, spec(f"m{i}", long_dir), wait_s=0.0)
    assert 10 < len(boss.tables[C].deployments) < wire.MAX_DEPLOYMENTS
    before = len(boss.tables[C].deployments)
    with pytest.raises(FailedPrecondition):
        await boss.deploy(C, spec("one-more", long_dir), wait_s=0.0)
    assert len(boss.tables[C].deployments) == before


async def test_tables_survive_a_restart_on_disk_and_a_bad_file_is_set_aside(tmp_path):
    path = tmp_path / "cluster-deployments.json"
    runtime = FakeRuntime({ME: "alive"})
    boss = coordinator(runtime, FakeShards(), tables=TableFile(path))
    await boss.deploy(C, spec(), wait_s=0.0)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    again = coordinator(
        FakeRuntime({ME: "alive"}, coordinating=False), FakeShards(), tables=TableFile(path)
    )
    assert list(again.tables[C].deployments) == ["m"]
    assert again.tables[C].version == boss.tables[C].version
    # a member stores what its coordinator sends
    member_path = tmp_path / "member.json"
    runtime = FakeRuntime({ME: "alive"}, coordinating=False)
    coordinator(runtime, FakeShards(), tables=TableFile(member_path))
    body = wire.to_body(wire.TableBody(7, 1, [wire.Deployment(spec("x"), 2)]))
    await runtime.handlers[wire.DEPLOYMENTS](C, "boss", body)
    assert TableFile(member_path).load()[C].deployments["x"].target == 2
    # unreadable files and entries are ignored, never fatal
    path.write_text("{not json")
    assert TableFile(path).load() == {}
    path.write_text('{"lab": {"term": "x"}, "ok": {"term": 1, "version": 2, "deployments": []}}')
    assert list(TableFile(path).load()) == ["ok"]


async def test_a_member_that_cannot_load_says_so_and_the_range_goes_elsewhere_at_once(
    autojump_clock, monkeypatch
):
    runtime = FakeRuntime({ME: "alive", "a": "alive", "b": "alive"})
    boss = coordinator(runtime, FakeShards(), [record("a", 50_000), record("b", 20_000)])
    await boss.deploy(C, spec(), wait_s=0.0)
    assert [to for action, _, to in runtime.sent if action == wire.ASSIGN] == [frozenset({"a"})]
    # a member's side: the load fails, and it tells the coordinator that signed the order
    told: list[tuple[str, bytes]] = []

    async def tell(peer: str, payload: bytes) -> None:
        told.append((peer, payload))

    member = FakeRuntime({"a": "alive"}, coordinating=False)
    side = coordinator(member, FakeShards(fail=True))
    side.member._tell = tell
    order = wire.to_body(wire.AssignBody("m", "/models/m", 0, 4))
    await member.handlers[wire.ASSIGN](C, "boss", order)
    ((peer, payload),) = told
    report = wire.decode_request(payload)
    assert peer == "boss" and isinstance(report, wire.LoadFailed)
    assert (report.model, report.start, report.end) == ("m", 0, 4)
    assert "no such checkpoint" in report.error
    # the coordinator takes it from the member it assigned the range to, and places it again
    view = SimpleNamespace(members={"a": 1, "b": 1, "x": 1})
    monkeypatch.setattr("daemon.cluster.coordinator.cluster_view", lambda replica, name: view)
    answer = codec.decode(await boss._on_request("a", payload))
    assert answer["ok"] is True
    # a report nobody asked for (another member, or the same one again) is counted only
    assert codec.decode(await boss._on_request("x", payload))["ok"] is True
    assert codec.decode(await boss._on_request("a", payload))["ok"] is True
    assert boss.rejected.count("request_unexpected") == 2  # type: ignore[attr-defined]
    events = boss.status(C, "m")["events"]
    assert events[-1]["action"] == "load_failed" and "no such checkpoint" in events[-1]["reason"]
    await boss.reconcile(C)
    assigns = [to for action, _, to in runtime.sent if action == wire.ASSIGN]
    assert assigns == [frozenset({"a"}), frozenset({"b"})]
