"""Clusters and their members as the registries hold them, and who may join them.

Two kinds hold a cluster (their shapes: `registry.specs`):
- ``clusters/<name>``: ``{name, admins, description?, tags?, settings?: {admission, require?,
  allowlist?}}``. ``admission`` is ``open``, ``approval`` (the default) or ``allowlist``;
  ``require`` is a filter (`registry.query`) over a joiner's signed resource record.
- ``members/<cluster>/<peer>``: ``{cluster_id, peer_id, roles, status?, resource_record?}``.
  Roles are ``admin`` (also a voter), ``voter`` (may vote and coordinate) and ``worker``.
  ``status: "requested"`` is a join request, which is not a member until an admin approves it
  (rewrites the entry as active). ``resource_record`` carries the joiner's signed resource
  record (`p2p.records`), so that every replica can evaluate ``require`` on it.

Older entries name the roles ``coordinator`` and ``observer``: they stay readable (an older
peer's entries keep merging), read as ``voter`` and ``worker``; a self-join may not use them.

`member_refusal` is the admission rule every replica applies (`registry.replica`) to a member
entry; `cluster_view` and `clusters_of` are how the runtime and the coordinator read clusters.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from p2p import codec, records
from registry import query
from registry.specs import RECORD_CHUNK_CHARS, RECORD_MAX_CHUNKS

if TYPE_CHECKING:
    from registry.entry import Entry, EntryId


class Replica(Protocol):
    """What the views read of a `registry.replica.Replica` (which imports this module)."""

    entries: Mapping[EntryId, Entry]

    def get(self, kind: str, key: str) -> Entry | None: ...


ROLES = ("admin", "voter", "worker")
LEGACY_ROLES = {"coordinator": "voter", "observer": "worker"}
VOTING_ROLES = frozenset({"admin", "voter"})
ADMISSIONS = ("open", "approval", "allowlist")
DEFAULT_ADMISSION = "approval"
# How far a resource record's issue time may lie after the member entry carrying it was
# written (the two come from the joiner's clocks; a replica accepts entries up to the HLC's
# 60 s drift ahead of its own clock anyway)
RECORD_SKEW_S = 60.0
GIB = 1024**3


@dataclass(frozen=True)
class Member:
    peer_id: str
    roles: frozenset[str]

    @property
    def voter(self) -> bool:
        return bool(self.roles & VOTING_ROLES)


@dataclass(frozen=True)
class ClusterView:
    """A cluster as one replica holds it. `members` are the active members only; `requests`
    the join requests waiting for an admin."""

    name: str
    admins: frozenset[str]
    admission: str
    require: str | None
    allowlist: frozenset[str]
    members: Mapping[str, Member]
    requests: Mapping[str, Member] = field(default_factory=dict)
    description: str | None = None

    @property
    def voters(self) -> frozenset[str]:
        return frozenset(p for p, m in self.members.items() if m.voter)


def normal_roles(roles: Iterable[Any]) -> frozenset[str]:
    """Roles in today's vocabulary (older names mapped, unknown ones dropped)."""
    out = {LEGACY_ROLES.get(r, r) for r in roles if isinstance(r, str)}
    return frozenset(out & set(ROLES))


def settings_of(value: Mapping[str, Any] | None) -> tuple[str, str | None, frozenset[str]]:
    """(admission, require, allowlist) of a cluster entry's value, with the defaults."""
    raw = (value or {}).get("settings")
    settings = raw if isinstance(raw, dict) else {}
    admission = settings.get("admission")
    if admission not in ADMISSIONS:
        admission = DEFAULT_ADMISSION
    require = settings.get("require")
    if not isinstance(require, str) or not require.strip():
        require = None
    allowlist = settings.get("allowlist")
    listed = (
        frozenset(p for p in allowlist if isinstance(p, str))
        if isinstance(allowlist, list)
        else frozenset()
    )
    return admission, require, listed


def is_request(value: Mapping[str, Any]) -> bool:
    return value.get("status") == "requested"


def cluster_view(replica: Replica, name: str) -> ClusterView | None:
    """The cluster `name` as `replica` holds it, or None if it holds no such cluster."""
    cluster = replica.get("clusters", name)
    if cluster is None or cluster.value is None:
        return None
    value = cluster.value
    admins = frozenset(a for a in value.get("admins") or () if isinstance(a, str))
    admission, require, allowlist = settings_of(value)
    members: dict[str, Member] = {}
    requests: dict[str, Member] = {}
    for entry in _member_entries(replica, name):
        assert entry.value is not None
        peer = entry.value.get("peer_id")
        if not isinstance(peer, str):
            continue
        roles = normal_roles(entry.value.get("roles") or ())
        if peer in admins:
            roles |= {"admin"}
        member = Member(peer, roles or frozenset({"worker"}))
        (requests if is_request(entry.value) else members)[peer] = member
    description = value.get("description")
    return ClusterView(
        name=name,
        admins=admins,
        admission=admission,
        require=require,
        allowlist=allowlist,
        members=members,
        requests=requests,
        description=description if isinstance(description, str) else None,
    )


