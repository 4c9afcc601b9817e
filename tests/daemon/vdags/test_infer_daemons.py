"""vdag_infer on whole daemons (the in-memory network, the real clock: Python blocks run in
the sandbox's worker processes): Python blocks served by several daemons, a model's shard
chain as a node, linear and fan-out/fan-in graphs, a nested vDAG, a failed instance retried
on another, the deadline, errors naming the node, input bounds at the boundary."""

from __future__ import annotations

from typing import Any

import pytest

from daemon.api.client import RPCCallError
from daemon.vdags.protocol import BLOCK_PROTOCOL, BlockCall, decode_reply, encode
from daemon.vdags.service import MAX_REQUESTS, MAX_SERVED_CALLS
from daemon.vdags.streams import BLOCK_STREAM_PROTOCOL, MUX_PROTOCOL
from p2p.codec import encode as encode_raw
from p2p.network import NetworkError
from tests.daemon.harness import memory_cluster
from tests.daemon.vdags.helpers import (
    block_package,
    edge,
    node,
    sandbox_or_skip,
    sub,
    vdag,
)


async def serve(daemon: Any, tmp_path: Any, block_id: str, name: str, **kw: Any) -> dict:
    path = block_package(tmp_path / "packages" / daemon.peer_id[-6:], name)
    return await daemon.call("vdag_block_serve", {"block": block_id, "path": str(path), **kw})


async def apply_when_known(net: Any, daemon: Any, spec: dict[str, Any]) -> None:
    """vdag_apply once the blocks it names have reached `daemon`."""

    async def applied() -> bool:
        try:
            await daemon.call("vdag_apply", {"value": spec})
        except RPCCallError as exc:
            if "unknown block" in exc.message:
                return False
            raise
        return True

    await net.wait_for(applied, 20, f"the blocks of {spec['vdagName']} to be known")


async def infer(daemon: Any, name: str, value: Any, **kw: Any) -> dict[str, Any]:
    return await daemon.call("vdag_infer", {"name": name, "input": value, **kw})


async def refused(daemon: Any, name: str, value: Any, **kw: Any) -> RPCCallError:
    with pytest.raises(RPCCallError) as info:
        await infer(daemon, name, value, **kw)
    return info.value


PIPE = vdag("pipe", [node("a", "upper"), node("b", "rev")], [edge("a", "b")], ["a"], ["b"])
FAN = vdag(
    "fan",
    [node("src", "upper"), node("l", "rev"), sub("r", "pipe:1"), node("j", "join")],
    [
        edge("src", "l"),
        edge("src", "r"),
        edge("l", "j", inputNames=["left"]),
        edge("r", "j", inputNames=["right"]),
    ],
    ["src"],
    ["j"],
)


