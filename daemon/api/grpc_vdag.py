"""AIOS's `vDAGInferenceService.infer` (daemon/api/proto/aios_vdag.proto) on the daemon's
gRPC server: one packet in, one packet out, the vDAG run by the daemon's VdagService.

The packet's `data` is the input as JSON (at most `MAX_DATA_CHARS`); the reply's `data` is the
output as JSON, with `session_id` and `seq_no` echoed and `ts` the time it was answered. The
vDAG is named by the packet's `vdag` (ours) or the `x-vdag` metadata (for AIOS's own
clients); its `session_id` is the quota's session key. `files` and `frame_ptr` (AIOS's frame
DB) are refused with INVALID_ARGUMENT. Failures end the call with the status of their kind
(`daemon.errors`): a node that failed is UNAVAILABLE with a message naming it, over quota
RESOURCE_EXHAUSTED. Like Inference, calls need the RPC cookie (`grpc_server`'s interceptor).
Runs on the asyncio loop; the vDAG runs under trio through the server's `TrioPortal`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from daemon import errors
from daemon.api.grpc_portal import TrioPortal
from daemon.api.proto import aios_vdag_pb2 as pb2
from daemon.api.proto import aios_vdag_pb2_grpc as pb2_grpc
from daemon.errors import GridmeshError, status_of
from daemon.vdags.values import DEFAULT_DEADLINE_S, MAX_DEADLINE_S, MAX_VALUE_BYTES

SERVICE_NAME = pb2.DESCRIPTOR.services_by_name["vDAGInferenceService"].full_name
VDAG_METADATA = "x-vdag"
MAX_DATA_CHARS = MAX_VALUE_BYTES
MAX_NAME_CHARS = 200
MAX_SESSION_CHARS = 128

# (name, input, deadline_s, session) -> {"output": ...}: vdag_infer's, run under trio
Infer = Callable[[str, Any, float, str | None], Awaitable[dict[str, Any]]]


def request_of(
    packet: pb2.vDAGInferencePacket, metadata: Any
) -> tuple[str, Any, float, str | None]:
    """The vDAG's name, the input, the deadline and the session of a packet; InvalidParams
    naming the field otherwise."""
    name = packet.vdag or next((str(v) for k, v in metadata or () if k == VDAG_METADATA), "")
    if not name or len(name) > MAX_NAME_CHARS:
        raise errors.InvalidParams(
            f"name the vDAG: the packet's vdag field or {VDAG_METADATA!r} metadata "
            f"(1..{MAX_NAME_CHARS} characters)"
        )
    if packet.files or packet.frame_ptr:
        raise errors.InvalidParams(
            "files and frame_ptr are not supported: send the input as JSON in data"
        )
    if len(packet.data) > MAX_DATA_CHARS:
        raise errors.InvalidParams(f"data is over {MAX_DATA_CHARS} characters")
    if len(packet.session_id) > MAX_SESSION_CHARS:
        raise errors.InvalidParams(f"session_id is over {MAX_SESSION_CHARS} characters")
    try:
        value = json.loads(packet.data) if packet.data else None
    except (ValueError, RecursionError) as exc:
        raise errors.InvalidParams(f"data is not JSON: {exc}") from None
    deadline = packet.deadline_s or DEFAULT_DEADLINE_S
    if not 0 < deadline <= MAX_DEADLINE_S:
        raise errors.InvalidParams(f"deadline_s must be in (0, {MAX_DEADLINE_S:g}]")
    return name, value, deadline, packet.session_id or None


class VdagServicer(pb2_grpc.vDAGInferenceServiceServicer):
    def __init__(self, infer: Infer, portal: TrioPortal) -> None:
        self._infer = infer
        self._portal = portal

    async def infer(  # the AIOS method name
        self, request: pb2.vDAGInferencePacket, context: grpc.aio.ServicerContext
    ) -> pb2.vDAGInferencePacket:
        try:
            name, value, deadline, session = request_of(request, context.invocation_metadata())
            result = await self._portal.call(self._infer, name, value, deadline, session)
            data = json.dumps(result["output"], separators=(",", ":"))
        except GridmeshError as exc:
            await context.abort(grpc.StatusCode[status_of(exc).grpc], exc.message)
        except (TypeError, ValueError) as exc:  # an output JSON cannot carry (bytes)
            await context.abort(grpc.StatusCode.INTERNAL, f"the output is not JSON: {exc}")
        return pb2.vDAGInferencePacket(
            session_id=request.session_id, seq_no=request.seq_no, data=data, ts=time.time()
        )


def add_vdag_service(server: grpc.aio.Server, portal: TrioPortal, infer: Infer) -> str:
    """Serve vDAGInferenceService on `server`; its full name (for reflection and auth)."""
    pb2_grpc.add_vDAGInferenceServiceServicer_to_server(VdagServicer(infer, portal), server)
    return SERVICE_NAME
