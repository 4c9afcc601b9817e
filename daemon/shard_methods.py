"""The block_*, shard_plan and generate JSON-RPC methods."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
import trio

from daemon.api.jsonrpc import REQUESTER, Dispatcher, Param, RPCError, invalid_params
from daemon.shards.service import Job, ShardService, ShardServiceError

if TYPE_CHECKING:
    from daemon.node import Daemon

log = logging.getLogger(__name__)

SHARD_ERROR = -32030
BUSY = -32031  # a cap on running generations was reached: retry later
MAX_NEW_TOKENS = 4096
MAX_CLIENT_ID_CHARS = 64
MAX_PROMPT_CHARS = 1 << 20  # as the gRPC API
MAX_PROMPT_TOKENS = 32768
MAX_MODEL_CHARS = 256
MAX_JOB_ID_CHARS = 64

TokenId = Annotated[int, msgspec.Meta(ge=0, le=(1 << 31) - 1)]
JobId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_JOB_ID_CHARS)]


class GenerateParams(msgspec.Struct, forbid_unknown_fields=True):
    """`generate`'s params with their bounds (the JSON-RPC dispatcher validates into it)."""

    model: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_MODEL_CHARS)]
    prompt: Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)] | None = None
    token_ids: (
        Annotated[list[TokenId], msgspec.Meta(min_length=1, max_length=MAX_PROMPT_TOKENS)] | None
    ) = None
    max_tokens: Annotated[int, msgspec.Meta(ge=1, le=MAX_NEW_TOKENS)] = 32
    temperature: Annotated[float, msgspec.Meta(ge=0, le=10)] = 0.0
    seed: Annotated[int, msgspec.Meta(ge=-(1 << 63), le=(1 << 63) - 1)] | None = None
    stream: bool = False
    relay: bool = False
    client: Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_CLIENT_ID_CHARS)] | None = None


class PollParams(msgspec.Struct, forbid_unknown_fields=True):
    job: JobId
    since: Annotated[int, msgspec.Meta(ge=0)] = 0


class CancelParams(msgspec.Struct, forbid_unknown_fields=True):
    job: JobId


def _failed(exc: ShardServiceError) -> RPCError:
    code = BUSY if exc.code == "busy" else SHARD_ERROR
    return RPCError(code, f"{exc.code}: {exc}", {"reason": exc.code})


def _job_failed(job: Job) -> RPCError:
    error = job.error or ""
    code = BUSY if "busy" in error else SHARD_ERROR
    return RPCError(code, error, job.to_json())


async def _run_job(job: Job, run: Any) -> None:
    """Run a job's generation inside its cancel scope; it ends done either way, and never
    raises (a streaming job runs in the daemon's nursery)."""
    try:
        with job.scope:
            await run
    except Exception as exc:
        log.exception("generation %s failed", job.id)
        job.error = f"internal error: {type(exc).__name__}: {exc}"
    if not job.done or (job.scope.cancelled_caught and job.error is None):
        # cancelled (generate_cancel) before or while service.generate ran
        job.error = job.error or "cancelled"
        job.done, job.finished = True, job.finished or time.time()


