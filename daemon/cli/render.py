"""Human-readable tables for the CLI (rich); `--json` bypasses all of this."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

console = Console()


def gib(value: Any) -> str:
    return f"{value / 1024**3:.1f} GiB" if isinstance(value, int | float) else "-"


def version(value: Any) -> str:
    """A registry version (hybrid logical clock "MS.COUNTER") as MS, or MS+COUNTER."""
    wall, _, counter = str(value).partition(".")
    return wall if counter in ("", "0") else f"{wall}+{counter}"


def short_id(peer_id: str) -> str:
    return f"{peer_id[:10]}…{peer_id[-6:]}" if len(peer_id) > 20 else peer_id


def price(value: Any) -> str:
    """A price per layer-token in the stablecoin's smallest unit; "-": none declared."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else "-"


def gpu_summary(resources: dict[str, Any]) -> str:
    gpus = resources.get("gpus") or []
    if not gpus:
        return "none"
    names: dict[str, int] = {}
    for gpu in gpus:
        names[gpu.get("name", "?")] = names.get(gpu.get("name", "?"), 0) + 1
    return ", ".join(f"{count}x {name}" for name, count in names.items())


def node_info(info: dict[str, Any]) -> None:
    res = info.get("resources") or {}
    cpu, mem, disk = res.get("cpu") or {}, res.get("memory") or {}, res.get("disk") or {}
    table = Table(show_header=False, box=None)
    table.add_row("peer id", info.get("peer_id", ""))
    table.add_row("version", str(info.get("version", "")))
    table.add_row("network", str(info.get("network_id", "")))
    table.add_row("payout address", info.get("payout_address", ""))
    table.add_row("rpc", info.get("rpc_url", ""))
    if info.get("grpc_addr"):
        table.add_row("grpc", info["grpc_addr"])
    for addr in info.get("listen_addrs") or []:
        table.add_row("listen", addr)
    table.add_row("reachability", str(info.get("reachability", "unknown")))
    for addr in info.get("observed_addrs") or []:
        table.add_row("observed", addr)
    for peer, kind in (info.get("connections") or {}).items():
        table.add_row(f"  peer {short_id(peer)}", str(kind or "-"))
    table.add_row("cpu", f"{cpu.get('model', '?')} ({cpu.get('cores', '?')} cores)")
    table.add_row(
        "memory", f"{gib(mem.get('available_bytes'))} free of {gib(mem.get('total_bytes'))}"
    )
    table.add_row("disk", f"{gib(disk.get('free_bytes'))} free of {gib(disk.get('total_bytes'))}")
    table.add_row("gpus", gpu_summary(res))
    for gpu in res.get("gpus") or []:
        table.add_row(
            f"  gpu {gpu.get('index')}",
            f"{gpu.get('name')} {gib(gpu.get('memory_free_bytes'))} free of "
            f"{gib(gpu.get('memory_total_bytes'))}, util {gpu.get('utilization_pct')}%",
        )
    if res.get("gpu_driver"):
        table.add_row("driver", str(res["gpu_driver"]))
    console.print(table)


def peers(rows: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(rows)} peers")
    for column in ("peer id", "connected", "rtt ms", "address"):
        table.add_column(column)
    for row in rows:
        rtt = row.get("rtt_ms")
        refused = row.get("refused")
        table.add_row(
            short_id(row["peer_id"]),
            f"refused: {refused}"
            if refused
            else f"yes ({row.get('connection') or '?'})"
            if row.get("connected")
            else "no",
            f"{rtt:.1f}" if isinstance(rtt, int | float) else "-",
            (row.get("addrs") or ["-"])[0],
        )
    console.print(table)


def nodes(records: list[dict[str, Any]]) -> None:
    table = Table(title=f"{len(records)} nodes")
    for column in ("peer id", "cpu cores", "memory", "gpus", "price/unit", "address"):
        table.add_column(column)
    for record in records:
        res = record.get("resources") or {}
        table.add_row(
            short_id(record["peer_id"]),
            str((res.get("cpu") or {}).get("cores", "-")),
            gib((res.get("memory") or {}).get("total_bytes")),
            gpu_summary(res),
            price(record.get("price_per_unit")),
            (record.get("addrs") or ["-"])[0],
        )
    console.print(table)


def entries(rows: list[dict[str, Any]]) -> None:
    import json

    table = Table(title=f"{len(rows)} entries")
    for column in ("kind", "key", "owner", "version", "value"):
        table.add_column(column, overflow="fold")
    for row in rows:
        value = json.dumps(row.get("value"), sort_keys=True)
        table.add_row(
            row["kind"],
            row["key"],
            short_id(row.get("owner", "")),
            version(row.get("version", "")),
            value if len(value) <= 80 else value[:77] + "...",
        )
    console.print(table)


def blocks(result: dict[str, Any]) -> None:
    table = Table(title="served here")
    for column in ("model", "layers", "dtype", "params", "ms/layer", "steps", "free cache"):
        table.add_column(column)
    for block in result.get("local", []):
        table.add_row(
            block["model"],
            f"[{block['start']}, {block['end']})",
            block["dtype"],
            gib(block["parameters_bytes"]),
            str(block["ms_per_layer"]),
            str(block["steps"]),
            f"{block.get('cache_tokens_free', '?')} positions",
        )
    console.print(table)
    for model, servers in result.get("announced", {}).items():
        table = Table(title=f"announced servers of {model}")
        for column in ("peer id", "layers", "ms/layer", "free cache", "price/unit"):
            table.add_column(column)
        for server in sorted(servers, key=lambda s: (s["start"], s["peer_id"])):
            free = server.get("cache_tokens_free")
            table.add_row(
                short_id(server["peer_id"]),
                f"[{server['start']}, {server['end']})",
                f"{server['ms_per_layer']:.2f}",
                "?" if free is None else f"{free} positions",
                price(server.get("price_per_unit")),
            )
        console.print(table)