def clusters_of(replica: Replica, peer_id: str) -> list[str]:
    """The clusters (sorted) in which `peer_id` is an active member, as `replica` holds them."""
    out = []
    for entry in replica.entries.of_kind("members"):
        if entry.value is None or is_request(entry.value):
            continue
        cluster, _, peer = entry.key.partition("/")
        held = replica.get("clusters", cluster) if peer == peer_id else None
        if held is not None and held.value is not None:
            out.append(cluster)
    return sorted(out)


def _member_entries(replica: Replica, name: str) -> list[Entry]:
    """The cluster's live member entries, by key (one pass over the `members` entries, no
    sort of the whole replica: the runtime reads views whenever the replica changes)."""
    prefix = f"{name}/"
    found = [
        entry
        for entry in replica.entries.of_kind("members")
        if entry.key.startswith(prefix) and entry.value is not None
    ]
    return sorted(found, key=lambda e: e.key)


# --------------------------------------------------------------------------- resource records


class AdmissionError(ValueError):
    """A refused join: `reason` is a short metrics label (`unauthorized` for a write only an
    admin may make), the message says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def record_chunks(wire: bytes) -> list[str]:
    """A resource record's wire bytes as a member entry carries them (base64 chunks)."""
    text = base64.b64encode(wire).decode()
    chunks = [text[i : i + RECORD_CHUNK_CHARS] for i in range(0, len(text), RECORD_CHUNK_CHARS)]
    if len(chunks) > RECORD_MAX_CHUNKS:
        raise AdmissionError(
            "bad_record", f"the resource record is too large ({len(wire)} bytes) to carry"
        )
    return chunks


def joiner_record(chunks: Any, peer_id: str, at_s: float) -> records.ResourceRecord:
    """The resource record a member entry carries, checked: signed by `peer_id` (the joiner,
    not anyone else), valid at `at_s` (when the entry was written), well-formed."""
    if not isinstance(chunks, list) or not all(isinstance(c, str) for c in chunks):
        raise AdmissionError("bad_record", "resource_record must be a list of base64 strings")
    try:
        wire = base64.b64decode("".join(chunks).encode(), validate=True)
    except (binascii.Error, ValueError):
        raise AdmissionError("bad_record", "resource_record is not valid base64") from None
    try:
        env = codec.parse_envelope(
            wire, expect_type=records.RECORD_TYPE, max_bytes=records.MAX_RECORD_BYTES
        )
        net = env.body.get("net") if isinstance(env.body, dict) else None
        if not isinstance(net, str) or len(net) > 128:
            raise AdmissionError("bad_record", "the resource record names no network")
        if env.sender != peer_id:
            raise AdmissionError(
                "forged_record",
                f"the resource record is signed by {env.sender[:64]}, not by the joining peer",
            )
        return records.validate_record(
            records.record_key(net, peer_id),
            wire,
            now=at_s,
            network_id=net,
            max_skew=RECORD_SKEW_S,
        )
    except codec.CodecError as exc:
        raise AdmissionError("bad_record", f"resource record: {exc}") from None
    except records.RecordError as exc:
        if exc.reason == "stale":
            raise AdmissionError(
                "stale_record", f"the resource record had expired when the join was written ({exc})"
            ) from None
        if exc.reason == "bad_signature":
            raise AdmissionError(
                "forged_record", "the resource record's signature is not valid"
            ) from None
        raise AdmissionError("bad_record", f"resource record: {exc}") from None


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else 0.0