async def test_graphs_run_across_daemons_and_fail_over(tmp_path):
    await sandbox_or_skip()
    async with memory_cluster(tmp_path / "net", 3) as net:
        d0, d1, d2 = net.daemons
        # upper on d0 and d1, rev on d1 and d2, join on d0 only
        digest = (await serve(d0, tmp_path, "upper", "upper"))["digest"]
        assert (await serve(d1, tmp_path, "upper", "upper"))["digest"] == digest
        await serve(d1, tmp_path, "rev", "rev")
        await serve(d2, tmp_path, "rev", "rev")
        served = await serve(d0, tmp_path, "join", "join", settings={"sep": " + "})
        assert served["health"] == "ok"
        await apply_when_known(net, d2, PIPE)
        await apply_when_known(net, d2, FAN)

        # the plan shows each Python block's servers
        planned = await d2.call("vdag_plan", {"name": "pipe"})
        servers = {s["label"]: s["servers"] for s in planned["steps"]}
        assert sorted(x["peer_id"] for x in servers["a"]) == sorted([d0.peer_id, d1.peer_id])
        assert {x["digest"] for x in servers["a"]} == {digest}
        assert all(x["kind"] == "python" for x in servers["b"])

        # linear: d2 runs it, upper on d0 or d1, rev on d1 or d2 (itself)
        result = await infer(d2, "pipe", "abc")
        assert result["output"] == "CBA" and result["vdag"] == "pipe:1"
        steps = {s["label"]: s for s in result["steps"]}
        assert steps["a"]["instance"] in (d0.peer_id, d1.peer_id)
        assert steps["b"]["started_s"] >= steps["a"]["finished_s"]

        # fan-out / fan-in with the nested pipe as one branch
        result = await infer(d1, "fan", "ab")
        # src: AB; l: BA; r: pipe(AB) = BA; j joins by its input names, sorted
        assert result["output"] == "BA + BA"
        steps = {s["label"]: s for s in result["steps"]}
        assert set(steps) == {"src", "l", "r/a", "r/b", "j"}
        # l and r/a both start when src is done: the branches overlap
        assert steps["l"]["started_s"] < steps["r/a"]["finished_s"]
        assert steps["r/a"]["started_s"] < steps["l"]["finished_s"]
        assert steps["j"]["started_s"] >= max(steps["l"]["finished_s"], steps["r/b"]["finished_s"])

        # an instance at its cap of block calls answers busy: the step goes to the other
        d0.daemon.vdags.serving = MAX_SERVED_CALLS
        busy = []
        for _ in range(3):
            result = await infer(d2, "pipe", "abc")
            assert result["output"] == "CBA"
            busy += [a for a in result["steps"][0]["attempts"] if a["error"]]
        assert busy and all(a["instance"] == d0.peer_id for a in busy)
        assert "busy: 256 block calls running here" in busy[0]["error"]
        d0.daemon.vdags.serving = 0
        # a node at its cap of vDAG requests refuses more, busy
        d2.daemon.vdags.running = MAX_REQUESTS
        error = await refused(d2, "pipe", "abc")
        assert error.code == -32031 and "64 vDAG requests are running" in error.message
        d2.daemon.vdags.running = 0

        # an instance dies: its announcement stays, so it is tried, fails, and the step is
        # retried on the other instance of its block
        net.kill(d1)
        seen_failover = False
        for _ in range(4):  # tied instances take turns: d1 is picked within two runs
            result = await infer(d2, "pipe", "xyz")
            assert result["output"] == "ZYX"
            attempts = [a for s in result["steps"] for a in s["attempts"]]
            failed = [a for a in attempts if a["error"]]
            if failed:
                seen_failover = True
                assert failed[0]["instance"] == d1.peer_id
                assert "cannot be reached" in failed[0]["error"]
        assert seen_failover
        assert d2.metric("gridmesh_vdag_requests_total", outcome="ok") >= 5


