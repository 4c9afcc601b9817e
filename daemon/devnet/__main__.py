"""`make devnet` (`python -m daemon.devnet`): N daemons on this machine, each with a temporary
home, free ports and only the previous daemon as its bootstrap. We wait until every daemon
finds all N through `nodes_find`, print what they found, replicate the sample specs, put them
all in one cluster (node0 creates it, the others join as voters or workers), print the
coordinator they elect, deploy a tiny model through it (cluster_deploy), run a paid generation
through the cluster from a node that serves none of it, compared token by token with one
process, and stream a chat through node0's OpenAI-compatible endpoint; then keep running until
Ctrl-C (or exit with DEVNET_ONCE=1; non-zero if a demo failed).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from contracts.chain.errors import ChainError
from daemon.api.client import RPCCallError
from daemon.config import REPO_CONFIGS
from daemon.devnet import DEVNET_CONFIG, DaemonProcess, Devnet, DevnetError, found_counts, wait_for
from daemon.devnet.chat import chat_demo, print_client_example, serving_toml
from daemon.devnet.cluster import CLUSTER, MODEL, MODEL_DIR, form_cluster
from daemon.devnet.paid import paid_demo

SAMPLES = [REPO_CONFIGS / "samples" / f"{name}.yaml" for name in ("cluster", "component", "block")]


def print_table(daemons: list[DaemonProcess]) -> None:
    from rich.console import Console
    from rich.table import Table

    from daemon.cli.render import gib, gpu_summary

    counts = found_counts(daemons)
    table = Table(title=f"gridmesh devnet: {len(daemons)} daemons")
    for column in ("#", "peer id", "found by", "cpu", "memory", "gpus", "rpc"):
        table.add_column(column)
    for index, daemon in enumerate(daemons):
        res = daemon.call("node_info")["resources"]
        cpu = res.get("cpu") or {}
        table.add_row(
            str(index),
            daemon.peer_id,
            f"{counts[daemon.peer_id]}/{len(daemons)}",
            f"{cpu.get('cores', '?')} cores",
            gib((res.get("memory") or {}).get("total_bytes")),
            gpu_summary(res),
            daemon.info["rpc_url"],
        )
    Console(width=200).print(table)


def apply_samples(daemon: DaemonProcess) -> list[tuple[str, str]]:
    """Write the sample cluster, component and block specs through one daemon."""
    from daemon.specs import load_documents, substitute_self

    written = []
    for path in SAMPLES:
        for doc in load_documents(str(path)):
            entry = daemon.call("registry_put", substitute_self(doc, daemon.peer_id))
            written.append((entry["kind"], entry["key"]))
    return written


def holders(daemons: list[DaemonProcess], entry_id: tuple[str, str]) -> list[bool]:
    kind, key = entry_id
    out = []
    for daemon in daemons:
        try:
            daemon.call("registry_get", {"kind": kind, "key": key})
            out.append(True)
        except RPCCallError:
            out.append(False)
    return out


def print_registry_table(daemons: list[DaemonProcess], written: list[tuple[str, str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="registry entries written on node0, as each daemon holds them")
    table.add_column("entry")
    for index in range(len(daemons)):
        table.add_column(f"node{index}")
    for entry_id in written:
        table.add_row(
            "/".join(entry_id), *("yes" if h else "NO" for h in holders(daemons, entry_id))
        )
    Console(width=200).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m daemon.devnet",
        description="Run a local gridmesh network of N daemons until Ctrl-C "
        "(DEVNET_ONCE=1: exit after the table).",
    )
    parser.add_argument("--nodes", type=int, default=4, help="number of daemons (default 4)")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for discovery")
    args = parser.parse_args(argv)
    once = os.environ.get("DEVNET_ONCE", "") not in ("", "0")
    started = time.monotonic()
    from daemon.payments.devnet_chain import PRICE_PER_UNIT, DevnetChain

    devnet = Devnet(args.nodes)
    chain = DevnetChain()
    try:
        print("serving a dev chain and deploying the contracts ...", flush=True)
        chain.start()
        escrow = chain.record.addresses["JobEscrow"]
        print(f"dev chain at {chain.url} (chain id {chain.record.chain_id}); JobEscrow {escrow}")
        parties = [
            chain.prepare_home(devnet.root / f"node{i}", f"node{i}") for i in range(args.nodes)
        ]
        devnet.env = {
            "GRIDMESH_CHAIN__RPC_URL": chain.url,
            "GRIDMESH_MARKET__PRICE_PER_UNIT": str(PRICE_PER_UNIT),
        }
        node0_config = devnet.root / "node0.toml"  # devnet.toml and node0's OpenAI endpoint
        node0_config.write_text(
            DEVNET_CONFIG.read_text() + serving_toml(MODEL, devnet.root / MODEL_DIR)
        )
        devnet.node_configs = {0: node0_config}
        print(f"starting {args.nodes} daemons under {devnet.root} ...", flush=True)
        devnet.start()
        for index, daemon in enumerate(devnet.daemons):
            openai = daemon.info.get("openai_url")
            serves = f" openai {openai}" if openai else ""
            print(
                f"  node{index} {daemon.peer_id} rpc {daemon.info['rpc_url']}{serves}", flush=True
            )
        print("waiting until every daemon finds all of them through nodes_find ...", flush=True)
        devnet.wait_all_found(args.timeout)
        print(f"all {args.nodes} daemons found by all in {time.monotonic() - started:.1f} s")
        print_table(devnet.daemons)
        print("applying configs/samples (cluster, component, block) through node0 ...")
        written = apply_samples(devnet.daemons[0])
        replicated_at = time.monotonic()
        wait_for(
            lambda: all(all(holders(devnet.daemons, e)) for e in written),
            args.timeout,
            "the sample entries to reach every daemon",
            poll_s=0.02,
        )
        print(f"replicated to all {args.nodes} in {time.monotonic() - replicated_at:.2f} s")
        print_registry_table(devnet.daemons, written)
        print(f"forming cluster {CLUSTER!r} of all {args.nodes} daemons ...", flush=True)
        form_cluster(devnet.daemons, args.timeout)
        if not paid_demo(devnet, chain, parties):
            return 1
        openai_url = devnet.daemons[0].info.get("openai_url") or ""
        if not chat_demo(openai_url, MODEL):
            return 1
        print_client_example(openai_url, MODEL)
        if once:
            return 0
        # handled (before saying so): SIGTERM's default action ended this process at once and
        # left its daemons running. Not sigwait with the signals blocked: a mask is per thread,
        # and the dev chain's threads, started earlier, could still take SIGTERM and die of it.
        # A Python handler runs in this thread whichever thread the signal reached.
        stop = threading.Event()
        for stopping in (signal.SIGINT, signal.SIGTERM):
            signal.signal(stopping, lambda signum, frame: stop.set())
        print("devnet running; Ctrl-C (or SIGTERM) stops every daemon.", flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    except (DevnetError, ChainError, RPCCallError) as exc:
        print(f"devnet: {exc}", file=sys.stderr)
        for daemon in devnet.daemons:
            print(f"--- {daemon.home} log tail ---\n{daemon.log_tail()}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        print("stopping daemons ...", flush=True)
        devnet.stop()
        chain.close()


if __name__ == "__main__":
    sys.exit(main())