def resource_fields(record: records.ResourceRecord) -> dict[str, Any]:
    """What a `require` expression sees of a node: flat fields (gpus: count; vram_gb: the
    largest GPU's memory in GiB, one decimal; vram_total_gb; gpu_name: the largest GPU's;
    cpu_cores; ram_gb; disk_free_gb; price_per_unit; accepts_deploys) and the raw
    `resources.*` of the record. A field the record does not declare fails any comparison."""
    res = record.resources if isinstance(record.resources, dict) else {}
    raw_gpus = res.get("gpus")
    gpus = [g for g in raw_gpus if isinstance(g, dict)] if isinstance(raw_gpus, list) else []
    memories = [_number(g.get("memory_total_bytes")) for g in gpus]
    out: dict[str, Any] = {
        "peer_id": record.peer_id,
        "gpus": len(gpus),
        "vram_gb": round(max(memories, default=0.0) / GIB, 1),
        "vram_total_gb": round(sum(memories) / GIB, 1),
        "resources": res,
    }
    if gpus:
        largest = gpus[memories.index(max(memories))]
        if isinstance(largest.get("name"), str):
            out["gpu_name"] = largest["name"]
    sections = {
        "cpu_cores": ("cpu", "cores", 1),
        "ram_gb": ("memory", "total_bytes", GIB),
        "disk_free_gb": ("disk", "free_bytes", GIB),
    }
    for name, (section, key, unit) in sections.items():
        part = res.get(section)
        if isinstance(part, dict) and _number(part.get(key)) > 0:
            value = _number(part.get(key)) / unit
            out[name] = int(value) if unit == 1 else round(value, 1)
    if record.price_per_unit is not None:
        out["price_per_unit"] = record.price_per_unit
    if isinstance(res.get("accepts_deploys"), bool):
        out["accepts_deploys"] = res["accepts_deploys"]
    return out


def _lookup(record: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    current: Any = record
    for seg in path:
        if isinstance(current, dict) and seg in current:
            current = current[seg]
        elif isinstance(current, list) and seg.isdigit() and int(seg) < len(current):
            current = current[int(seg)]
        else:
            return "not declared"
    return current


def unmet(expr: query.Expr, fields: dict[str, Any]) -> list[str]:
    """The conditions of `expr` that `fields` fails, each with the node's value (empty: it
    passes). The operands of an AND are reported one by one; any other failing part whole."""
    if query.evaluate(expr, fields):
        return []
    if isinstance(expr, query.And):
        return [problem for op in expr.operands for problem in unmet(op, fields)]
    if isinstance(expr, query.Compare | query.In | query.Like):
        shown = _lookup(fields, expr.path)
        return [f"{expr} (this node: {shown if isinstance(shown, str) else repr(shown)})"]
    return [str(expr)]


def requirement_problems(require: str, record: records.ResourceRecord) -> list[str]:
    return unmet(query.parse(require), resource_fields(record))


# --------------------------------------------------------------------------- admission


def member_refusal(
    cluster: Mapping[str, Any],
    key: str,
    value: Mapping[str, Any] | None,
    author: str,
    written_ms: int,
) -> AdmissionError | None:
    """Why `author` may not write `value` (None: delete) under ``members/<key>`` in the
    cluster whose entry value is `cluster`, or None if it may.

    - an admin (listed in the cluster entry) may write or delete any member entry;
    - a peer may delete its own entry (leave);
    - otherwise a peer may write only its own entry, never the admin role nor a role of the
      older vocabulary; in an ``approval`` cluster only as a request; in an ``allowlist``
      cluster only if listed; and if the cluster has a ``require``, the entry must carry the
      peer's own resource record, valid when the entry was written, that meets it.
    """
    admins = {a for a in cluster.get("admins") or () if isinstance(a, str)}
    if author in admins:
        return None
    name, _, peer = key.partition("/")
    if peer != author:
        return AdmissionError(
            "unauthorized",
            f"only an admin of cluster {name!r} may write or remove another peer's membership",
        )
    if value is None:
        return None  # leaving
    roles = [r for r in value.get("roles") or () if isinstance(r, str)]
    if "admin" in roles:
        return AdmissionError(
            "unauthorized", f"only an admin of cluster {name!r} may grant the admin role"
        )
    legacy = [r for r in roles if r in LEGACY_ROLES]
    if legacy:
        return AdmissionError(
            "bad_role",
            f"role {legacy[0]!r} is from an older version: join as voter or worker",
        )
    admission, require, allowlist = settings_of(cluster)
    if admission == "allowlist" and author not in allowlist:
        return AdmissionError(
            "not_allowlisted", f"cluster {name!r} admits only the peers on its allowlist"
        )
    if admission == "approval" and not is_request(value):
        return AdmissionError(
            "needs_approval",
            f"cluster {name!r} admits by approval: a peer may only ask to join "
            "(status requested) and an admin approves",
        )
    if require is not None:
        chunks = value.get("resource_record")
        if chunks is None:
            return AdmissionError(
                "requirement",
                f"cluster {name!r} requires {require}: the join must carry the peer's "
                "signed resource record",
            )
        try:
            record = joiner_record(chunks, author, written_ms / 1000)
            problems = requirement_problems(require, record)
        except AdmissionError as exc:
            return exc
        except query.QueryError as exc:  # a cluster entry is checked on write: not expected
            return AdmissionError("requirement", f"cluster {name!r}'s require: {exc}")
        if problems:
            return AdmissionError(
                "requirement",
                f"cluster {name!r} requires {require}; not met: {'; '.join(problems)}",
            )
    return None
