"""The cluster membership JSON-RPC methods: create, join, approve, remove, leave, members, info.

They write the `clusters` and `members` registries (formats and admission rules:
`registry.clusters`); every replica enforces the rules, so these methods only shape the
writes and turn refusals into errors that say why. `cluster_join` carries this node's signed
resource record when the cluster has a `require` expression, so that every replica can check
it. `cluster_info` adds, when given, the runtime's view (`describe`: coordinator, term,
member states) and the coordinator's placements (`placements`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Annotated, Any, Literal

from msgspec import Meta

from daemon import errors
from daemon.api.jsonrpc import Dispatcher
from daemon.errors import FailedPrecondition, InvalidParams, NotFound
from p2p.discovery import ResourceDirectory
from registry import clusters, query
from registry.clusters import ClusterView, cluster_view
from registry.replica import Rejected
from registry.replication import Replicator
from registry.specs import MAX_REQUIRE_CHARS

# (cluster) -> dict, or an awaitable of one: the runtime's coordinator, term, member states
Describe = Callable[[str], Any]
# (cluster) -> list, or an awaitable of one: where the coordinator placed the cluster's blocks
Placements = Callable[[str], Any]

NAME_PATTERN = r"^[A-Za-z0-9._:@-]{1,64}$"
PEER_PATTERN = r"^[A-Za-z0-9._:@-]{1,128}$"
ClusterName = Annotated[
    str,
    Meta(
        min_length=1,
        max_length=64,
        pattern=NAME_PATTERN,
        description="the cluster's name (1..64 of A-Z a-z 0-9 . _ : @ -)",
    ),
]
PeerId = Annotated[
    str, Meta(min_length=1, max_length=128, pattern=PEER_PATTERN, description="a peer id")
]
Admission = Annotated[
    Literal["open", "approval", "allowlist"],
    Meta(description="who may join by themselves: open, approval (default) or allowlist"),
]
Require = Annotated[
    Annotated[str, Meta(max_length=MAX_REQUIRE_CHARS)] | None,
    Meta(
        description="a filter a joiner's signed resource record must meet, "
        "e.g. 'gpus >= 1 AND vram_gb >= 24'"
    ),
]
Allowlist = Annotated[
    Annotated[list[PeerId], Meta(max_length=1024)] | None,
    Meta(description="the peers an allowlist cluster admits (at most 1024)"),
]
Description = Annotated[
    Annotated[str, Meta(max_length=1024)] | None, Meta(description="what the cluster is for")
]
JoinRole = Annotated[
    Literal["voter", "worker"],
    Meta(description="voter (may vote and coordinate) or worker (default)"),
]
ApproveRole = Annotated[
    Literal["voter", "worker"] | None,
    Meta(description="the role to grant (default: the one the peer asked for, else worker)"),
]


def _refused(exc: Rejected) -> errors.GridmeshError:
    return errors.from_rejected(exc)


def member_rows(view: ClusterView, replica: Any) -> list[dict[str, Any]]:
    """Members then join requests, each sorted by peer id."""
    rows = []
    for status, group in (("active", view.members), ("requested", view.requests)):
        for peer in sorted(group):
            member = group[peer]
            entry = replica.get("members", f"{view.name}/{peer}")
            rows.append(
                {
                    "peer_id": peer,
                    "roles": sorted(member.roles),
                    "voter": member.voter,
                    "admin": peer in view.admins,
                    "status": status,
                    "since": entry.ts.wall_ms / 1000 if entry is not None else None,
                }
            )
    return rows


async def _call(hook: Callable[[str], Any], name: str) -> Any:
    result = hook(name)
    if inspect.isawaitable(result):
        result = await result
    return result


def register_cluster_methods(
    dispatcher: Dispatcher,
    replicator: Replicator,
    directory: ResourceDirectory,
    *,
    describe: Describe | None = None,
    placements: Placements | None = None,
) -> None:
    """Register the cluster_* membership methods. `describe` (the runtime) and `placements`
    (the coordinator) are optional: `cluster_info` shows what they return when given."""
    replica = replicator.replica
    me = replica.ident.peer_id

    def view_of(name: str) -> ClusterView:
        view = cluster_view(replica, name)
        if view is None:
            raise NotFound(
                f"cluster {name!r} is not known to this node (none was created, or it has not "
                "reached this node yet)"
            )
        return view

    def member_key(name: str, peer: str) -> str:
        return f"{name}/{peer}"

    async def write(key: str, value: dict[str, Any] | None) -> Any:
        try:
            return await replicator.write("members", key, value)
        except Rejected as exc:
            raise _refused(exc) from None

    async def cluster_create(
        name: ClusterName,
        admission: Admission = "approval",
        require: Require = None,
        allowlist: Allowlist = None,
        description: Description = None,
    ) -> dict[str, Any]:
        """Create a cluster with this node as its admin and first member (a voter)."""
        held = replica.get("clusters", name)
        if held is not None and not held.deleted:
            raise FailedPrecondition(f"cluster {name!r} already exists")
        settings: dict[str, Any] = {"admission": admission}
        if require is not None and require.strip():
            try:
                query.parse(require)
            except query.QueryError as exc:
                raise InvalidParams(f"require is not a valid filter: {exc}") from None
            settings["require"] = require
        if allowlist:
            if len(set(allowlist)) != len(allowlist):
                raise InvalidParams("allowlist names a peer more than once")
            settings["allowlist"] = list(allowlist)
        elif admission == "allowlist":
            settings["allowlist"] = []
        value: dict[str, Any] = {"name": name, "admins": [me], "settings": settings}
        if description:
            value["description"] = description
        try:
            await replicator.write("clusters", name, value)
        except Rejected as exc:
            raise _refused(exc) from None
        await write(member_key(name, me), {"cluster_id": name, "peer_id": me, "roles": ["admin"]})
        return await cluster_info(name)

    async def cluster_join(name: ClusterName, role: JoinRole = "worker") -> dict[str, Any]:
        """Join a cluster, or ask to (an approval cluster); refused with the reason when the
        cluster's admission rule or its `require` refuses this node."""
        view = view_of(name)
        admin = me in view.admins
        current = view.members.get(me)
        if current is not None and (admin or view.admission == "approval" or role in current.roles):
            # already in: a non-admin's rewrite in an approval cluster would be a new request
            return {
                "cluster": name,
                "peer_id": me,
                "roles": sorted(current.roles),
                "status": "active",
                "note": "already a member",
            }
        value: dict[str, Any] = {
            "cluster_id": name,
            "peer_id": me,
            "roles": ["admin"] if admin else [role],
        }
        if not admin:
            if view.admission == "approval":
                value["status"] = "requested"
            if view.require is not None:
                try:
                    value["resource_record"] = clusters.record_chunks(directory.make_own_record())
                except clusters.AdmissionError as exc:
                    raise FailedPrecondition(str(exc)) from None
        await write(member_key(name, me), value)
        status = value.get("status", "active")
        return {
            "cluster": name,
            "peer_id": me,
            "roles": value["roles"],
            "status": status,
            "note": "an admin must approve the request (cluster approve)"
            if status == "requested"
            else "member",
        }

    async def cluster_approve(
        name: ClusterName, peer: PeerId, role: ApproveRole = None
    ) -> dict[str, Any]:
        """Make `peer` an active member (an admin only): its join request approved, or the
        peer added directly."""
        view = view_of(name)
        if me not in view.admins:
            raise FailedPrecondition(f"only an admin of cluster {name!r} may approve members")
        held = replica.get("members", member_key(name, peer))
        old = held.value if held is not None and held.value is not None else {}
        roles = [role] if role else [r for r in old.get("roles") or ["worker"] if r != "admin"]
        if peer in view.admins:
            roles = ["admin"]
        value: dict[str, Any] = {"cluster_id": name, "peer_id": peer, "roles": roles or ["worker"]}
        if "resource_record" in old:
            value["resource_record"] = old["resource_record"]
        await write(member_key(name, peer), value)
        return {"cluster": name, "peer_id": peer, "roles": value["roles"], "status": "active"}

    async def cluster_remove(name: ClusterName, peer: PeerId) -> dict[str, Any]:
        """Remove a member or refuse a join request (an admin only)."""
        view = view_of(name)
        if me not in view.admins:
            raise FailedPrecondition(f"only an admin of cluster {name!r} may remove members")
        if peer not in view.members and peer not in view.requests:
            raise NotFound(f"{peer} is not a member of cluster {name!r} and has not asked to join")
        await write(member_key(name, peer), None)
        return {"cluster": name, "peer_id": peer, "status": "removed"}

    async def cluster_leave(name: ClusterName) -> dict[str, Any]:
        """Leave a cluster (or withdraw this node's join request)."""
        view = view_of(name)
        if me not in view.members and me not in view.requests:
            raise NotFound(f"this node is not a member of cluster {name!r}")
        await write(member_key(name, me), None)
        return {"cluster": name, "peer_id": me, "status": "left"}

    async def cluster_members(name: ClusterName) -> list[dict[str, Any]]:
        """The cluster's members (roles, voter, admin) and its pending join requests."""
        return member_rows(view_of(name), replica)

    async def cluster_info(name: ClusterName) -> dict[str, Any]:
        """A cluster as this node knows it: admins, admission, members and requests; plus the
        coordinator, term and member states, and the placements, where this node runs them."""
        view = view_of(name)
        info: dict[str, Any] = {
            "name": view.name,
            "description": view.description,
            "admins": sorted(view.admins),
            "admission": view.admission,
            "require": view.require,
            "allowlist": sorted(view.allowlist),
            "voters": sorted(view.voters),
            "members": member_rows(view, replica),
            "this_node": {
                "peer_id": me,
                "status": "active"
                if me in view.members
                else "requested"
                if me in view.requests
                else "none",
                "admin": me in view.admins,
            },
        }
        for key, hook in (("runtime", describe), ("placements", placements)):
            if hook is None:
                continue
            try:
                info[key] = await _call(hook, name)
            except Exception as exc:  # a view's failure must not hide the registry's
                info[key] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
        return info

    for handler in (
        cluster_create,
        cluster_join,
        cluster_approve,
        cluster_remove,
        cluster_leave,
        cluster_members,
        cluster_info,
    ):
        dispatcher.register(handler.__name__, handler)