def register_shard_methods(dispatcher: Dispatcher, daemon: Daemon, service: ShardService) -> None:
    async def _model_spec(model_dir: str, dtype: str) -> Any:
        await service.ensure_torch()
        from daemon.shards.model import LlamaConfig, ModelError
        from scheduler.shard_plan import ModelSpec

        try:
            config = LlamaConfig.from_dir(model_dir)
        except (ModelError, OSError) as exc:
            raise invalid_params(f"cannot read the model in {model_dir}: {exc}") from None
        return config, ModelSpec(
            name=model_dir,
            num_layers=config.num_hidden_layers,
            layer_bytes=config.layer_bytes(dtype),
            embed_bytes=config.embed_bytes(dtype),
            head_bytes=config.head_bytes(dtype),
        )

    def _accepts_deploys(record: Any) -> bool:
        """This node (local control), or a peer whose record says it takes remote deploys."""
        if record.peer_id == daemon.ident.peer_id:
            return True
        return record.resources.get("accepts_deploys") is True

    async def _plan(model_dir: str, dtype: str, nodes: int | None, replicas: int) -> Any:
        from scheduler.shard_plan import Candidate, PlanError, plan_shards, plan_with_nodes

        if nodes is not None and nodes < 1:
            raise invalid_params("nodes must be at least 1")
        _, spec = await _model_spec(model_dir, dtype)
        records = await daemon.directory.find()
        candidates = []
        refusing = 0
        for record in records:
            if not _accepts_deploys(record):
                refusing += 1
                continue
            res = record.resources
            memory = (res.get("memory") or {}).get("available_bytes") or 0
            cores = (res.get("cpu") or {}).get("cores") or 1
            candidates.append(Candidate(record.peer_id, int(memory), float(cores)))
        note = (
            f" ({refusing} known node(s) do not accept deploys from peers: "
            "[shards] allow_remote_deploy = false)"
            if refusing
            else ""
        )
        if nodes is not None and nodes > len(candidates):
            raise RPCError(
                SHARD_ERROR,
                f"no plan: asked for exactly {nodes} nodes, but only {len(candidates)} known "
                f"node(s) accept a deploy{note}",
                {"reason": "too_few_nodes"},
            )
        try:
            if nodes is None:
                return plan_shards(spec, candidates, replicas=replicas)
            return plan_with_nodes(spec, candidates, nodes, replicas=replicas)
        except PlanError as exc:
            raise RPCError(SHARD_ERROR, f"no plan: {exc}{note}", {"reason": "no_plan"}) from None

    async def shard_plan(
        model_dir: str, dtype: str = "float32", nodes: int | None = None, replicas: int = 1
    ) -> dict[str, Any]:
        plan = await _plan(model_dir, dtype, nodes, replicas)
        return plan.to_json()

    async def _unload_on(peer_id: str, model: str) -> dict[str, Any]:
        """Ask `peer_id` (or this node) to stop serving `model`: {peer_id, ok, unloaded|error}."""
        if peer_id == daemon.ident.peer_id:
            return {"peer_id": peer_id, "ok": True, "unloaded": await service.unload(model)}
        from daemon.shards.service import CONTROL_PROTOCOL
        from p2p import codec
        from p2p.network import NetworkError

        message = codec.encode({"op": "unload", "model": model})
        try:
            raw = await daemon.net.request(peer_id, CONTROL_PROTOCOL, message, timeout_s=30.0)
            reply = codec.decode(raw, max_bytes=16 * 1024)
        except (NetworkError, codec.CodecError) as exc:
            return {"peer_id": peer_id, "ok": False, "error": f"unreachable: {exc}"}
        if not isinstance(reply, dict) or "error" in reply:
            error = reply.get("error") if isinstance(reply, dict) else "malformed reply"
            return {"peer_id": peer_id, "ok": False, "error": str(error)[:300]}
        return {"peer_id": peer_id, "ok": True, "unloaded": bool(reply.get("ok"))}

    async def block_deploy(
        model: str,
        model_dir: str,
        dtype: str = "float32",
        plan: list[Any] | None = None,
        nodes: int | None = None,
        replicas: int = 1,
    ) -> dict[str, Any]:
        if plan is None:
            assignments = [
                {"peer_id": a.peer_id, "start": a.start, "end": a.end}
                for a in (await _plan(model_dir, dtype, nodes, replicas)).assignments
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
                    raise invalid_params("plan items are {peer_id, start, end}")
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
        model: str, model_dir: str, start: int, end: int, dtype: str = "float32"
    ) -> dict[str, Any]:
        try:
            return await service.load(model, model_dir, start, end, dtype)
        except ShardServiceError as exc:
            raise _failed(exc) from None

    async def block_undeploy(model: str, network: bool = False) -> dict[str, Any]:
        if not network:
            return {"model": model, "unloaded": await service.unload(model)}
        peers = {server["peer_id"] for server in service.announced(model)}
        if service.local_block(model) is not None:
            peers.add(daemon.ident.peer_id)
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

    async def block_list(model: str | None = None) -> dict[str, Any]:
        """Shards served here, and per model every server's own announcement: entries are
        read through their typed form (`registry.blocks`); a `blocks` entry that is no
        announcement (an AIOS block spec) is not listed, an unreadable one is counted."""
        from registry.blocks import announcements

        if model:
            models = {model}
        else:
            models = {a.model for a in announcements(list(daemon.replica.entries.values()))}
        announced = {name: service.announced(name) for name in sorted(models)}
        return {"local": service.local_blocks(), "announced": announced}

    async def generate(
        model: str,
        prompt: str | None = None,
        token_ids: list[Any] | None = None,
        max_tokens: int = 32,
        temperature: float = 0.0,
        seed: int | None = None,
        stream: bool = False,
        relay: bool = False,
        client: str | None = None,
    ) -> dict[str, Any]:
        # bounds and types: checked by the dispatcher against GenerateParams
        if (prompt is None) == (token_ids is None):
            raise invalid_params("give exactly one of prompt or token_ids")
        ids = list(token_ids) if token_ids is not None else await _encode(model, prompt or "")
        # per-requester caps: the client id if given, else the HTTP connection
        owner = f"rpc-client:{client}" if client is not None else REQUESTER.get() or "rpc"
        try:
            job = service.new_job(owner)
        except ShardServiceError as exc:
            raise _failed(exc) from None
        run = _run_job(
            job,
            service.generate(
                job, model, ids, max_tokens, temperature=temperature, seed=seed, relay=relay
            ),
        )
        if stream:
            daemon.nursery.start_soon(lambda: run)
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
            raise invalid_params(str(exc)) from None

    async def generate_poll(job: str, since: int = 0) -> dict[str, Any]:
        state = service.read_job(job, since)  # a finished job is dropped once read
        if state is None:
            raise invalid_params(f"unknown job {job[:40]!r} (finished jobs are kept until read)")
        return state

    async def generate_cancel(job: str) -> dict[str, Any]:
        found = service.cancel_job(job)
        if found is None:
            raise invalid_params(f"unknown job {job[:40]!r}")
        return {"job": found.id, "cancelled": not found.done}

    model_param = Param("model", (str,), True, "model id the shards were deployed under")
    dir_param = Param("model_dir", (str,), True, "local directory of an HF Llama checkpoint")
    dtype_param = Param("dtype", (str,), False, "float32 (default), float16 or bfloat16")
    dispatcher.register(
        "shard_plan",
        shard_plan,
        [
            dir_param,
            dtype_param,
            Param("nodes", (int,), False, "split over exactly this many nodes"),
            Param("replicas", (int,), False, "copies of the chain when capacity allows"),
        ],
        "Dry run: how the model's layers would be split over the known nodes.",
    )
    dispatcher.register(
        "block_deploy",
        block_deploy,
        [
            model_param,
            dir_param,
            dtype_param,
            Param(
                "plan", (list,), False, "[{peer_id, start, end}]; planned automatically if absent"
            ),
            Param("nodes", (int,), False, "for the automatic plan: exactly this many nodes"),
            Param("replicas", (int,), False, "for the automatic plan"),
        ],
        "Ask each chosen daemon to load its range of layers; if any fails, those that loaded "
        "unload again (rolled_back) and ok is false.",
    )
    dispatcher.register(
        "block_load",
        block_load,
        [
            model_param,
            dir_param,
            Param("start", (int,), True, "first layer"),
            Param("end", (int,), True, "one past the last layer"),
            dtype_param,
        ],
        "Load a range of layers on this daemon and announce it.",
    )
    dispatcher.register(
        "block_undeploy",
        block_undeploy,
        [
            model_param,
            Param(
                "network",
                (bool,),
                False,
                "also ask every announced server of the model to unload it (default false: "
                "only this daemon)",
            ),
        ],
        "Stop serving the model on this daemon, or on every server that announces it.",
    )
    dispatcher.register(
        "block_list",
        block_list,
        [Param("model", (str,), False, "only this model")],
        "Shards loaded here, and every announced server per model.",
    )
    dispatcher.register(
        "generate",
        generate,
        [
            model_param,
            Param("prompt", (str,), False, "text (needs a local shard for the tokenizer)"),
            Param("token_ids", (list,), False, "token ids instead of a prompt"),
            Param("max_tokens", (int,), False, "new tokens, default 32"),
            Param("temperature", (float,), False, "0 (default) is greedy"),
            Param("seed", (int,), False, "sampling seed"),
            Param("stream", (bool,), False, "return a job id at once; poll generate_poll"),
            Param(
                "relay",
                (bool,),
                False,
                "send every hop's activations through this node instead of letting each "
                "server push to the next (default false)",
            ),
            Param(
                "client",
                (str,),
                False,
                "an id for this client: running generations are capped per id "
                "(default: per connection)",
            ),
        ],
        "Generate through the chain of shard servers (greedy or seeded sampling).",
        struct=GenerateParams,
    )
    dispatcher.register(
        "generate_poll",
        generate_poll,
        [
            Param("job", (str,), True, "job id from generate with stream=true"),
            Param("since", (int,), False, "return tokens from this index on"),
        ],
        "Tokens of a streaming generation so far, and whether it is done.",
        struct=PollParams,
    )
    dispatcher.register(
        "generate_cancel",
        generate_cancel,
        [Param("job", (str,), True, "job id from generate with stream=true")],
        "Stop a streaming generation and forget its job.",
        struct=CancelParams,
    )
