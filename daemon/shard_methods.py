"""The block_*, shard_plan and generate JSON-RPC methods."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

import trio
from msgspec import Meta

from daemon import errors
from daemon.api.generation import (
    ClientId,
    JobId,
    MaxTokens,
    Model,
    PaidJobId,
    Prompt,
    PromptTokens,
    Seed,
    Temperature,
    one_prompt,
    paid_job_id,
)
from daemon.api.jsonrpc import REQUESTER, Dispatcher, RPCError, rpc_error
from daemon.errors import InvalidParams, ShardFailure, status_of
from daemon.shards.service import Job, ShardService, ShardServiceError
from p2p.records import MAX_PRICE_PER_UNIT

if TYPE_CHECKING:
    from p2p.discovery import ResourceDirectory

log = logging.getLogger(__name__)

# the codes clients see for these kinds (decided by the table in daemon.errors)
SHARD_ERROR = status_of(ShardFailure).jsonrpc
BUSY = status_of(errors.Busy).jsonrpc  # a cap on running generations was reached: retry later

ModelDir = Annotated[str, Meta(description="local directory of an HF Llama checkpoint")]
Dtype = Annotated[str, Meta(description="float32 (default), float16 or bfloat16")]
Nodes = Annotated[
    Annotated[int, Meta(ge=1)] | None, Meta(description="split over exactly this many nodes")
]
Replicas = Annotated[int, Meta(description="copies of the chain when capacity allows")]
Cluster = (
    Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z0-9._:@-]{1,64}$",
            description="deploy through this cluster's coordinator (as cluster_deploy)",
        ),
    ]
    | None
)
Plan = Annotated[
    list[Any] | None,
    Meta(description="[{peer_id, start, end}]; planned automatically if absent"),
]
Layer = Annotated[int, Meta(description="a layer index: the first, or one past the last")]
EveryServer = Annotated[
    bool,
    Meta(
        description="also ask every announced server of the model to unload it "
        "(default false: only this daemon)"
    ),
]
ModelFilter = Annotated[str | None, Meta(description="only this model")]
StreamJob = Annotated[bool, Meta(description="return a job id at once; poll generate_poll")]
Relay = Annotated[
    bool,
    Meta(
        description="send every hop's activations through this node instead of letting each "
        "server push to the next (default false)"
    ),
]
Since = Annotated[int, Meta(ge=0, description="return tokens from this index on")]
MaxPrice = Annotated[
    Annotated[int, Meta(ge=0, le=MAX_PRICE_PER_UNIT)] | None,
    Meta(
        description="use no provider whose price per layer-token is over this, or that "
        "declares none (default: [market] max_price_per_unit; unset there: any)"
    ),
]


def _job_failed(job: Job) -> RPCError:
    """A finished generation's error as JSON-RPC sends it, with the job's state as data."""
    return rpc_error(job.failure())


async def _run_job(job: Job, run: Any) -> None:
    """Run a job's generation inside its cancel scope; it ends done either way, and never
    raises (a streaming job runs in the daemon's nursery)."""
    try:
        with job.scope:
            await run
    except Exception as exc:
        log.exception("generation %s failed", job.id)
        job.fail(f"internal error: {type(exc).__name__}: {exc}")
    if not job.done or (job.scope.cancelled_caught and job.error is None):
        # cancelled (generate_cancel) before or while service.generate ran
        if job.error is None:
            job.fail("cancelled", errors.Cancelled)
        job.done, job.finished = True, job.finished or time.time()


def register_shard_methods(
    dispatcher: Dispatcher, service: ShardService, directory: ResourceDirectory
) -> None:
    def _max_price(given: int | None) -> int | None:
        """A call's maximum price per unit, else the node's ([market] max_price_per_unit)."""
        return service.default_max_price if given is None else given

    async def _model_spec(model_dir: str, dtype: str) -> Any:
        await service.ensure_torch()
        from daemon.shards.model import LlamaConfig, ModelError, model_spec

        try:
            config = LlamaConfig.from_dir(model_dir)
        except (ModelError, OSError) as exc:
            raise InvalidParams(f"cannot read the model in {model_dir}: {exc}") from None
        return config, model_spec(config, model_dir, dtype)  # weights and KV-cache sizes

    def _accepts_deploys(record: Any) -> bool:
        """This node (local control), or a peer whose record says it takes remote deploys."""
        if record.peer_id == service.ident.peer_id:
            return True
        return record.resources.get("accepts_deploys") is True

    async def _plan(
        model_dir: str, dtype: str, nodes: int | None, replicas: int, max_price: int | None
    ) -> Any:
        from scheduler.shard_plan import Candidate, PlanError, plan_shards, plan_with_nodes

        _, spec = await _model_spec(model_dir, dtype)
        records = await directory.find()
        candidates = []
        refusing = 0
        for record in records:
            if not _accepts_deploys(record):
                refusing += 1
                continue
            res = record.resources
            memory = (res.get("memory") or {}).get("available_bytes") or 0
            cores = (res.get("cpu") or {}).get("cores") or 1
            candidates.append(
                Candidate(
                    record.peer_id,
                    int(memory),
                    float(cores),
                    price_per_unit=record.price_per_unit,
                )
            )
        note = (
            f" ({refusing} known node(s) do not accept deploys from peers: "
            "[shards] allow_remote_deploy = false)"
            if refusing
            else ""
        )
        dear = sum(  # left out for price (the planner says so itself when it fails)
            1
            for c in candidates
            if max_price is not None and (c.price_per_unit is None or c.price_per_unit > max_price)
        )
        if nodes is not None and nodes > len(candidates) - dear:
            priced = (
                f", {dear} of them excluded for price (over the maximum of {max_price} per "
                "unit, or declaring no price)"
                if dear
                else ""
            )
            raise ShardFailure(
                f"no plan: asked for exactly {nodes} nodes, but only {len(candidates)} known "
                f"node(s) accept a deploy{priced}{note}",
                {"reason": "too_few_nodes"},
            )
        try:
            if nodes is None:
                return plan_shards(
                    spec, candidates, replicas=replicas, max_price_per_unit=max_price
                )
            return plan_with_nodes(
                spec, candidates, nodes, replicas=replicas, max_price_per_unit=max_price
            )
        except PlanError as exc:
            raise ShardFailure(f"no plan: {exc}{note}", {"reason": "no_plan"}) from None

    async def shard_plan(
        model_dir: ModelDir,
        dtype: Dtype = "float32",
        nodes: Nodes = None,
        replicas: Replicas = 1,
        max_price_per_unit: MaxPrice = None,
    ) -> dict[str, Any]:
        """Dry run: how the model's layers would be split over the known nodes."""
        plan = await _plan(model_dir, dtype, nodes, replicas, _max_price(max_price_per_unit))
        return plan.to_json()

    async def _unload_on(peer_id: str, model: str) -> dict[str, Any]:
        """Ask `peer_id` (or this node) to stop serving `model`: {peer_id, ok, unloaded|error}."""
        if peer_id == service.ident.peer_id:
            return {"peer_id": peer_id, "ok": True, "unloaded": await service.unload(model)}
        from daemon.shards.service import CONTROL_PROTOCOL
        from p2p import codec
        from p2p.network import NetworkError

        message = codec.encode({"op": "unload", "model": model})
        try:
            raw = await service.net.request(peer_id, CONTROL_PROTOCOL, message, timeout_s=30.0)
            reply = codec.decode(raw, max_bytes=16 * 1024)
        except (NetworkError, codec.CodecError) as exc:
            return {"peer_id": peer_id, "ok": False, "error": f"unreachable: {exc}"}
        if not isinstance(reply, dict) or "error" in reply:
            error = reply.get("error") if isinstance(reply, dict) else "malformed reply"
            return {"peer_id": peer_id, "ok": False, "error": str(error)[:300]}
        return {"peer_id": peer_id, "ok": True, "unloaded": bool(reply.get("ok"))}

    async def block_deploy(
        model: Model,
        model_dir: ModelDir,
        dtype: Dtype = "float32",
        plan: Plan = None,
        nodes: Nodes = None,
        replicas: Replicas = 1,
        max_price_per_unit: MaxPrice = None,
        cluster: Cluster = None,
    ) -> dict[str, Any]:
        """Ask each chosen daemon to load its range of layers; if any fails, those that loaded
        unload again (rolled_back) and ok is false.

        nodes, replicas and max_price_per_unit apply to the automatic plan. With cluster, the
        cluster's coordinator places, heals and scales the block instead (cluster_deploy).
        """
        if cluster is not None:
            if plan is not None or nodes is not None or max_price_per_unit is not None:
                raise InvalidParams(
                    "plan, nodes and max_price_per_unit do not go with cluster: the cluster's "
                    "coordinator places the block (see cluster_plan for its dry run)"
                )
            deploy = dispatcher.handler("cluster_deploy")
            if deploy is None:
                raise InvalidParams("this daemon has no cluster coordinator to deploy through")
            return await deploy(
                name=cluster, model=model, model_dir=model_dir, dtype=dtype, replicas=replicas
            )
        if plan is None:
            max_price = _max_price(max_price_per_unit)
            automatic = await _plan(model_dir, dtype, nodes, replicas, max_price)
            assignments = [
                {"peer_id": a.peer_id, "start": a.start, "end": a.end}
                for a in automatic.assignments
            ]
        else:
            assignments = []
            for item in plan:
                if not (
                    isinstance(item, dict)
                    and isinstance(item.get("peer_id"), str)
                    and isinstance(item.get("start"), int)
                    and isinstance(item.get("end"), int)
                ):
                    raise InvalidParams("plan items are {peer_id, start, end}")
                assignments.append(item)
        results: list[dict[str, Any]] = [{} for _ in assignments]

        async def load(index: int, item: dict[str, Any]) -> None:
            request = {
                "model": model,
                "model_dir": model_dir,
                "start": item["start"],
                "end": item["end"],
                "dtype": dtype,
            }
            try:
                block = await service.load_on(item["peer_id"], request)
                results[index] = {"peer_id": item["peer_id"], "ok": True, "block": block}
            except ShardServiceError as exc:
                results[index] = {"peer_id": item["peer_id"], "ok": False, "error": str(exc)}

        async with trio.open_nursery() as nursery:  # every daemon loads at the same time
            for index, item in enumerate(assignments):
                nursery.start_soon(load, index, item)
        rolled_back: list[dict[str, Any]] = []
        if not all(r["ok"] for r in results):
            # All or nothing: a half-deployed model only answers "missing layers" later.
            loaded = sorted({r["peer_id"] for r in results if r["ok"]})
            rolled_back = [{} for _ in loaded]

            async def unload(index: int, peer_id: str) -> None:
                rolled_back[index] = await _unload_on(peer_id, model)

            async with trio.open_nursery() as nursery:
                for index, peer_id in enumerate(loaded):
                    nursery.start_soon(unload, index, peer_id)
        return {
            "model": model,
            "ok": not rolled_back and all(r["ok"] for r in results),
            "assignments": assignments,
            "results": results,
            "rolled_back": rolled_back,
        }

    async def block_load(
        model: Model, model_dir: ModelDir, start: Layer, end: Layer, dtype: Dtype = "float32"
    ) -> dict[str, Any]:
        """Load a range of layers on this daemon and announce it."""
        try:
            return await service.load(model, model_dir, start, end, dtype)
        except ShardServiceError as exc:
            raise errors.from_shard_service(exc) from None

    async def block_undeploy(model: Model, network: EveryServer = False) -> dict[str, Any]:
        """Stop serving the model on this daemon, or on every server that announces it."""
        if not network:
            return {"model": model, "unloaded": await service.unload(model)}
        peers = {server["peer_id"] for server in service.announced(model)}
        if service.local_block(model) is not None:
            peers.add(service.ident.peer_id)
        results: list[dict[str, Any]] = [{} for _ in peers]

        async def unload(index: int, peer_id: str) -> None:
            results[index] = await _unload_on(peer_id, model)

        async with trio.open_nursery() as nursery:
            for index, peer_id in enumerate(sorted(peers)):
                nursery.start_soon(unload, index, peer_id)
        return {
            "model": model,
            "unloaded": any(r.get("unloaded") for r in results),
            "results": results,
        }

    async def block_list(model: ModelFilter = None) -> dict[str, Any]:
        """Shards loaded here, and every announced server per model.

        Entries are read through their typed form (`registry.blocks`); a `blocks` entry that
        is no announcement (an AIOS block spec) is not listed, an unreadable one is counted.
        """
        from registry.blocks import announcements

        if model:
            models = {model}
        else:
            models = {
                a.model for a in announcements(list(service.replica.entries.of_kind("blocks")))
            }
        announced = {name: service.announced(name) for name in sorted(models)}
        return {"local": service.local_blocks(), "announced": announced}

    async def generate(
        model: Model,
        prompt: Prompt | None = None,
        token_ids: PromptTokens | None = None,
        max_tokens: MaxTokens = 32,
        temperature: Temperature = 0.0,
        seed: Seed | None = None,
        stream: StreamJob = False,
        relay: Relay = False,
        client: ClientId | None = None,
        max_price_per_unit: MaxPrice = None,
        job_id: PaidJobId | None = None,
    ) -> dict[str, Any]:
        """Generate through the chain of shard servers (greedy or seeded sampling); as a paid
        job when `job_id` is given."""
        one_prompt(prompt, token_ids)  # bounds and types: checked from the annotations
        ids = list(token_ids) if token_ids is not None else await _encode(model, prompt or "")
        # per-requester caps: the client id if given, else the HTTP connection
        owner = f"rpc-client:{client}" if client is not None else REQUESTER.get() or "rpc"
        try:
            job = service.new_job(owner)
        except ShardServiceError as exc:
            raise errors.from_shard_service(exc) from None
        run = _run_job(
            job,
            service.generate(
                job,
                model,
                ids,
                max_tokens,
                temperature=temperature,
                seed=seed,
                relay=relay,
                max_price_per_unit=_max_price(max_price_per_unit),
                # only a paid generation names a job (free work calls as before)
                **paid_job_id(job_id),
            ),
        )
        if stream:
            service.spawn(lambda: run)
            return {"job": job.id}
        try:
            await run
        finally:
            service.drop_job(job.id)  # the answer carries the final state
        if job.error:
            raise _job_failed(job)
        return job.to_json()

    async def _encode(model: str, prompt: str) -> list[int]:
        try:
            return await service.encode_prompt(model, prompt)
        except ShardServiceError as exc:
            raise errors.from_encoding(exc) from None

    async def generate_poll(job: JobId, since: Since = 0) -> dict[str, Any]:
        """Tokens of a streaming generation so far, and whether it is done."""
        state = service.read_job(job, since)  # a finished job is dropped once read
        if state is None:
            raise InvalidParams(f"unknown job {job[:40]!r} (finished jobs are kept until read)")
        return state

    async def generate_cancel(job: JobId) -> dict[str, Any]:
        """Stop a streaming generation and forget its job."""
        found = service.cancel_job(job)
        if found is None:
            raise InvalidParams(f"unknown job {job[:40]!r}")
        return {"job": found.id, "cancelled": not found.done}

    for handler in (
        shard_plan,
        block_deploy,
        block_load,
        block_undeploy,
        block_list,
        generate,
        generate_poll,
        generate_cancel,
    ):
        dispatcher.register(handler.__name__, handler)
