"""vDAGs through JSON-RPC as a user applies them: whole daemons on the in-memory network.

A bad vDAG is refused by `registry_put` (what the entry gets wrong by itself) and by
`vdag_apply` / `vdag_check` (also what needs the registries: unknown blocks and sub-vDAGs, a
loop through the nesting), with the error naming the node or edge, and nothing is written.
`vdag_plan` gives the compiled graph with each node's servers, by version."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.api.client import RPCCallError
from registry.blocks import announcement_key
from tests.daemon.harness import inline_threads, memory_cluster


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


LLAMA = {"blockId": "llama", "blockComponentURI": "llama:1"}


def vdag(name: str, version: str, nodes: list[dict], edges: list[tuple[str, str]]) -> dict:
    heads = [n["nodeLabel"] for n in nodes if all(b != n["nodeLabel"] for _, b in edges)]
    tails = [n["nodeLabel"] for n in nodes if all(a != n["nodeLabel"] for a, _ in edges)]
    return {
        "vdagName": name,
        "vdagVersion": version,
        "nodes": nodes,
        "graph": {
            "input": heads,
            "output": tails,
            "connections": [{"from": a, "to": b} for a, b in edges],
        },
    }


def block(label: str, block_id: str) -> dict[str, Any]:
    return {"nodeLabel": label, "nodeType": "block", "manualBlockId": block_id}


def sub(label: str, uri: str) -> dict[str, Any]:
    return {"nodeLabel": label, "nodeType": "vdag", "vdagURI": uri}


async def refused(daemon: Any, method: str, params: dict[str, Any]) -> RPCCallError:
    with pytest.raises(RPCCallError) as info:
        await daemon.call(method, params)
    return info.value


async def test_apply_refuses_bad_vdags_and_plans_good_ones(autojump_clock, tmp_path):
    async with memory_cluster(tmp_path, 2) as net:
        a, b = net.daemons
        # an AIOS block spec (no server yet), and b announcing layers 0-4 of model "llama"
        detect = {"blockId": "detect", "blockComponentURI": "detector:1"}
        await a.call("registry_put", {"kind": "blocks", "key": "detect", "value": detect})
        served = announcement_key("llama", 0, 4, b.peer_id)
        announced = {
            "blockId": served,
            "blockComponentURI": "llama",
            "model": "llama",
            "layers": [0, 4],
            "served_by": [b.peer_id],
            "parameters": {"ms_per_layer": 1.0},
        }
        await b.call("registry_put", {"kind": "blocks", "key": served, "value": announced})

        async def a_sees_the_announcement() -> bool:
            page = await a.call("registry_list", {"kind": "blocks"})
            return len(page["items"]) == 2

        await net.wait_for(a_sees_the_announcement, 10, "the announcement to reach a")

        # what the entry gets wrong by itself: refused by registry_put too
        cyclic = vdag(
            "p", "1.0", [block("a", "detect"), block("b", "llama"), block("c", "llama")], []
        )
        cyclic["graph"].update(
            input=["a"],
            output=["c"],
            connections=[
                {"from": "a", "to": "b"},
                {"from": "b", "to": "c"},
                {"from": "c", "to": "b"},
            ],
        )
        for method, params in (
            ("registry_put", {"kind": "vdags", "key": "p", "value": cyclic}),
            ("vdag_apply", {"value": cyclic}),
            ("vdag_check", {"value": cyclic}),
        ):
            error = await refused(a, method, params)
            assert "graph.connections[2] 'c' -> 'b': closes the cycle b -> c -> b" in error.message
        # what needs the registries: refused at this node's apply path
        unknown_block = vdag("p", "1.0", [block("a", "detect"), block("b", "nope")], [("a", "b")])
        error = await refused(a, "vdag_apply", {"value": unknown_block})
        assert error.message == "vDAG refused: nodes[1] 'b': unknown block 'nope'"
        assert error.data == {"reason": "vdag", "path": "nodes[1]"}
        put = {"kind": "vdags", "key": "p:1.0", "value": unknown_block}  # `gridmesh apply`
        assert (await refused(a, "registry_put", put)).message == error.message
        unknown_sub = vdag("p", "1.0", [block("a", "detect"), sub("s", "q")], [("a", "s")])
        error = await refused(a, "vdag_apply", {"value": unknown_sub})
        assert error.message == "vDAG refused: nodes[1] 's': unknown sub-vDAG 'q'"
        assert await refused(a, "registry_get", {"kind": "vdags", "key": "p:1.0"})
        assert (
            a.metric("gridmesh_rpc_requests_total", method="vdag_apply", outcome="app_error") == 3
        )

        # good ones: q (two parallel branches, joined), p = detect -> q -> the llama chain
        q1 = vdag(
            "q",
            "1",
            [block("x", "detect"), block("y", served), block("z", "llama"), block("w", "detect")],
            [("x", "y"), ("x", "z"), ("y", "w"), ("z", "w")],
        )
        p = vdag(
            "p",
            "1.0",
            [block("in", "detect"), sub("s", "q"), block("out", "llama")],
            [("in", "s"), ("s", "out")],
        )
        checked = await a.call("vdag_check", {"value": q1})
        assert checked["levels"] == [["x"], ["y", "z"], ["w"]]
        assert await refused(a, "registry_get", {"kind": "vdags", "key": "q:1"})  # not written
        entry = await a.call("vdag_apply", {"value": q1})
        assert (entry["kind"], entry["key"]) == ("vdags", "q:1")
        await a.call("vdag_apply", {"value": p})

        async def b_plans_p() -> Any:
            try:
                return await b.call("vdag_plan", {"name": "p"})
            except RPCCallError:
                return None

        plan = await net.wait_for(b_plans_p, 10, "the vDAGs to reach b")
        assert plan["vdag"] == "p:1.0" and plan["nested"] == ["q:1"]
        assert plan["levels"] == [["in"], ["s/x"], ["s/y", "s/z"], ["s/w"], ["out"]]
        server = {"peer_id": b.peer_id, "model": "llama", "layers": [0, 4], "block": served}
        by_step = {s["label"]: s for s in plan["steps"]}
        assert by_step["out"]["servers"] == [server]  # a model: its announced chain
        assert by_step["s/y"]["servers"] == [server]  # one announced range by its key
        assert by_step["in"]["block_id"] == "detect" and by_step["in"]["servers"] == []
        assert by_step["s/w"]["after"] == ["s/y", "s/z"]

        # a new version of q: p (unpinned) now nests it, q:1 stays as it was
        q2 = vdag("q", "2", [block("only", "llama")], [])
        await a.call("vdag_apply", {"value": q2})
        plan = await a.call("vdag_plan", {"name": "p"})
        assert plan["nested"] == ["q:2"] and [s["label"] for s in plan["steps"]] == [
            "in",
            "s/only",
            "out",
        ]
        assert (await a.call("vdag_plan", {"name": "q", "version": "1"}))["vdag"] == "q:1"
        assert (await a.call("vdag_plan", {"name": "q:1"}))["vdag"] == "q:1"
        assert (await a.call("vdag_plan", {"name": "q"}))["vdag"] == "q:2"

        # a loop through the nesting: q:3 nests p, which nests the latest q
        q3 = vdag("q", "3", [block("in", "detect"), sub("back", "p")], [("in", "back")])
        error = await refused(a, "vdag_apply", {"value": q3})
        assert error.message == (
            "vDAG refused: nodes[1] 'back': in vDAG p:1.0: nodes[1] 's': nests a vDAG inside "
            "itself: q:3 -> p:1.0 -> q:3"
        )

        error = await refused(a, "vdag_plan", {"name": "nothing"})
        assert (error.code, error.message) == (-32004, "no vDAG nothing")
        error = await refused(a, "vdag_plan", {"name": "q", "version": "9"})
        assert error.message == "no vDAG q version 9; versions stored: 1, 2"

        # a block a stored vDAG names is deleted: its plan says so, naming the node
        await a.call("registry_delete", {"kind": "blocks", "key": "detect"})
        error = await refused(a, "vdag_plan", {"name": "q", "version": "1"})
        assert error.message == "vDAG q:1 cannot run now: nodes[0] 'x': unknown block 'detect'"


async def test_bad_params_are_refused_cleanly(autojump_clock, tmp_path):
    async with memory_cluster(tmp_path, 1) as net:
        (a,) = net.daemons
        for params in ({"value": []}, {"value": {"vdagName": 3}}, {"value": {}, "key": 5}):
            error = await refused(a, "vdag_apply", params)
            assert error.code == -32602
        error = await refused(a, "vdag_check", {"value": {"vdagName": "x"}})
        assert error.message == "vDAG refused: vdagVersion is required"
        error = await refused(a, "vdag_plan", {"name": ""})
        assert error.code == -32602
        spaced = vdag("p", "1.0 beta", [block("x", "llama")], [])
        error = await refused(a, "vdag_apply", {"value": spaced})
        assert error.message == (
            "vDAG refused: nodes[0] 'x': unknown block 'llama'"  # checked first
        )
        await a.call("registry_put", {"kind": "blocks", "key": "llama", "value": LLAMA})
        error = await refused(a, "vdag_apply", {"value": spaced})
        assert error.message.startswith("vdags: key 'p:1.0 beta' may only use letters")
        assert error.message.endswith(": give the vDAG a key")
        entry = await a.call("vdag_apply", {"value": spaced, "key": "p-1.0-beta"})
        assert entry["key"] == "p-1.0-beta"
        assert (await a.call("vdag_plan", {"name": "p"}))["vdag"] == "p:1.0 beta"


async def test_a_peers_broken_vdag_is_dropped_and_counted(autojump_clock, tmp_path):
    """A peer that skips its own checks and gossips a cyclic vDAG: every other node drops it
    (the registry's schema runs `registry.vdags`) and counts it; a good one still arrives."""
    from registry.entry import sign_entry

    async with memory_cluster(tmp_path, 2) as net:
        a, b = net.daemons
        cyclic = vdag("loop", "1", [block("x", "detect"), block("y", "detect")], [("x", "y")])
        cyclic["graph"]["input"] = ["x"]
        cyclic["graph"]["connections"].append({"from": "y", "to": "x"})
        good = vdag("fine", "1", [block("x", "detect")], [])
        replica = a.daemon.replica
        entries = []
        for key, value in (("loop:1", cyclic), ("fine:1", good)):
            ts = replica.clock.now()
            entries.append(
                sign_entry(
                    a.daemon.ident,
                    kind="vdags",
                    key=key,
                    value=value,
                    ts=ts,
                    created=ts,
                    owner=a.peer_id,
                )
            )
        before = b.metric("gridmesh_rejected_messages_total", reason="schema")
        await a.daemon.replicator.announce(entries)  # gossip, without a's own checks

        async def good_one_arrived() -> bool:
            return b.daemon.replica.get("vdags", "fine:1") is not None

        await net.wait_for(good_one_arrived, 10, "the good vDAG to reach b")
        assert b.daemon.replica.get("vdags", "loop:1") is None
        assert b.metric("gridmesh_rejected_messages_total", reason="schema") > before
        # stored, but its block is unknown on b: the plan says so, naming the node
        error = await refused(b, "vdag_plan", {"name": "fine"})
        assert error.message == "vDAG fine:1 cannot run now: nodes[0] 'x': unknown block 'detect'"
        assert (await b.call("node_info"))["peer_id"] == b.peer_id  # still serving


async def test_plan_shows_the_servers_of_a_deployed_model(autojump_clock, tmp_path):
    """A node naming a model served over two daemons (their real announcements): the plan
    lists both servers with their layer ranges; once one stops serving, only the other."""
    pytest.importorskip("torch")
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=4, seed=3)
    async with memory_cluster(tmp_path / "net", 2) as net:
        a, b = net.daemons
        await net.deploy(model_dir, [a, b], [(0, 2), (2, 4)])
        spec = vdag("chat", "1", [block("llm", "tiny")], [])
        await a.call("vdag_apply", {"value": spec})
        plan = await a.call("vdag_plan", {"name": "chat"})
        servers = plan["steps"][0]["servers"]
        assert [(s["peer_id"], s["layers"]) for s in servers] == [
            (a.peer_id, [0, 2]),
            (b.peer_id, [2, 4]),
        ]
        await b.call("block_undeploy", {"model": "tiny"})

        async def one_server_left() -> bool:
            plan = await a.call("vdag_plan", {"name": "chat"})
            return len(plan["steps"][0]["servers"]) == 1

        await net.wait_for(one_server_left, 10, "b's range to be withdrawn")
