"""A cluster's coordinator through whole daemons on the in-memory network (virtual time): a
block deployed through the coordinator from another member, a member serving a range killed
and its layers re-placed with the generation still giving one process's tokens; forged
commands and requests from outside the cluster refused and counted."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from daemon.api.client import RPCCallError
from daemon.cluster import coordinator_wire as wire
from p2p import codec
from p2p.identity import NodeIdentity
from scheduler import election_wire
from scheduler.election_wire import TermProof, Vote
from scheduler.fencing import sign_command, sign_vote
from tests.daemon.harness import RESOURCES, MemoryCluster, RunningDaemon, inline_threads

pytest.importorskip("torch")

LAYERS = 6
PROMPT = list(b"a cluster of shards")
NEW_TOKENS = 16
CLUSTER = "lab"


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


@pytest.fixture
def one_torch_thread():
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


def small_memory(model_dir: Path):
    """Resources whose free memory holds about a third of the tiny model: placement must
    split it over three members."""
    from daemon.shards.model import LlamaConfig, model_spec
    from scheduler.model_memory import LayerCosts

    config = LlamaConfig.from_dir(model_dir)
    whole = LayerCosts.of(model_spec(config, "tiny")).total  # weights and KV-cache reserve
    free = int(whole / 0.9 / 2.5)

    def detect(home: Path) -> dict[str, Any]:
        return {**RESOURCES, "memory": {"total_bytes": 8 << 30, "available_bytes": free}}

    return detect


@asynccontextmanager
async def lab(root: Path, count: int, detect: Any) -> AsyncIterator[MemoryCluster]:
    """`count` whole daemons in one open cluster, every one a voter, a coordinator elected."""
    async with trio.open_nursery() as nursery:
        net = MemoryCluster(root, nursery, detect_resources=detect)
        net.hub.epoch = time.time() - trio.current_time()  # registry and records: one clock
        await net.start(count)
        await net.wait_for(net.all_found, 60, f"all {count} daemons to find each other")
        first, *others = net.daemons
        await first.call("cluster_create", {"name": CLUSTER, "admission": "open"})

        async def known_everywhere() -> bool:
            for d in others:
                try:
                    await d.call("cluster_members", {"name": CLUSTER})
                except RPCCallError:
                    return False
            return True

        await net.wait_for(known_everywhere, 30, "the cluster to reach every daemon")
        for d in others:
            await d.call("cluster_join", {"name": CLUSTER, "role": "voter"})
        await coordinator_agreed(net, count)
        try:
            yield net
        finally:
            nursery.cancel_scope.cancel()


async def coordinator_agreed(
    net: MemoryCluster, members: int, gone: tuple[RunningDaemon, ...] = ()
) -> RunningDaemon:
    """The coordinator every running member (but `gone`) knows, once they agree."""
    live = [d for d in net.daemons if not d.stopped.is_set() and d not in gone]

    async def agreed() -> RunningDaemon | None:
        seen = {d.daemon.clusters.coordinator(CLUSTER)[0] for d in live}
        sizes = {len(d.daemon.clusters.member_states(CLUSTER)) for d in live}
        if len(seen) != 1 or None in seen or sizes != {members}:
            return None
        leader = seen.pop()
        return next((d for d in live if d.peer_id == leader), None)

    return await net.wait_for(agreed, 60, "one coordinator known to every member")


def served(net: MemoryCluster, by: RunningDaemon) -> list[tuple[int, int, str]]:
    """The live ranges of the model `by` sees announced."""
    live = {d.peer_id for d in net.daemons if not d.stopped.is_set()}
    return sorted(
        (s["start"], s["end"], s["peer_id"])
        for s in by.daemon.shards.announced("tiny")
        if s["peer_id"] in live
    )


def covered_once(ranges: list[tuple[int, int, str]]) -> bool:
    counts = [0] * LAYERS
    for start, end, _ in ranges:
        for layer in range(start, end):
            counts[layer] += 1
    return counts == [1] * LAYERS


async def test_deploy_through_the_coordinator_then_heal_a_killed_member(
    autojump_clock, tmp_path, one_torch_thread
):
    torch = one_torch_thread
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, NEW_TOKENS)
    async with lab(tmp_path / "net", 5, small_memory(model_dir)) as net:
        leader = await coordinator_agreed(net, 5)
        asker = next(d for d in net.daemons if d is not leader)
        # a dry run first: every member scored, by term
        plan = await asker.call(
            "cluster_plan", {"name": CLUSTER, "model_dir": str(model_dir), "model": "tiny"}
        )
        assert plan["coordinator"] == leader.peer_id
        assert len(plan["scores"]) == 5 and len(plan["assignments"]) == 3
        assert set(plan["scores"][0]["terms"]) == {
            "memory",
            "throughput",
            "rtt",
            "energy",
            "carbon",
        }
        assert "ms_per_layer" in plan["scores"][0]["assumed"]  # nothing served yet
        # what the members' records say: no GPUs (0 W), no declared price; measured RTTs
        for score in plan["scores"]:
            assert score["inputs"]["gpu_power_w"] == 0.0, score
            assert "gpu_power_w" not in score["assumed"]
            assert "energy_price_per_kwh" in score["assumed"]
        assert all(s["inputs"]["mean_rtt_ms"] < 50 for s in plan["scores"]), plan["scores"]
        # the deploy, asked of a member that is not the coordinator: forwarded to it
        result = await asker.call(
            "cluster_deploy",
            {"name": CLUSTER, "model": "tiny", "model_dir": str(model_dir), "wait_s": 30},
        )
        assert result["ok"], result["events"]
        assert result["coordinator"] == leader.peer_id
        ranges = [(s["start"], s["end"], s["peer_id"]) for s in result["servers"]]
        assert covered_once(ranges) and len(ranges) == 3, ranges
        assert [e["action"] for e in result["events"]].count("assign") == 3

        async def seen_by_all() -> bool:
            return all(covered_once(served(net, d)) for d in net.daemons)

        await net.wait_for(seen_by_all, 15, "every daemon to see the three ranges")
        # every member keeps the coordinator's deployment table (for the next coordinator)
        rows = asker.daemon.coordinator.placements(CLUSTER)
        assert [r["model"] for r in rows] == ["tiny"] and rows[0]["target"] == 1
        client = next(d for d in net.daemons if d.peer_id not in {r[2] for r in ranges})
        whole = await client.call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}
        )
        assert whole["tokens"] == expected
        # kill a member holding a range (not the coordinator): its layers are placed again
        victim_id = next(p for _, _, p in ranges if p != leader.peer_id)
        lost = next((a, b) for a, b, p in ranges if p == victim_id)
        victim = next(d for d in net.daemons if d.peer_id == victim_id)
        killed_at = trio.current_time()
        net.kill(victim)

        async def healed() -> list[tuple[int, int, str]] | None:
            now = served(net, leader)
            return now if covered_once(now) and victim_id not in {p for *_, p in now} else None

        now = await net.wait_for(healed, 30, "the lost range to be placed again")
        heal_s = trio.current_time() - killed_at
        replaced = [r for r in now if r not in ranges]
        assert [(a, b) for a, b, _ in replaced] == [lost], (now, ranges)
        events = leader.daemon.coordinator.status(CLUSTER, "tiny")["events"]
        assert any(
            e["action"] == "assign" and f"{lost[0]}..{lost[1]} to" in e["reason"] for e in events
        ), events
        print(f"the lost range served again {heal_s:.2f} s (virtual) after the kill")
        if client.peer_id == victim_id:
            client = leader
        again = await client.call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}
        )
        assert again["tokens"] == expected
        assert victim_id not in [h["peer_id"] for h in again["route"]]


async def test_forged_commands_and_outsiders_requests_are_refused(autojump_clock, tmp_path):
    async with lab(tmp_path / "net", 3, None) as net:
        leader = await coordinator_agreed(net, 3)
        forger, target = [d for d in net.daemons if d is not leader]
        term = leader.daemon.clusters.coordinator(CLUSTER)[1]
        before = sum(target.daemon.clusters.fence.refused.values())
        order = codec.encode(wire.to_body(wire.AssignBody("evil", "/etc", 0, 1)))

        async def send(cmd: election_wire.Command) -> str | None:
            raw = await forger.daemon.net.request(
                target.peer_id, election_wire.COMMAND_PROTOCOL, election_wire.encode(cmd)
            )
            return codec.decode(raw)["refused"]

        # a voter that is not the coordinator signs an assign in the coordinator's term
        forged = sign_command(forger.daemon.ident, CLUSTER, term, 1, wire.ASSIGN, order)
        assert await send(forged) == "not_coordinator"
        # one signed with the coordinator's name but the forger's key
        named = election_wire.Command(**{**_fields(forged), "signer": leader.peer_id})
        assert await send(named) == "bad_signature"
        # the coordinator's own command, replayed
        table = wire.to_body(wire.TableBody(term, 1, []))
        real = leader.daemon.clusters.election_driver(CLUSTER).sign_next_command(
            wire.DEPLOYMENTS, codec.encode(table)
        )
        assert await send(real) is None
        assert await send(real) == "replayed_seq"
        assert sum(target.daemon.clusters.fence.refused.values()) == before + 3
        # the forger claims a term it never won, with no proof of it: the fence refuses it
        # (test_a_voter_cannot_claim_a_term_it_never_won tries proofs of every kind)
        ahead = sign_command(forger.daemon.ident, CLUSTER, term + 1, 1, wire.ASSIGN, order)
        assert await send(ahead) == "no_term_proof"
        await trio.sleep(1)  # virtual time: a second in which nothing may load "evil"
        assert target.daemon.shards.local_block("evil") is None
        # an outsider (no member of the cluster) asking the coordinator directly
        outsider = await net.add(tmp_path / "outsider", [leader.addr])
        await net.wait_for(net.all_found, 60, "the outsider to be found")
        spec = wire.DeploySpec("tiny", "/nowhere", wire.ModelShape(2, 10, 10, 10))
        request = wire.encode_request(wire.DeployRequest(CLUSTER, spec))
        raw = await outsider.daemon.net.request(leader.peer_id, wire.COORDINATOR_PROTOCOL, request)
        reply = codec.decode(raw)
        assert reply["ok"] is False and reply["reason"] == "not_member"
        for garbage in (b"\xc1" * 10, codec.encode({"op": "deploy", "cluster": 7}), b"x" * 20000):
            raw = await forger.daemon.net.request(
                leader.peer_id, wire.COORDINATOR_PROTOCOL, garbage
            )
            assert codec.decode(raw)["ok"] is False
        for reason in ("not_member", "malformed", "bad_request", "too_large"):
            count = leader.metric("gridmesh_rejected_messages_total", reason=f"request_{reason}")
            assert count == 1, reason
        # the outsider's RPC says there is no coordinator it knows of
        with pytest.raises(RPCCallError) as err:
            await outsider.call("cluster_undeploy", {"name": CLUSTER, "model": "tiny"})
        assert "no coordinator" in err.value.message
        assert not leader.stopped.is_set() and not target.stopped.is_set()


def _fields(cmd: election_wire.Command) -> dict[str, Any]:
    return {f: getattr(cmd, f) for f in cmd.__struct_fields__}


async def test_a_new_coordinator_adopts_the_table_and_heals(
    autojump_clock, tmp_path, one_torch_thread
):
    """The coordinator is killed: the next one takes the deployment table the members keep,
    and heals the range the old coordinator served (or, if it served none, the range of a
    member killed next)."""
    torch = one_torch_thread
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, NEW_TOKENS)
    async with lab(tmp_path / "net", 5, small_memory(model_dir)) as net:
        old = await coordinator_agreed(net, 5)
        result = await old.call(
            "cluster_deploy",
            {"name": CLUSTER, "model": "tiny", "model_dir": str(model_dir), "wait_s": 30},
        )
        assert result["ok"], result["events"]
        ranges = [(s["start"], s["end"], s["peer_id"]) for s in result["servers"]]
        holders = {p for *_, p in ranges}
        net.kill(old)
        new = await coordinator_agreed(net, 5, gone=(old,))  # (the dead one is still a member)
        victim = old
        if old.peer_id not in holders:  # then a member serving a range dies too
            victim = next(d for d in net.daemons if d.peer_id in holders and d is not new)
            net.kill(victim)

        async def healed() -> list[tuple[int, int, str]] | None:
            now = served(net, new)
            return now if covered_once(now) and victim.peer_id not in {p for *_, p in now} else None

        await net.wait_for(healed, 30, "the new coordinator to heal the lost range")
        events = new.daemon.coordinator.status(CLUSTER, "tiny")["events"]
        assert [e["action"] for e in events][:1] == ["adopt"], events
        assert new.daemon.coordinator.placements(CLUSTER)[0]["target"] == 1
        client = next(d for d in net.daemons if not d.stopped.is_set())
        again = await client.call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}
        )
        assert again["tokens"] == expected


async def test_load_adds_a_copy_and_idleness_removes_it_never_below_the_minimum(
    autojump_clock, tmp_path
):
    from daemon.cluster.coordinator_state import ScalingSettings
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    async with lab(tmp_path / "net", 4, None) as net:
        leader = await coordinator_agreed(net, 4)
        leader.daemon.coordinator.scaling = ScalingSettings(up_after_s=5, down_after_s=10)
        result = await leader.call(
            "cluster_deploy",
            {
                "name": CLUSTER,
                "model": "tiny",
                "model_dir": str(model_dir),
                "min_instances": 1,
                "max_instances": 2,
                "wait_s": 30,
            },
        )
        assert result["ok"] and result["target"] == 1, result
        assert len(result["servers"]) == 1  # the whole model fits one member

        async def set_load(util: float) -> None:
            for d in net.daemons:
                shards = d.daemon.shards
                if shards.local_block("tiny") is not None:
                    shards.measure_load = lambda: None  # as measured: `util`
                    shards.utilisation = util
                    await shards.refresh_announcements()

        await set_load(0.95)

        async def copies(n: int) -> list | None:
            now = served(net, leader)
            return now if len(now) == n and covered_twice_or_once(now, n) else None

        await net.wait_for(lambda: copies(2), 60, "a second copy under load")
        target_events = [
            e
            for e in leader.daemon.coordinator.status(CLUSTER, "tiny")["events"]
            if e["action"] == "scale"
        ]
        assert "1 -> 2: busy for" in target_events[-1]["reason"], target_events
        assert leader.daemon.coordinator.placements(CLUSTER)[0]["target"] == 2
        await set_load(0.0)
        await net.wait_for(lambda: copies(1), 60, "one copy released when idle")
        events = leader.daemon.coordinator.status(CLUSTER, "tiny")["events"]
        assert any(e["action"] == "scale" and "2 -> 1: idle" in e["reason"] for e in events)
        assert any(e["action"] == "release" for e in events)
        # idle for much longer: never below the minimum
        await trio.sleep(60)  # virtual time: a minute of idleness, checked after
        assert len(served(net, leader)) == 1
        assert leader.daemon.coordinator.placements(CLUSTER)[0]["target"] == 1
        # undeployed, asked of another member: released, and gone from every member's table
        other = next(d for d in net.daemons if d is not leader)
        undone = await other.call("cluster_undeploy", {"name": CLUSTER, "model": "tiny"})
        assert list(undone["released"].values()) == [None]

        async def gone() -> bool:
            tables = [d.daemon.coordinator.placements(CLUSTER) for d in net.daemons]
            return not served(net, leader) and tables == [[]] * len(net.daemons)

        await net.wait_for(gone, 10, "the block released and forgotten everywhere")
        with pytest.raises(RPCCallError) as err:
            await other.call("cluster_undeploy", {"name": CLUSTER, "model": "tiny"})
        assert "not deployed" in err.value.message


def covered_twice_or_once(ranges: list[tuple[int, int, str]], n: int) -> bool:
    counts = [0] * LAYERS
    for start, end, _ in ranges:
        for layer in range(start, end):
            counts[layer] += 1
    return counts == [n] * LAYERS


async def test_a_generation_in_flight_goes_on_and_the_lost_copy_is_placed_again(
    autojump_clock, tmp_path, one_torch_thread
):
    """Two copies: the server of one is killed mid-generation; the client fails over to the
    other copy (exact tokens), and the coordinator places a second copy again, unasked."""
    torch = one_torch_thread
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    new_tokens = 48
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, new_tokens)
    async with lab(tmp_path / "net", 5, None) as net:
        leader = await coordinator_agreed(net, 5)
        params = {"name": CLUSTER, "model": "tiny", "model_dir": str(model_dir), "replicas": 2}
        result = await leader.call("cluster_deploy", {**params, "wait_s": 30})
        assert result["ok"] and len(result["servers"]) == 2, result
        holders = {s["peer_id"] for s in result["servers"]}
        client = next(d for d in net.daemons if d.peer_id not in holders and d is not leader)
        job = (
            await client.call(
                "generate",
                {"model": "tiny", "token_ids": PROMPT, "max_tokens": new_tokens, "stream": True},
            )
        )["job"]
        killed: list[str] = []

        def kill() -> None:  # the server of the route (maybe the coordinator), at token 3
            serving = client.daemon.shards.jobs[job].route[0]["peer_id"]
            killed.append(serving)
            net.kill(next(d for d in net.daemons if d.peer_id == serving))

        client.at_token(job, 3, kill)

        async def finished() -> dict | None:
            state = await client.call("generate_poll", {"job": job})
            return state if state["done"] else None

        state = await net.wait_for(finished, 60, "the generation to end")
        assert state["error"] is None and state["tokens"] == expected
        assert killed and killed[0] not in [h["peer_id"] for h in state["route"]]
        if not state["recoveries"]:
            pytest.fail(f"the kill came too late to test failover: {state['n_tokens']} tokens")
        assert [r["peer_id"] for r in state["recoveries"]] == killed

        async def two_copies_again() -> bool:
            now = served(net, client)
            return len(now) == 2 and killed[0] not in {p for *_, p in now}

        await net.wait_for(two_copies_again, 30, "a second copy placed again")


async def test_members_that_cannot_load_say_so_and_the_block_lands_on_one_that_can(
    autojump_clock, tmp_path
):
    from daemon.shards.jobs import ShardServiceError
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)

    def detect(home: Path) -> dict[str, Any]:  # node1 scores last: the least free memory
        free = (1 if home.name == "node1" else 6) << 30
        return {**RESOURCES, "memory": {"total_bytes": 8 << 30, "available_bytes": free}}

    async with lab(tmp_path / "net", 4, detect) as net:
        good = net.daemons[1]
        leader = await coordinator_agreed(net, 4)
        everyone = {d.peer_id for d in net.daemons}

        async def all_records_known() -> bool:  # a member without one is left out, untried
            found = await leader.daemon.coordinator.directory.find()
            return {r.peer_id for r in found} >= everyone

        await net.wait_for(all_records_known, 30, "the coordinator to know every record")

        async def no_checkpoint(*args: Any, **kwargs: Any) -> dict:
            raise ShardServiceError("bad_model", "no checkpoint at that path here")

        for d in net.daemons:
            if d is not good:
                d.daemon.shards.load = no_checkpoint
        # as block_deploy's `cluster` param would call it
        deploy = leader.daemon.coordinator.rpc_deploy
        result = await deploy(name=CLUSTER, model="tiny", model_dir=str(model_dir), wait_s=30)
        # well within the 120 s an unannounced assignment is waited for
        assert result["ok"], result["events"]
        assert [s["peer_id"] for s in result["servers"]] == [good.peer_id]
        failed = [e for e in result["events"] if e["action"] == "load_failed"]
        assert len(failed) == 3, result["events"]  # every other member, tried first
        assert all("no checkpoint" in e["reason"] for e in failed)


async def test_a_voter_cannot_claim_a_term_it_never_won(autojump_clock, tmp_path):
    """A voter that is not the coordinator (buggy or hostile: it signs with its own node key
    and talks to the member itself) commands a term above the highest seen, each time with
    another kind of term proof. All are refused, counted by reason, and move no fence: the
    real coordinator's next command is still accepted (before term proofs, the first of them
    was taken, and the coordinator's commands were then refused as stale_term)."""
    async with lab(tmp_path / "net", 3, None) as net:
        leader = await coordinator_agreed(net, 3)
        forger, target = [d for d in net.daemons if d is not leader]
        term = leader.daemon.clusters.coordinator(CLUSTER)[1]
        fence = target.daemon.clusters.fence
        before = fence.state(CLUSTER)
        # named by the member only once proven to its fence (the coordinator's announcement)
        assert before.term == term and before.coordinator == leader.peer_id
        ahead = term + 1
        me, real, outsider = forger.daemon.ident, leader.peer_id, NodeIdentity.generate()

        def vote(ident: NodeIdentity, t: int = ahead, candidate: str = forger.peer_id) -> Vote:
            return Vote(ident.peer_id, sign_vote(ident, CLUSTER, t, candidate))

        real_proof = leader.daemon.clusters.election_driver(CLUSTER).term_proof()
        assert real_proof is not None and len(real_proof.votes) >= 2
        attacks = {
            "no proof": (None, "no_term_proof"),
            "its own vote only": ((vote(me),), "no_term_proof"),
            "its own vote and an outsider's": ((vote(me), vote(outsider)), "no_term_proof"),
            "its own vote twice": ((vote(me), vote(me)), "bad_term_proof"),
            "a vote in the coordinator's name, signed by the forger": (
                (vote(me), Vote(real, sign_vote(me, CLUSTER, ahead, forger.peer_id))),
                "bad_term_proof",
            ),
            "votes for another candidate": (
                (vote(me, candidate=real), Vote(real, sign_vote(me, CLUSTER, ahead, real))),
                "bad_term_proof",
            ),
            "the real coordinator's proof of the current term": (real_proof, "bad_term_proof"),
        }
        reasons = ("no_term_proof", "bad_term_proof")

        def refusals() -> dict[str, float]:
            return {
                r: target.metric("gridmesh_cluster_commands_refused_total", reason=r)
                for r in reasons
            }

        baseline = refusals()
        for seq, (what, (votes, reason)) in enumerate(attacks.items(), start=1):
            command = sign_command(me, CLUSTER, ahead, seq, wire.ASSIGN, b"\x80")
            if isinstance(votes, TermProof):
                proof: TermProof | None = votes
            else:
                proof = None if votes is None else TermProof(CLUSTER, ahead, me.peer_id, votes)
            command = msgspec.structs.replace(command, proof=proof)
            raw = await forger.daemon.net.request(
                target.peer_id, election_wire.COMMAND_PROTOCOL, election_wire.encode(command)
            )
            assert codec.decode(raw)["refused"] == reason, what
        assert fence.state(CLUSTER) == before
        refused = {r: n - baseline[r] for r, n in refusals().items()}
        # an honest coordinator may also meet one no_term_proof (a command sent without its
        # proof to a member that has not taken one yet: it is resent with it)
        assert refused["bad_term_proof"] == 4 and refused["no_term_proof"] >= 3, refused
        # a signed vote the forger sends unasked, with a bad signature: dropped and counted
        bogus = election_wire.VoteReply(CLUSTER, ahead, True, pre=False, proof=b"s" * 64)
        await forger.daemon.net.request(
            leader.peer_id, election_wire.ELECTION_PROTOCOL, election_wire.encode(bogus)
        )
        assert (
            leader.metric(
                "gridmesh_cluster_messages_refused_total",
                protocol="election",
                reason="bad_vote_signature",
            )
            == 1
        )
        # the real coordinator commands on, in its term
        results = await leader.daemon.clusters.command(
            CLUSTER, "noop", {}, to=[target.peer_id, forger.peer_id]
        )
        assert results == {target.peer_id: None, forger.peer_id: None}
        assert leader.daemon.clusters.coordinator(CLUSTER) == (real, term)
        assert not target.stopped.is_set() and not forger.stopped.is_set()