async def test_errors_name_the_node_and_inputs_are_bounded(tmp_path):
    await sandbox_or_skip()
    async with memory_cluster(tmp_path / "net", 2) as net:
        d0, d1 = net.daemons
        await serve(d0, tmp_path, "upper", "upper")
        await serve(d1, tmp_path, "boom", "boom")
        await serve(d1, tmp_path, "count", "count")
        bad = vdag(
            "bad",
            [node("a", "upper"), node("b", "boom")],
            [edge("a", "b")],
            ["a"],
            ["b"],
        )
        await apply_when_known(net, d0, bad)
        error = await refused(d0, "bad", "hi")
        assert error.message == (
            f"vDAG node 'b' failed: block 'boom' on {d1.peer_id[-12:]}: policy boom eval "
            "raised RuntimeError: on_data failed: cannot handle 'HI'"
        )
        assert error.data == {"reason": "node", "node": "b", "why": "policy_error"}
        assert error.code == -32010
        # one entry per word (on_preprocess), each through on_data: a list of results
        words = vdag("words", [node("c", "count")], [], ["c"], ["c"])
        await apply_when_known(net, d0, words)
        assert (await infer(d0, "words", "a bb ccc"))["output"] == [1, 2, 3]
        assert (await infer(d0, "words", "single"))["output"] == 6

        # AIOS's on_update through vdag_block_update (a stateful block: one worker)
        tag = block_package(tmp_path / "tag", "tag", manifest={"stateful": True})
        params = {"block": "tag", "path": str(tag), "parameters": {"tag": "!"}}
        await d1.call("vdag_block_serve", params)
        tagged = vdag("tagged", [node("t", "tag")], [], ["t"], ["t"])
        await apply_when_known(net, d0, tagged)
        assert (await infer(d0, "tagged", "hi"))["output"] == "hi!"
        update = {"block": "tag", "parameters": {"tag": "?"}}
        assert (await d1.call("vdag_block_update", update))["result"] == {"tag": "?"}
        assert (await infer(d0, "tagged", "hi"))["output"] == "hi?"
        listed = {b["block"]: b for b in await d1.call("vdag_block_list")}
        assert sorted(listed) == ["boom", "count", "tag"]
        assert listed["tag"]["health"] == "ok" and listed["tag"]["calls"] == 2
        missing = {"block": "nope", "parameters": {}}
        with pytest.raises(RPCCallError, match="does not serve block 'nope'"):
            await d1.call("vdag_block_update", missing)

        # bounds at the boundary: too large, and too deep, refused before anything runs
        error = await refused(d0, "words", "x" * (1 << 20))
        assert error.code == -32602 and "limit 1048576" in error.message
        deep: Any = "x"
        for _ in range(20):
            deep = [deep]
        error = await refused(d0, "words", deep)
        assert error.code == -32602 and error.data["reason"] == "too_deep"
        for reason in ("too_large", "too_deep"):
            assert d0.metric("gridmesh_rejected_messages_total", source="vdag", reason=reason) == 1
        error = await refused(d0, "words", "a", deadline_s=0)
        assert error.code == -32602 and "deadline_s" in error.message
        error = await refused(d0, "nope", "a")
        assert error.code == -32004 and "no vDAG nope" in error.message
        # a peer's malformed or mistyped block calls: refused, counted, the daemon serving on
        for junk, reason in (
            (b"\xc1garbage", "malformed"),
            (encode_raw({"block": "count", "input": 1, "timeout_s": -1}), "invalid"),
            (encode_raw({"block": "../x", "input": 1, "timeout_s": 1}), "invalid"),
        ):
            with pytest.raises(NetworkError):
                await d0.daemon.net.request(d1.peer_id, BLOCK_PROTOCOL, junk, timeout_s=5)
            assert d1.metric("gridmesh_rejected_messages_total", source="vdag", reason=reason)
        # the same over the block stream protocol: the stream is reset, the junk counted
        stream = await d0.daemon.net.open_stream(d1.peer_id, BLOCK_STREAM_PROTOCOL)
        before = d1.metric("gridmesh_rejected_messages_total", source="vdag", reason="malformed")
        await stream.send(b"\xc1garbage")
        with pytest.raises(NetworkError):
            await stream.receive()
        after = d1.metric("gridmesh_rejected_messages_total", source="vdag", reason="malformed")
        assert after == before + 1
        # and over the multiplexed block stream, which d0's own calls to d1 went over
        assert d1.peer_id in d0.daemon.vdags.runner.streams.links
        stream = await d0.daemon.net.open_stream(d1.peer_id, MUX_PROTOCOL)
        await stream.send(encode_raw([{"id": 1, "call": {"block": "count", "timeout_s": 1}}]))
        with pytest.raises(NetworkError):
            await stream.receive()
        assert d1.metric("gridmesh_rejected_messages_total", source="vdag", reason="invalid") == 3
        # a well-formed call of a block d1 does not serve: a reply saying so
        call = BlockCall(block="upper", input=1, timeout_s=5)
        raw = await d0.daemon.net.request(d1.peer_id, BLOCK_PROTOCOL, encode(call), timeout_s=5)
        assert decode_reply(raw).kind == "unknown_block"
        assert (await infer(d0, "words", "still serving"))["output"] == [5, 7]
        # the deadline: a block that takes longer than the whole request's time
        slow_path = block_package(
            tmp_path / "slow", "slow", "def on_data(self, entry):\n    while True: pass"
        )
        await d1.call("vdag_block_serve", {"block": "slow", "path": str(slow_path)})
        slow = vdag("slow", [node("s", "slow")], [], ["s"], ["s"])
        await apply_when_known(net, d0, slow)
        error = await refused(d0, "slow", "x", deadline_s=0.5)
        assert error.message == "the vDAG ran past its deadline of 0.5 s (still running: 's')"
        assert error.data == {"reason": "deadline", "running": ["s"]}
        assert d0.metric("gridmesh_vdag_requests_total", outcome="deadline") == 1
