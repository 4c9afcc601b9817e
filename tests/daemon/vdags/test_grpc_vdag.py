"""AIOS's gRPC vDAGInferenceService.infer on the daemon's gRPC server (in-process, over a
whole daemon on the in-memory network, real clock; sync clients in threads): a packet in,
the vDAG's output as JSON out with session and sequence echoed, the vDAG named by the
packet or by metadata, the cookie required, refusals with the status of their kind."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest
import trio

from daemon.api.grpc_backend import ShardBackend
from daemon.api.grpc_server import HOST, serve_grpc
from daemon.api.proto import aios_vdag_pb2 as pb2
from daemon.api.proto import aios_vdag_pb2_grpc as pb2_grpc
from daemon.vdag_methods import grpc_infer
from p2p.aio import open_bridge
from tests.daemon.harness import memory_cluster
from tests.daemon.vdags.helpers import block_package, node, sandbox_or_skip, vdag

TOKEN = "vdag-grpc-token"
AUTH = (("authorization", f"Bearer {TOKEN}"),)


def call(port: int, packet: pb2.vDAGInferencePacket, metadata: Any = AUTH) -> Any:
    with grpc.insecure_channel(f"{HOST}:{port}") as channel:
        stub = pb2_grpc.vDAGInferenceServiceStub(channel)
        try:
            return stub.infer(packet, metadata=metadata, timeout=20)
        except grpc.RpcError as exc:
            return exc


async def test_vdag_inference_service_infer(tmp_path):
    await sandbox_or_skip()
    async with memory_cluster(tmp_path / "net", 1) as net, open_bridge() as bridge:
        (d0,) = net.daemons
        path = block_package(tmp_path, "upper")
        await d0.call("vdag_block_serve", {"block": "upper", "path": str(path)})
        quota = {"quotaPolicyRule": {"settings": {"rate_per_s": 0.001, "burst": 2}}}
        spec = vdag("up", [node("a", "upper")], [], ["a"], ["a"], controller=quota)
        await d0.call("vdag_apply", {"value": spec})
        async with trio.open_nursery() as nursery:
            port = await nursery.start(
                lambda task_status: serve_grpc(
                    bridge,
                    ShardBackend(d0.daemon.shards),
                    port=0,
                    token=TOKEN,
                    vdag_infer=grpc_infer(d0.daemon.replicator, d0.daemon.vdags),
                    task_status=task_status,
                )
            )

            async def infer(packet: Any, metadata: Any = AUTH) -> Any:
                return await trio.to_thread.run_sync(call, port, packet, metadata)

            packet = pb2.vDAGInferencePacket(
                session_id="s1", seq_no=7, data=json.dumps({"text": "hi"}), ts=1.0, vdag="up"
            )
            reply = await infer(packet)
            assert isinstance(reply, pb2.vDAGInferencePacket), reply
            assert json.loads(reply.data) == "HI"
            assert (reply.session_id, reply.seq_no) == ("s1", 7) and reply.ts > 1.0
            # AIOS's own clients name the vDAG in metadata (their packet has no vdag field)
            aios = pb2.vDAGInferencePacket(session_id="s2", seq_no=1, data='"x"')
            reply = await infer(aios, (*AUTH, ("x-vdag", "up:1")))
            assert json.loads(reply.data) == "X"
            # refusals, each with its kind's status
            cases = [
                (packet, (), grpc.StatusCode.UNAUTHENTICATED, "unauthenticated"),
                (
                    pb2.vDAGInferencePacket(data='"x"'),
                    AUTH,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "name the vDAG",
                ),
                (
                    pb2.vDAGInferencePacket(vdag="up", data="{nope"),
                    AUTH,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "data is not JSON",
                ),
                (
                    pb2.vDAGInferencePacket(vdag="up", data='"x"', files=[pb2.vDAGFileInfo()]),
                    AUTH,
                    grpc.StatusCode.INVALID_ARGUMENT,
                    "files and frame_ptr",
                ),
                (
                    pb2.vDAGInferencePacket(vdag="gone", data='"x"'),
                    AUTH,
                    grpc.StatusCode.NOT_FOUND,
                    "no vDAG gone",
                ),
                # s1's burst of 2: the third packet of the session is over quota
                (packet, AUTH, grpc.StatusCode.OK, ""),
                (packet, AUTH, grpc.StatusCode.RESOURCE_EXHAUSTED, "quota exceeded for session:s1"),
            ]
            for request, metadata, status, text in cases:
                reply = await infer(request, metadata)
                if status is grpc.StatusCode.OK:
                    assert isinstance(reply, pb2.vDAGInferencePacket), reply
                    continue
                assert isinstance(reply, grpc.RpcError), (text, reply)
                assert reply.code() is status, (text, reply.details())
                assert text in reply.details()
            nursery.cancel_scope.cancel()


@pytest.mark.parametrize("deadline", [-1.0, 601.0])
def test_deadline_bounds(deadline):
    from daemon import errors
    from daemon.api.grpc_vdag import request_of

    with pytest.raises(errors.InvalidParams, match="deadline_s"):
        request_of(pb2.vDAGInferencePacket(vdag="v", data="1", deadline_s=deadline), ())
