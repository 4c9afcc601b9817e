"""A vDAG's policies at run time, through the sandbox pool of the daemon running it (whole
daemons, in memory, real clock): pre- and post-processing policies referenced by path and
content hash, the built-in least-loaded assignment spreading requests over two instances of
a block, the built-in token-bucket quota refusing a session or API key over its quota, and
policies refused for a missing or wrong hash, naming the node."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from daemon.api.client import RPCCallError
from daemon.sandbox import load_package
from tests.daemon.harness import memory_cluster
from tests.daemon.vdags.helpers import (
    block_package,
    node,
    policy_package,
    rule,
    sandbox_or_skip,
    vdag,
)
from tests.daemon.vdags.test_infer_daemons import apply_when_known, infer, refused

PRE = "return 'pre:' + input_data.strip()"
POST = "return {'out': input_data, 'node': context['node'], 'vdag': context['vdag']}"


async def test_pre_post_assignment_and_quota(tmp_path):
    await sandbox_or_skip()
    pre = policy_package(tmp_path, "pre", PRE)
    post = policy_package(tmp_path, "post", POST)
    pre_digest, post_digest = load_package(pre).digest, load_package(post).digest
    async with memory_cluster(tmp_path / "net", 3) as net:
        d0, d1, d2 = net.daemons
        for d in (d0, d1):  # two instances of "upper"
            path = block_package(tmp_path / d.peer_id[-6:], "upper")
            await d.call("vdag_block_serve", {"block": "upper", "path": str(path)})
        quota = {"quotaPolicyRule": {"settings": {"rate_per_s": 0.001, "burst": 3}}}
        spec = vdag(
            "pol",
            [
                node(
                    "a",
                    "upper",
                    preprocessingPolicyRule=rule(str(pre), pre_digest),
                    postprocessingPolicyRule=rule(str(post), post_digest),
                    assignmentPolicyRule=rule("builtin:least-loaded"),
                )
            ],
            [],
            ["a"],
            ["a"],
            controller=quota,
        )
        await apply_when_known(net, d2, spec)

        # pre: "pre:" + stripped input; the block: upper; post: wrapped with its context
        instances: Counter[str] = Counter()
        for i in range(3):
            result = await infer(d2, "pol", f"  x{i} ", session="s1")
            assert result["output"] == {"out": f"PRE:X{i}", "node": "a", "vdag": "pol:1"}
            instances[result["steps"][0]["instance"]] += 1
        # the least-loaded policy (in the sandbox) spread them over both instances
        assert set(instances) == {d0.peer_id, d1.peer_id}
        # the quota: a burst of 3 per session; the 4th is refused, naming the key
        error = await refused(d2, "pol", "y", session="s1")
        assert error.code == -32031
        assert error.message.startswith("quota exceeded for session:s1 on vDAG pol:1; retry after")
        assert error.data["reason"] == "quota" and error.data["key"] == "session:s1"
        # another session has its own bucket; an API key is counted too
        assert (await infer(d2, "pol", "z", session="s2"))["output"]["out"] == "PRE:Z"
        for _ in range(3):
            await infer(d2, "pol", "k", api_key="key-1")
        error = await refused(d2, "pol", "k", api_key="key-1")
        assert "quota exceeded for apikey:key-1" in error.message
        assert d2.metric("gridmesh_vdag_requests_total", outcome="quota") == 2
        # every policy ran in d2's sandbox: calls counted there
        assert d2.metric("gridmesh_sandbox_calls_total") >= 3 * 4
        assert d2.metric("gridmesh_sandbox_failures_total") == 0


PICK = "return {'block': 'rev' if input_data['input'].startswith('r:') else 'upper'}"


async def test_a_node_without_a_block_is_given_one_by_its_assignment_policy(tmp_path):
    await sandbox_or_skip()
    pick = policy_package(tmp_path, "pick", PICK)
    async with memory_cluster(tmp_path / "net", 2) as net:
        d0, d1 = net.daemons
        for d, name in ((d0, "upper"), (d1, "rev")):
            path = block_package(tmp_path / name, name)
            await d.call("vdag_block_serve", {"block": name, "path": str(path)})
        free = {
            "nodeLabel": "any",
            "nodeType": "block",
            "assignmentPolicyRule": rule(str(pick), load_package(pick).digest),
        }
        await apply_when_known(net, d0, vdag("free", [free], [], ["any"], ["any"]))

        async def both_known() -> bool:
            return len(d0.daemon.vdags.runner.served_blocks()) == 2

        await net.wait_for(both_known, 20, "both blocks to be announced to d0")
        assert d0.daemon.vdags.runner.served_blocks() == ["rev", "upper"]
        result = await infer(d0, "free", "r:abc")
        assert result["output"] == "cba:r" and result["steps"][0]["block"] == "rev"
        assert result["steps"][0]["instance"] == d1.peer_id
        result = await infer(d0, "free", "abc")
        assert result["output"] == "ABC" and result["steps"][0]["block"] == "upper"
        # a policy naming a block nobody serves: refused, naming the node
        wrong = policy_package(tmp_path, "wrong", "return {'block': 'gone'}")
        free["assignmentPolicyRule"] = rule(str(wrong), load_package(wrong).digest)
        await d0.call("vdag_apply", {"value": vdag("free2", [free], [], ["any"], ["any"])})
        error = await refused(d0, "free2", "x")
        assert error.data["node"] == "any"
        assert "chose block 'gone', not one of the 2 blocks served now" in error.message


async def test_policies_without_or_with_a_wrong_hash_are_refused(tmp_path):
    await sandbox_or_skip()
    pre = policy_package(tmp_path, "pre", PRE)
    digest = load_package(pre).digest
    async with memory_cluster(tmp_path / "net", 1) as net:
        (d0,) = net.daemons
        path = block_package(tmp_path, "upper")
        await d0.call("vdag_block_serve", {"block": "upper", "path": str(path)})

        async def run_with(policy: dict[str, Any], name: str) -> RPCCallError:
            spec = vdag(
                name, [node("a", "upper", preprocessingPolicyRule=policy)], [], ["a"], ["a"]
            )
            await d0.call("vdag_apply", {"value": spec})
            with pytest.raises(RPCCallError) as info:
                await d0.call("vdag_infer", {"name": name, "input": "q"})
            return info.value

        error = await run_with(rule(str(pre)), "nohash")
        assert error.data["node"] == "a" and "needs a policyRuleDigest" in error.message
        error = await run_with(rule(str(pre), "sha256:" + "0" * 64), "wronghash")
        assert error.data["node"] == "a" and f"its content hash is {digest}" in error.message
        error = await run_with(rule("builtin:nope"), "unknown")
        assert "unknown built-in policy 'builtin:nope'" in error.message
        # the right hash runs; a package changed under its hash is refused
        assert (await run_with_ok(d0, pre, digest))["output"] == "PRE:Q"
        changed = policy_package(tmp_path / "changed", "pre", PRE + "  # changed")
        error = await run_with(rule(str(changed), digest), "changed")
        assert error.data["node"] == "a"
        assert f"changed: its content hash is {load_package(changed).digest}" in error.message


async def run_with_ok(d0: Any, pre: Any, digest: str) -> dict[str, Any]:
    spec = vdag(
        "ok", [node("a", "upper", preprocessingPolicyRule=rule(str(pre), digest))], [], ["a"], ["a"]
    )
    await d0.call("vdag_apply", {"value": spec})
    return await d0.call("vdag_infer", {"name": "ok", "input": "q"})
