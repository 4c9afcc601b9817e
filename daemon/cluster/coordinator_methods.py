"""The JSON-RPC methods of a cluster's coordinator. Called on any member: each goes to the
cluster's coordinator, over `coordinator_wire.COORDINATOR_PROTOCOL` when this node is not it
(the coordinator answers only active members of the cluster). The model's size is read here,
from `model_dir` on this node; the members load their ranges from the same path on theirs.

- `cluster_deploy {name, model, model_dir, dtype="float32", replicas=1, min_instances=replicas,
  max_instances=max(replicas, min_instances), wait_s=60}`: deploy (or change) a block
  through the cluster: placed by the coordinator, healed when a member serving it dies,
  scaled between min_instances and max_instances by the load its servers announce. Waits
  up to `wait_s` for every assigned range to be announced; returns {ok, cluster, model,
  coordinator, term, spec, target, servers: [{peer_id, start, end, state, utilisation,
  queue_length}], last_placement (as cluster_plan), events: [{at, model, action, reason}]}.
- `cluster_plan {name, model_dir, model=model_dir, dtype="float32", replicas=1}`: a dry run
  on the coordinator: how a fresh deploy would be placed on the live members now. Returns
  {cluster, coordinator, term, model, num_layers, replicas, assignments: [{peer_id, start,
  end, replica}], start, end, scores: [{peer_id, total, terms: {memory, throughput, rtt,
  energy, carbon} (each weighted; costs negative), inputs: {free_bytes, budget_bytes,
  ms_per_layer, gpu_power_w, energy_price_per_kwh, carbon_g_per_kwh, mean_rtt_ms,
  energy_cost_per_layer, carbon_g_per_layer}, assumed: [inputs not declared or measured],
  chosen, next_hop_rtt_ms}] best first, excluded: {peer_id: why}}.
- `cluster_undeploy {name, model}`: stop a block deployed through the cluster (its servers
  in the cluster are released); {cluster, model, released: {peer_id: null or why not}}.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import trio
from msgspec import Meta

from daemon.api.jsonrpc import Dispatcher
from daemon.cluster import coordinator_wire as wire
from daemon.cluster.coordinator import ClusterCoordinator, CoordinatorSettings
from daemon.cluster.coordinator_member import TableFile
from daemon.cluster.coordinator_state import ScalingSettings
from daemon.errors import FailedPrecondition, InvalidParams, NetworkFailure, Unavailable
from p2p.network import NetworkError
from scheduler.election_driver import NotCoordinatorError
from scheduler.placement import PlacementWeights

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from daemon.cluster.runtime import ClusterRuntime
    from daemon.metrics import Metrics
    from daemon.settings import Config
    from daemon.shards.service import ShardService
    from p2p.discovery import ResourceDirectory
    from registry.replica import Replica

Name = Annotated[
    str,
    Meta(
        pattern=r"^[A-Za-z0-9._:@-]{1,64}$",
        description="the cluster's name (1..64 of A-Z a-z 0-9 . _ : @ -)",
    ),
]
Model = Annotated[str, Meta(min_length=1, max_length=256, description="the model's name")]
ModelDir = Annotated[
    str,
    Meta(min_length=1, max_length=4096, description="the HF Llama checkpoint's directory"),
]
Dtype = Annotated[str, Meta(description="float32 (default), float16 or bfloat16")]
Instances = Annotated[int, Meta(ge=1, le=wire.MAX_INSTANCES)]
WaitS = Annotated[
    float,
    Meta(ge=0, le=wire.MAX_WAIT_S, description="how long to wait for the ranges to be served"),
]
DTYPES = ("float32", "float16", "bfloat16")
RETRY_PAUSE_S = 0.5  # before a forwarded request whose stream broke is sent again (x attempt)
MAX_ASKS = 4  # tries of a forwarded idempotent request in all


def register_coordinator_methods(dispatcher: Dispatcher, coordinator: ClusterCoordinator) -> None:
    runtime = coordinator.runtime

    async def shape_of(model_dir: str, dtype: str) -> wire.ModelShape:
        if dtype not in DTYPES:
            raise InvalidParams(f"dtype must be one of {', '.join(DTYPES)}")
        await coordinator.shards.ensure_torch()
        from daemon.shards.model import LlamaConfig, ModelError, plan_sizes

        try:
            config = LlamaConfig.from_dir(model_dir)
        except (ModelError, OSError) as exc:
            raise InvalidParams(f"cannot read the model in {model_dir}: {exc}") from None
        return wire.ModelShape(**plan_sizes(config, dtype))

    async def ask(
        cluster: str, request: Any, wait_s: float = 0.0, *, idempotent: bool = True
    ) -> dict[str, Any]:
        """`request` answered by the cluster's coordinator: this node, or forwarded. A
        forwarded idempotent request whose stream broke before its time was up is sent again
        (at most MAX_ASKS times in all), to whoever coordinates then: a connection reset under
        load, or a coordinator that died meanwhile, must not fail a deploy that would succeed
        on a second try."""
        started = trio.current_time()
        for attempt in range(1, MAX_ASKS + 1):
            elapsed = trio.current_time() - started
            try:
                return await ask_once(cluster, request, max(wait_s - elapsed, 0.0))
            except NetworkFailure as exc:
                elapsed = trio.current_time() - started
                timed_out = elapsed > wait_s + coordinator.settings.forward_timeout_s / 2
                if not idempotent or timed_out or attempt == MAX_ASKS:
                    raise
                log.info("asking the coordinator of %s again: %s", cluster, exc.message)
                await trio.sleep(RETRY_PAUSE_S * attempt)
        raise AssertionError("unreachable")  # the loop returns or raises

    async def ask_once(cluster: str, request: Any, wait_s: float) -> dict[str, Any]:
        if runtime.is_coordinator(cluster):
            try:
                return await coordinator.handle(request)
            except NotCoordinatorError:  # the lease ran out meanwhile (a loaded machine)
                raise Unavailable(
                    f"this node no longer coordinates {cluster!r}: retry",
                    {"reason": "not_coordinator", "coordinator": None},
                ) from None
        leader, term = runtime.coordinator(cluster)
        if leader is None or leader == coordinator.me:
            raise Unavailable(
                f"no coordinator of {cluster!r} is known here (term {term}): this node is not "
                "a member, or an election is under way; retry",
                {"reason": "no_coordinator"},
            )
        try:
            raw = await coordinator.net.request(
                leader,
                wire.COORDINATOR_PROTOCOL,
                wire.encode_request(request),
                timeout_s=wait_s + coordinator.settings.forward_timeout_s,
            )
            reply = wire.decode_reply(raw)
        except NetworkError as exc:
            raise NetworkFailure(f"the coordinator {leader} did not answer: {exc}") from None
        except wire.WireError as exc:
            raise NetworkFailure(f"the coordinator {leader} answered oddly: {exc}") from None
        if reply.get("ok") is True and isinstance(reply.get("result"), dict):
            return reply["result"]
        reason = str(reply.get("reason"))[:64]
        error = str(reply.get("error"))[:2000]
        data = {"reason": reason, "coordinator": leader}
        if reason == "not_coordinator":
            raise Unavailable(f"{leader} no longer coordinates {cluster!r}: retry", data)
        raise FailedPrecondition(f"the coordinator {leader} refused: {error}", data)

    async def cluster_deploy(
        name: Name,
        model: Model,
        model_dir: ModelDir,
        dtype: Dtype = "float32",
        replicas: Instances = 1,
        min_instances: Instances | None = None,
        max_instances: Instances | None = None,
        wait_s: WaitS = 60.0,
    ) -> dict[str, Any]:
        """Deploy a block through a cluster's coordinator, which places it on the members,
        heals it when one dies and scales it between min_instances and max_instances."""
        low = replicas if min_instances is None else min_instances
        high = max(replicas, low) if max_instances is None else max_instances
        spec = wire.DeploySpec(
            model, model_dir, await shape_of(model_dir, dtype), dtype, replicas, low, high
        )
        if problem := spec.problem():
            raise InvalidParams(problem)
        return await ask(name, wire.DeployRequest(name, spec, wait_s), wait_s)

    async def cluster_plan(
        name: Name,
        model_dir: ModelDir,
        model: Model | None = None,
        dtype: Dtype = "float32",
        replicas: Instances = 1,
    ) -> dict[str, Any]:
        """Dry run on the cluster's coordinator: the placement of a fresh deploy, with every
        member's score broken down by term (memory, throughput, rtt, energy, carbon)."""
        shape = await shape_of(model_dir, dtype)
        spec = wire.DeploySpec(
            model or model_dir, model_dir, shape, dtype, replicas, replicas, replicas
        )
        return await ask(name, wire.PlanRequest(name, spec))

    async def cluster_undeploy(name: Name, model: Model) -> dict[str, Any]:
        """Stop a block deployed through the cluster: its servers there are released."""
        return await ask(name, wire.UndeployRequest(name, model), idempotent=False)

    for handler in (cluster_deploy, cluster_plan, cluster_undeploy):
        dispatcher.register(handler.__name__, handler)
    coordinator.rpc_deploy = cluster_deploy


def coordinator_for(
    dispatcher: Dispatcher,
    runtime: ClusterRuntime,
    shards: ShardService,
    directory: ResourceDirectory,
    replica: Replica,
    metrics: Metrics,
    config: Config,
    tables: Path | None = None,
) -> ClusterCoordinator:
    """The daemon's coordinator, its methods registered; its settings, placement weights and
    scaling thresholds from the `[cluster]` keys that expose them (defaults otherwise); the
    deployment tables kept in `tables` (a file; None: in memory)."""
    section = config.cluster
    coordinator = ClusterCoordinator(
        runtime=runtime,
        shards=shards,
        directory=directory,
        replica=replica,
        on_reject=lambda reason: metrics.reject("cluster_coordinator", reason),
        settings=CoordinatorSettings(**section.values_for(CoordinatorSettings)),
        weights=PlacementWeights(**section.values_for(PlacementWeights)),
        scaling=ScalingSettings(**section.values_for(ScalingSettings)),
        tables=TableFile(tables),
    )
    register_coordinator_methods(dispatcher, coordinator)
    return coordinator
