"""The vdag_* JSON-RPC methods: vDAG specs checked against the registries, and their plans.

The registry refuses what a vDAG entry gets wrong by itself (`registry.vdags`: cycles,
dangling edges, names...). What needs the other entries is checked here, at this node's
apply path, from its replica: a block node's ``manualBlockId`` must name a block (an entry
of the `blocks` registry, or a model that servers announce), and every sub-vDAG must
resolve, without a loop through the nesting (`scheduler.vdag.compile_plan`). A peer's vDAG
arriving by gossip is not judged so: the blocks it names may simply not have reached this
node yet.

- `vdag_check(value, key?)`: what `vdag_apply` would refuse, without writing: the plan.
- `vdag_apply(value, key?)`: checked, then written (key: ``name:version``, so that a new
  version leaves the old one resolvable).
- `vdag_plan(name, version?)`: the compiled graph, nesting expanded, with the servers of
  each node's block.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable
from typing import Annotated, Any

from msgspec import Meta

from daemon import errors
from daemon.api.jsonrpc import Dispatcher
from daemon.errors import FailedPrecondition, InvalidParams, NotFound
from daemon.vdags.protocol import MAX_BLOCK_ID, python_instances
from daemon.vdags.values import DEFAULT_DEADLINE_S, MAX_DEADLINE_S
from registry import schemas
from registry.blocks import Announcement, BadAnnouncement, announcements, parse_announcement
from registry.entry import Entry
from registry.replica import Rejected, Replica
from registry.replication import Replicator
from registry.specs import MAX_KEY_LENGTH
from scheduler.vdag import Catalog, VdagError, VdagPlan, VdagSpec, compile_plan, parse

Name = Annotated[
    str, Meta(min_length=1, max_length=MAX_KEY_LENGTH, description="vdagName, or name:version")
]
Version = (
    Annotated[str, Meta(max_length=MAX_KEY_LENGTH, description="a version (default: the latest)")]
    | None
)
Spec = Annotated[dict[str, Any], Meta(description="the vDAG spec (AIOS format)")]
Key = (
    Annotated[
        str, Meta(max_length=MAX_KEY_LENGTH, description="registry key (default: name:version)")
    ]
    | None
)


def stored_specs(replica: Replica) -> Catalog:
    """Every stored vDAG spec by name and version; of two entries with one name and version
    the later written wins. An entry that no longer parses is left out."""
    catalog = Catalog()
    stored = [e for e in replica.entries.of_kind("vdags") if not e.deleted]
    for entry in sorted(stored, key=lambda e: (e.ts, e.key)):
        try:
            catalog.add(parse(entry.value, entry.key))
        except VdagError:
            continue
    return catalog


class Blocks:
    """The `blocks` registry as a vDAG node sees it: which ids name a block, who serves them.

    A ``manualBlockId`` names a block when it is the key of a `blocks` entry (an AIOS block
    spec, or a server's announcement), or a model that servers announce ranges of (one node
    then runs the model's whole shard chain). A block spec with a `model` is served by the
    servers announcing that model."""

    def __init__(self, entries: Iterable[Entry]) -> None:
        self.specs: dict[str, Entry] = {}
        self.by_model: dict[str, list[Announcement]] = defaultdict(list)
        blocks = [e for e in entries if e.kind == "blocks"]
        self.entries = blocks
        for entry in blocks:
            if not entry.deleted:
                self.specs[entry.key] = entry
        for item in announcements(blocks):
            self.by_model[item.model].append(item)
        self.python = {
            str(e.value["parameters"]["instanceOf"])
            for e in blocks
            if not e.deleted
            and isinstance(e.value.get("parameters"), dict)
            and isinstance(e.value["parameters"].get("instanceOf"), str)
        }

    def known(self, block_id: str) -> bool:
        return (
            block_id in self.specs
            or bool(self.by_model.get(block_id))
            or block_id in self.python  # a Python block some daemon announces serving
        )

    def servers(self, block_id: str) -> list[dict[str, Any]]:
        """The servers of `block_id` now: peer, announced range and its key; for a Python
        block, each daemon serving it and the package's digest."""
        if block_id in self.python:
            return [
                {"peer_id": i.peer_id, "kind": "python", "digest": i.digest}
                for i in python_instances(self.entries, block_id)
            ]
        found: list[Announcement] = []
        entry = self.specs.get(block_id)
        model = block_id
        if entry is not None:
            try:
                own = parse_announcement(entry)
            except BadAnnouncement:
                own = None
            if own is not None:
                found.append(own)
            model = str((entry.value or {}).get("model") or block_id)
        if not found:
            found = sorted(self.by_model.get(model, []), key=lambda a: (a.start, a.peer_id))
        return [
            {
                "peer_id": a.peer_id,
                "model": a.model,
                "layers": [a.start, a.end],
                "block": f"{a.model}.{a.start}-{a.end}.{a.peer_id[-12:]}",
            }
            for a in found
        ]


def check(replica: Replica, value: Any, key: str | None = None) -> tuple[VdagSpec, VdagPlan]:
    """The spec and its plan, judged against this replica; InvalidParams naming the node or
    edge for anything refused."""
    try:
        spec = parse(value, key)
        blocks = Blocks(replica.entries.of_kind("blocks"))
        plan = compile_plan(spec, stored_specs(replica).versions, blocks.known)
    except VdagError as exc:
        raise InvalidParams(f"vDAG refused: {exc}", {"reason": "vdag", "path": exc.path}) from None
    return spec, plan


def plan_json(replica: Replica, plan: VdagPlan) -> dict[str, Any]:
    """The plan as JSON, each step with `servers` (its block's servers now)."""
    blocks = Blocks(replica.entries.of_kind("blocks"))
    raw = plan.to_json()
    for step in raw["steps"]:
        step["servers"] = blocks.servers(step["block_id"]) if step["block_id"] else []
    return raw


def register_vdag_methods(dispatcher: Dispatcher, replicator: Replicator) -> None:
    replica = replicator.replica

    async def vdag_check(value: Spec, key: Key = None) -> dict[str, Any]:
        """Check a vDAG spec as vdag_apply would, against this node's registries, without
        writing it: its plan, or an error naming the node or edge."""
        _, plan = check(replica, value, key)
        return plan_json(replica, plan)

    async def vdag_apply(value: Spec, key: Key = None) -> dict[str, Any]:
        """Check a vDAG spec against this node's registries (blocks, sub-vDAGs) and write it
        under `key` (default name:version, so older versions stay resolvable)."""
        spec, _ = check(replica, value, key)
        if key is None:
            try:
                schemas.validate_key("vdags", spec.uri)
            except schemas.SchemaError as exc:
                raise InvalidParams(f"{exc}: give the vDAG a key", {"reason": "key"}) from None
        try:
            entry = await replicator.write("vdags", key or spec.uri, value)
        except Rejected as exc:
            raise errors.from_rejected(exc) from None
        return entry.to_json()

    async def vdag_plan(name: Name, version: Version = None) -> dict[str, Any]:
        """The compiled graph of a stored vDAG (latest version unless given), nested vDAGs
        expanded, with the servers of each node's block."""
        _, plan = resolve_plan(replica, name, version)
        return plan_json(replica, plan)

    for handler in (vdag_check, vdag_apply, vdag_plan):
        dispatcher.register(handler.__name__, handler)


# --------------------------------------------------------------------------- running


Input = Annotated[Any, Meta(description="the vDAG's input (JSON; at most 1 MiB, 16 deep)")]
Deadline = Annotated[
    float, Meta(gt=0, le=MAX_DEADLINE_S, description=f"seconds (default {DEFAULT_DEADLINE_S:g})")
]
Session = (
    Annotated[str, Meta(min_length=1, max_length=128, description="session id (quota key)")] | None
)
ApiKey = (
    Annotated[str, Meta(min_length=1, max_length=128, description="API key (quota key)")] | None
)
BlockId = Annotated[
    str,
    Meta(
        min_length=1, max_length=MAX_BLOCK_ID, pattern=r"^[A-Za-z0-9._:-]+$", description="block id"
    ),
]
BlockPath = Annotated[
    str, Meta(min_length=1, max_length=4096, description="the block package on this node")
]
BlockDigest = (
    Annotated[str, Meta(pattern=r"^sha256:[0-9a-f]{64}$", description="its content hash")] | None
)
Settings = Annotated[dict[str, Any], Meta(description="given to the block's constructor")] | None


MAX_CACHED_PLANS = 256
# replica -> (its change count, {(name, version): (spec, plan)}): a request resolves and
# compiles its plan again only after the registry changed (parsing every stored vDAG each
# time cost ~0.9 ms with six 1..8-node vDAGs stored)
_plans: weakref.WeakKeyDictionary[Replica, tuple[Any, dict[Any, Any]]] = weakref.WeakKeyDictionary()


def resolve_plan(replica: Replica, name: str, version: str | None) -> tuple[VdagSpec, VdagPlan]:
    """The stored vDAG `name` (latest, or `version`) and its plan now; NotFound or
    FailedPrecondition naming what is missing."""
    # the replica's count of changes to its entries (no public name for it yet)
    stamp = (replica.changes, len(replica.entries))
    held = _plans.get(replica)
    if held is None or held[0] != stamp or stamp[0] is None:
        held = (stamp, {})
        _plans[replica] = held
    found = held[1].get((name, version))
    if found is None:
        found = _resolve_plan(replica, name, version)
        if len(held[1]) >= MAX_CACHED_PLANS:
            held[1].clear()
        held[1][(name, version)] = found
    return found


def _resolve_plan(replica: Replica, name: str, version: str | None) -> tuple[VdagSpec, VdagPlan]:
    catalog = stored_specs(replica)
    spec = catalog.resolve(name, version)
    if spec is None:
        have = sorted(v for (n, v) in catalog.specs if n == name.partition(":")[0])
        known = f"; versions stored: {', '.join(have)}" if have else ""
        shown = name if version is None else f"{name} version {version}"
        raise NotFound(f"no vDAG {shown}{known}")
    blocks = Blocks(replica.entries.of_kind("blocks"))
    try:
        plan = compile_plan(spec, catalog.versions, blocks.known)
    except VdagError as exc:  # stored, but what it names has gone since
        raise FailedPrecondition(
            f"vDAG {spec.uri} cannot run now: {exc}", {"reason": "vdag", "path": exc.path}
        ) from None
    return spec, plan


def register_vdag_infer(dispatcher: Dispatcher, replicator: Replicator, service: Any) -> None:
    """`vdag_infer` and the Python-block methods, run by the daemon's VdagService."""
    replica = replicator.replica

    async def vdag_infer(
        name: Name,
        input: Input,  # noqa: A002 - the AIOS name
        version: Version = None,
        deadline_s: Deadline = DEFAULT_DEADLINE_S,
        session: Session = None,
        api_key: ApiKey = None,
    ) -> dict[str, Any]:
        """Run a stored vDAG on `input` across the daemons serving its blocks: {vdag,
        output, steps (each node's instance, attempts and times)}. A failure names the
        node (data.node); over quota is busy (data.reason "quota")."""
        spec, plan = resolve_plan(replica, name, version)
        return await service.infer(
            plan,
            spec.controller,
            input,
            deadline_s=deadline_s,
            session=session,
            api_key=api_key,
        )

    async def vdag_block_serve(
        block: BlockId,
        path: BlockPath,
        digest: BlockDigest = None,
        settings: Settings = None,
        parameters: Settings = None,
    ) -> dict[str, Any]:
        """Serve a Python block (AIOS block SDK: on_preprocess, on_data, on_update, health)
        from the package at `path` on this node, in its sandbox, and announce it."""
        return await service.serve_block(
            block, path, digest=digest, settings=settings, parameters=parameters
        )

    async def vdag_block_unserve(block: BlockId) -> dict[str, Any]:
        """Stop serving a Python block here, and withdraw its announcement."""
        return {"unserved": await service.unserve_block(block)}

    async def vdag_block_update(block: BlockId, parameters: Settings = None) -> dict[str, Any]:
        """Call a served Python block's on_update(parameters) (AIOS's block contract)."""
        return {"result": await service.update_block(block, parameters or {})}

    async def vdag_block_list() -> list[dict[str, Any]]:
        """The Python blocks this node serves: digest, source, calls, running, health."""
        return await service.list_blocks()

    for handler in (
        vdag_infer,
        vdag_block_serve,
        vdag_block_unserve,
        vdag_block_update,
        vdag_block_list,
    ):
        dispatcher.register(handler.__name__, handler)


def grpc_infer(replicator: Replicator, service: Any) -> Any:
    """vdag_infer for the gRPC vDAGInferenceService (daemon.api.grpc_vdag): (name, input,
    deadline_s, session) -> {vdag, output, steps}."""
    replica = replicator.replica

    async def infer(name: str, value: Any, deadline_s: float, session: str | None) -> Any:
        spec, plan = resolve_plan(replica, name, None)
        return await service.infer(
            plan, spec.controller, value, deadline_s=deadline_s, session=session
        )

    return infer
