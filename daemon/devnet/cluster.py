"""`make devnet`'s cluster: its daemons join one cluster as a user would, agree on a
coordinator, and the demo model is deployed through it (`cluster_deploy`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from daemon.api.client import DaemonUnreachable, RPCCallError
from daemon.devnet import DaemonProcess, DevnetError, wait_for

CLUSTER = "devnet"
MODEL, MODEL_DIR = "tiny", "tiny-model"  # the demo model (under the devnet's root)
VOTERS = 3  # node0 (its admin, also a voter) and the next two; the others join as workers


def form_cluster(daemons: list[DaemonProcess], timeout_s: float) -> dict[str, Any]:
    """Put every daemon in one cluster as a user would (`gridmesh cluster create` on node0,
    `gridmesh cluster join --role voter|worker` on the others, through the same RPC methods)
    and wait until all of them name the same coordinator. Returns its cluster_coordinator."""
    names = {d.peer_id: f"node{i}" for i, d in enumerate(daemons)}
    daemons[0].call(
        "cluster_create",
        {"name": CLUSTER, "admission": "open", "description": "make devnet's daemons"},
    )
    print(f"node0 created cluster {CLUSTER!r} (admission open) and is its admin")
    for index, daemon in enumerate(daemons[1:], start=1):
        role = "voter" if index < VOTERS else "worker"
        wait_for(
            lambda daemon=daemon, role=role: _join(daemon, role),
            timeout_s,
            f"node{index} to join {CLUSTER!r} (the cluster entry to reach it)",
            poll_s=0.2,
        )
        print(f"node{index} joined as a {role}")
    formed = time.monotonic()
    view = wait_for(
        lambda: agreed_coordinator(daemons),
        timeout_s,
        f"one coordinator of {CLUSTER!r} known to all {len(daemons)} daemons",
        poll_s=0.1,
    )
    print(
        f"cluster {CLUSTER!r}: elected coordinator {names[view['coordinator']]} "
        f"{view['coordinator']} (term {view['term']}), known to all {len(daemons)} daemons "
        f"{time.monotonic() - formed:.1f} s after the last join"
    )
    print_members(daemons, names)
    return view


def _join(daemon: DaemonProcess, role: str) -> bool:
    try:
        answer = daemon.call("cluster_join", {"name": CLUSTER, "role": role}, timeout=10)
    except RPCCallError:  # the cluster's entry has not reached this daemon yet
        return False
    return answer["status"] == "active"


def agreed_coordinator(daemons: list[DaemonProcess]) -> dict[str, Any] | None:
    """The cluster_coordinator answer every daemon gives (the same coordinator and term, one
    of them holding the lease); None until they agree."""
    try:
        views = [d.call("cluster_coordinator", {"name": CLUSTER}, timeout=5) for d in daemons]
    except (DaemonUnreachable, RPCCallError):
        return None
    named = {(v["coordinator"], v["term"]) for v in views}
    if len(named) != 1 or views[0]["coordinator"] is None:
        return None
    if sum(bool(v["coordinating"]) for v in views) != 1:
        return None
    return views[0]


def print_members(daemons: list[DaemonProcess], names: dict[str, str]) -> None:
    from rich.console import Console
    from rich.table import Table

    info = daemons[0].call("cluster_info", {"name": CLUSTER})
    table = Table(title=f"cluster {CLUSTER!r} as node0 sees it (cluster info)")
    for column in ("member", "peer id", "roles", "state"):
        table.add_column(column)
    states = (info.get("runtime") or {}).get("members") or {}
    for row in info.get("members", []):
        peer = row["peer_id"]
        table.add_row(
            names.get(peer, "?"),
            peer,
            ",".join(row.get("roles", [])),
            str(states.get(peer, "?")),
        )
    Console(width=200).print(table)


def deploy_through_cluster(
    daemons: list[DaemonProcess], model_dir: Path, timeout_s: float = 90.0
) -> list[DaemonProcess]:
    """cluster_deploy from node0: the coordinator places the model on members (node0's call
    is forwarded to it when node0 is not it). Returns the daemons serving it, once announced
    (and any it was assigned to and then given up on)."""
    names = {d.peer_id: f"node{i}" for i, d in enumerate(daemons)}
    params = {
        "name": CLUSTER,
        "model": MODEL,
        "model_dir": str(model_dir),
        "replicas": 1,
        "wait_s": 60,
    }
    result = wait_for(
        lambda: _cluster_deploy(daemons[0], params),
        timeout_s,
        "a deploy through the coordinator",
        poll_s=0.5,
    )
    if not result["ok"]:
        raise DevnetError(f"the deploy through {CLUSTER!r} failed: {result}")
    served = sorted(result["servers"], key=lambda s: s["start"])
    where = ", ".join(f"{names.get(s['peer_id'], '?')}[{s['start']},{s['end']})" for s in served)
    leader, term = result.get("coordinator"), result.get("term")
    if leader is None:  # the answer came while its lease was being renewed (a loaded machine)
        agreed = wait_for(lambda: agreed_coordinator(daemons), 30, "one coordinator known to all")
        leader, term = agreed["coordinator"], agreed["term"]
    print(
        f"deployed through cluster {CLUSTER!r}: coordinator "
        f"{names.get(leader, '?')} (term {term}) placed {where}"
    )
    for line in result.get("events", [])[-3:]:
        print(f"  coordinator: {line.get('action')} {line.get('reason')}")
    wait_for(
        lambda: (
            len(daemons[0].call("block_list", {"model": MODEL})["announced"].get(MODEL, []))
            >= len(served)
        ),
        30,
        "the shards to be announced",
    )
    by_peer = {d.peer_id: d for d in daemons}
    placed = [by_peer[s["peer_id"]] for s in served if s["peer_id"] in by_peer]
    # a member the coordinator assigned and then gave up on (too slow to announce, as on a
    # loaded machine) may still load the model and serve it: count it as a server too, so
    # that the demo neither generates from it nor routes through it unstaked
    events = [str(e.get("reason", "")) for e in result.get("events", [])]
    late = [d for d in daemons if d not in placed and any(d.peer_id in e for e in events)]
    return placed + late


def _cluster_deploy(asker: DaemonProcess, params: dict[str, Any]) -> dict[str, Any] | None:
    """The deploy's answer; None (retry) while the cluster is between coordinators, or when
    its coordinator lost the lease while placing (asked again, the next one places only what
    is missing: daemon.cluster.coordinator_inflight)."""
    try:
        result = asker.call("cluster_deploy", params, timeout=120)
    except RPCCallError as exc:
        if (exc.data or {}).get("reason") in ("not_coordinator", "no_coordinator"):
            return None
        raise
    events = result.get("events") or [{}]
    if not result.get("ok") and events[-1].get("action") == "handover":
        print("  the coordinator lost its lease while placing: asking again")
        return None
    return result
