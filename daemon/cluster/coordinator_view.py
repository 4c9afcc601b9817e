"""What `cluster_info` and `cluster_deploy` show of a cluster's deployments, as one
coordinator (daemon.cluster.coordinator) knows them: each deployment's spec and target, the
live members serving it or assigned it, the last placement and the coordinator's events."""

from __future__ import annotations

from typing import Any

from daemon.cluster import coordinator_wire as wire

ClusterCoordinator = Any  # daemon.cluster.coordinator's (which imports this module)

MAX_SCORES_SHOWN = 64


def status(c: ClusterCoordinator, cluster: str, model: str) -> dict[str, Any]:
    table = c.tables.get(cluster)
    deployment = table.deployments.get(model) if table else None
    states = c.runtime.member_states(cluster)
    served = c._served(cluster, model, {p for p, s in states.items() if s != "dead"})
    placed = dict(c._placed.get((cluster, model)) or {})
    if placed:
        placed["scores"] = placed.get("scores", [])[:MAX_SCORES_SHOWN]
    return {
        "cluster": cluster,
        "model": model,
        "coordinator": c.runtime.coordinator(cluster)[0],
        "term": c.runtime.coordinator(cluster)[1],
        "spec": None if deployment is None else wire.to_body(deployment.spec),
        "target": None if deployment is None else deployment.target,
        "servers": [
            {
                "peer_id": s.peer_id,
                "start": s.start,
                "end": s.end,
                "state": "assigned" if s.pending else states.get(s.peer_id, "unknown"),
                "utilisation": s.utilisation,
                "queue_length": s.queue_length,
            }
            for s in sorted(served, key=lambda s: (s.start, s.end, s.peer_id))
        ],
        "last_placement": placed or None,
        "events": [e for e in c._events.get(cluster, ()) if e["model"] in (model, "*")],
    }


def placements(c: ClusterCoordinator, cluster: str) -> list[dict[str, Any]]:
    """One row per deployment of `cluster` this node knows of (its table: its own as the
    coordinator, else the last one the coordinator sent here): target and bounds, the
    live members serving it (peer start..end state) and the coordinator's last word."""
    rows = []
    for model in sorted(c.tables[cluster].deployments if cluster in c.tables else {}):
        status = c.status(cluster, model)
        spec, events = status["spec"], status["events"]
        rows.append(
            {
                "model": model,
                "target": status["target"],
                "instances": f"{spec['min_instances']}..{spec['max_instances']}",
                "servers": [
                    f"{s['peer_id']} {s['start']}..{s['end']} {s['state']}"
                    for s in status["servers"]
                ],
                "last": f"{events[-1]['action']}: {events[-1]['reason']}" if events else "",
            }
        )
    return rows
