"""Block shards across real daemon processes: exact generation over same-host sockets, gRPC and
the CLI, and a SIGKILLed server (over Unix sockets and over libp2p)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from daemon.devnet import Devnet
from p2p import localsock

torch = pytest.importorskip("torch")

from tests.daemon.shard_procs import (  # noqa: E402
    NEW_TOKENS,
    PROMPT,
    deploy,
    reference_tokens,
    tiny_model,
)

pytestmark = pytest.mark.procs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_tokens(model_dir)


def test_three_daemons_generate_exactly_the_single_process_tokens(
    tmp_path, fast_config, model_dir, expected
):
    """Over what only processes have: same-host Unix sockets, the gRPC API, the CLI. (The
    rest of generation across daemons, relayed, text prompts, limits, the DHT record and
    undeploy, runs on whole in-memory daemons: test_whole_daemons.py.)"""
    with Devnet(3, root=tmp_path, config=fast_config) as net:
        net.wait_all_found(30)
        deploy(net, model_dir, [(0, 2), (2, 4), (4, 6)])
        result = net.daemons[2].call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}
        )
        assert result["error"] is None
        assert result["tokens"] == expected
        assert [h["peer_id"] for h in result["route"]] == [d.peer_id for d in net.daemons]
        assert result["forwarding"] == "chained"  # each server pushed to the next
        if localsock.HOST_ID is not None:  # daemons on one host talk over Unix sockets
            streams = "gridmesh_shard_streams_total"
            assert net.daemons[2].metric(streams, transport="local") >= 2  # to node0, node1
            assert net.daemons[0].metric(streams, transport="local") >= 1  # push to node1
            assert net.daemons[2].metric(streams, transport="libp2p") == 0
        # the same through the gRPC API, with its health service
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        from daemon.api.proto import gridmesh_inference_pb2 as pb
        from daemon.api.proto import gridmesh_inference_pb2_grpc as pb_grpc

        with grpc.insecure_channel(net.daemons[1].info["grpc_addr"]) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            request = pb.GenerateRequest(
                model="tiny", token_ids=pb.TokenIds(ids=PROMPT), max_tokens=NEW_TOKENS
            )
            cookie = (net.daemons[1].home / "rpc.cookie").read_text().strip()
            auth = [("authorization", f"Bearer {cookie}")]  # gRPC wants the RPC cookie
            stub = pb_grpc.InferenceStub(channel)
            replies = list(stub.Generate(request, timeout=60, metadata=auth))
        assert [r.token_id for r in replies if not r.done] == expected
        assert replies[-1].done and len(replies[-1].route) == 3
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemon.cli.main",
                "generate",
                "--home",
                str(net.daemons[0].home),
                "--model",
                "tiny",
                "--max-tokens",
                "4",
                bytes(PROMPT).decode(),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert cli.returncode == 0, cli.stderr
        assert "4 tokens" in cli.stderr

        def gm(*args: str) -> subprocess.CompletedProcess[str]:
            home = ["--home", str(net.daemons[2].home)]
            return subprocess.run(
                [sys.executable, "-m", "daemon.cli.main", *args, *home],
                capture_output=True,
                text=True,
                timeout=120,
            )

        plan = gm("deploy", str(model_dir), "--model", "tiny2", "--nodes", "2", "--dry-run")
        assert plan.returncode == 0, plan.stderr
        assert len(plan.stdout.strip().splitlines()) == 2 and "layers [0," in plan.stdout
        listed = json.loads(gm("blocks", "--json").stdout)
        assert listed["local"][0]["start"] == 4
        assert len(listed["announced"]["tiny"]) == 3