async def test_block_deploy_aimed_at_a_cluster_goes_through_its_coordinator(
    autojump_clock, tmp_path, one_torch_thread
):
    """`block_deploy` with `cluster`, on a member that does not coordinate: the coordinator
    places the block (it shows in its placements), the tokens are exact; a plan or node count
    with `cluster` is refused, naming the reason."""
    torch = one_torch_thread
    from daemon.shards.model import greedy_generate, load_model, make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    with torch.no_grad():
        expected = greedy_generate([load_model(model_dir)], PROMPT, NEW_TOKENS)
    async with lab(tmp_path / "net", 3, small_memory(model_dir)) as net:
        leader = await coordinator_agreed(net, 3)
        member = next(d for d in net.daemons if d is not leader)
        params = {"model": "tiny", "model_dir": str(model_dir), "cluster": CLUSTER}
        with pytest.raises(RPCCallError, match="coordinator places"):
            await member.call("block_deploy", {**params, "nodes": 2})
        result = await member.call("block_deploy", params)
        assert result["ok"], result
        assert covered_once(served(net, leader))
        assert leader.daemon.coordinator.placements(CLUSTER)[0]["model"] == "tiny"
        again = await member.call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}
        )
        assert again["tokens"] == expected


async def test_a_forwarded_request_whose_stream_breaks_is_sent_once_more(
    autojump_clock, tmp_path, one_torch_thread
):
    """The CI failure of session 6: the stream of a forwarded `cluster_deploy` ended
    (StreamEOF) under load. Deploy and plan (idempotent) are sent again to whoever
    coordinates then; undeploy (not idempotent) is not, and its error names the coordinator."""
    from daemon.shards.model import make_tiny
    from p2p.network import StreamClosed

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    async with lab(tmp_path / "net", 3, small_memory(model_dir)) as net:
        leader = await coordinator_agreed(net, 3)
        asker = next(d for d in net.daemons if d is not leader)
        coordinator = asker.daemon.coordinator
        real_request = coordinator.net.request
        broken: list[str] = []

        async def breaks_once_per_call(peer: str, protocol: str, payload: bytes, **kw: Any):
            if protocol == wire.COORDINATOR_PROTOCOL and len(broken) % 2 == 0:
                broken.append(peer)
                raise StreamClosed(f"stream from {peer} ended")
            if protocol == wire.COORDINATOR_PROTOCOL:
                broken.append("passed")
            return await real_request(peer, protocol, payload, **kw)

        coordinator.net.request = breaks_once_per_call  # type: ignore[method-assign]
        plan = await asker.call("cluster_plan", {"name": CLUSTER, "model_dir": str(model_dir)})
        assert plan["coordinator"] == leader.peer_id and broken == [leader.peer_id, "passed"]
        with pytest.raises(RPCCallError, match=f"the coordinator {leader.peer_id} did not"):
            await asker.call("cluster_undeploy", {"name": CLUSTER, "model": "tiny"})
        assert broken == [leader.peer_id, "passed", leader.peer_id]  # not sent again
