"""A local network on one machine: N daemons in separate processes, chained bootstrap.

`make devnet` runs this. Each daemon gets a temporary home, free ports and only the previous
daemon as its bootstrap; we wait until every daemon finds all N through `nodes_find`, print
what they found, and keep running until Ctrl-C (or exit at once with DEVNET_ONCE=1).
`DaemonProcess` is also the harness the multi-process tests and benchmarks use.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from contracts.chain.errors import ChainError
from daemon.api.client import DaemonUnreachable, RPCCallError, RPCClient
from daemon.api.cookie import read_cookie
from daemon.config import REPO_CONFIGS
from daemon.home import DAEMON_FILE

DEVNET_CONFIG = REPO_CONFIGS / "devnet.toml"
SAMPLES = [REPO_CONFIGS / "samples" / f"{name}.yaml" for name in ("cluster", "component", "block")]


class DevnetError(RuntimeError):
    pass


def wait_for(
    condition: Callable[[], Any], timeout_s: float, what: str, poll_s: float = 0.05
) -> Any:
    """Poll `condition` until it returns something truthy, or raise after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise DevnetError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(poll_s)


class DaemonProcess:
    """One `gridmesh daemon` child process with its own home."""

    def __init__(
        self,
        home: Path,
        *,
        config: Path = DEVNET_CONFIG,
        bootstrap: list[str] | None = None,
        extra_args: list[str] | None = None,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.home = home
        self.env = env or {}  # on top of this process's environment
        self.config = config
        self.bootstrap = bootstrap or []
        self.extra_args = extra_args or []
        self.log_path = log_path or home / "daemon.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.info: dict[str, Any] = {}

    def start(self, timeout_s: float = 20.0) -> DaemonProcess:
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / DAEMON_FILE).unlink(missing_ok=True)
        args = [
            sys.executable,
            "-m",
            "daemon.cli.main",
            "daemon",
            "--home",
            str(self.home),
            "--config",
            str(self.config),
            "--listen",
            "/ip4/127.0.0.1/tcp/0",
            "--rpc-port",
            "0",
            *[arg for addr in self.bootstrap for arg in ("--bootstrap", addr)],
            *self.extra_args,
        ]
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child keeps it open
        env = {**os.environ, **self.env, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env)
        log.close()
        try:
            self.info = wait_for(self._read_info, timeout_s, f"daemon in {self.home} to start")
        except BaseException:
            self.stop()  # one that did not come up in time must not be left running
            raise
        return self

    def _read_info(self) -> dict[str, Any] | None:
        if self.proc is not None and self.proc.poll() is not None:
            raise DevnetError(
                f"daemon in {self.home} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )
        try:
            return json.loads((self.home / DAEMON_FILE).read_text())
        except (FileNotFoundError, ValueError):
            return None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""

    @property
    def peer_id(self) -> str:
        return self.info["peer_id"]

    @property
    def addr(self) -> str:
        return self.info["listen_addrs"][0]

    def client(self, timeout: float = 30.0) -> RPCClient:
        return RPCClient(self.info["rpc_url"], read_cookie(self.home), timeout=timeout)

    def call(self, method: str, params: Any = None, timeout: float = 30.0) -> Any:
        return self.client(timeout).call(method, params)

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a Prometheus metric's samples whose labels include `labels` (0 if none)."""
        url = self.info["rpc_url"] + "metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            series, value = line.rsplit(" ", 1)
            if series.split("{")[0] == name and all(
                f'{k}="{v}"' in series for k, v in labels.items()
            ):
                total += float(value)
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or power loss would leave it."""
        if self.alive():
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()

    def stop(self, timeout_s: float = 8.0) -> int | None:
        """SIGTERM, then SIGKILL if it does not exit in time. Returns the exit code."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def found_counts(daemons: list[DaemonProcess]) -> dict[str, int]:
    """For each daemon's peer id: how many daemons (itself included) find it via nodes_find."""
    counts = {d.peer_id: 0 for d in daemons}
    for daemon in daemons:
        try:
            records = daemon.client(timeout=10).call("nodes_find", {})
        except (DaemonUnreachable, RPCCallError):
            continue
        for record in records:
            if record["peer_id"] in counts:
                counts[record["peer_id"]] += 1
    return counts


def all_found(daemons: list[DaemonProcess]) -> bool:
    return all(count == len(daemons) for count in found_counts(daemons).values())


class Devnet:
    """N chained daemons under one temporary directory; a context manager that cleans up."""

    def __init__(
        self,
        size: int = 4,
        root: Path | None = None,
        config: Path = DEVNET_CONFIG,
        env: dict[str, str] | None = None,
    ):
        if size < 1:
            raise DevnetError("a devnet needs at least one daemon")
        self.size = size
        self.config = config
        self.env = env or {}
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="gridmesh-devnet-"))
        self.daemons: list[DaemonProcess] = []

    def start(self) -> Devnet:
        for index in range(self.size):
            bootstrap = [self.daemons[-1].addr] if self.daemons else []
            daemon = DaemonProcess(
                self.root / f"node{index}", config=self.config, bootstrap=bootstrap, env=self.env
            )
            self.daemons.append(daemon)
            daemon.start()
        return self

    def wait_all_found(self, timeout_s: float = 30.0) -> None:
        wait_for(
            lambda: all_found(self.daemons),
            timeout_s,
            f"all {self.size} daemons to find each other",
            poll_s=0.2,
        )

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Devnet:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


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


def shard_demo(
    daemons: list[DaemonProcess],
    root: Path,
    prompt: str,
    max_tokens: int,
    job_id: str | None = None,
) -> bool:
    """Make a tiny model, split it over daemons 1..3, generate from daemon 0 (as paid job
    `job_id` when given), and compare with a single-process run. Returns whether the texts
    are equal."""
    from daemon.shards.model import greedy_generate, load_model, load_tokenizer, make_tiny

    servers = daemons[1:4] if len(daemons) >= 4 else daemons
    model_dir = make_tiny(root / "tiny-model", layers=6, hidden=64, heads=4, kv_heads=2, seed=1)
    ranges = [(i * 6 // len(servers), (i + 1) * 6 // len(servers)) for i in range(len(servers))]
    plan = [
        {"peer_id": d.peer_id, "start": a, "end": b}
        for d, (a, b) in zip(servers, ranges, strict=True)
    ]
    print(f"made a tiny 6-layer model in {model_dir}; deploying it over {len(servers)} daemons")
    result = daemons[0].call(
        "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
    )
    for item in result["results"]:
        if not item["ok"]:
            raise DevnetError(f"deploy on {item['peer_id']} failed: {item['error']}")
    wait_for(
        lambda: (
            len(daemons[0].call("block_list", {"model": "tiny"})["announced"].get("tiny", []))
            == len(servers)
        ),
        30,
        "the shards to be announced",
    )
    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(prompt)
    params: dict[str, Any] = {"model": "tiny", "token_ids": ids, "max_tokens": max_tokens}
    if job_id is not None:
        params["job_id"] = job_id
    remote = daemons[0].call("generate", params)
    local = greedy_generate([load_model(model_dir)], ids, max_tokens)
    names = {d.peer_id: f"node{i}" for i, d in enumerate(daemons)}
    route = " -> ".join(f"{names[h['peer_id']]}[{h['start']},{h['end']})" for h in remote["route"])
    remote_text, local_text = tokenizer.decode(remote["tokens"]), tokenizer.decode(local)
    how = {"chained": "each server pushed to the next", "relayed": "node0 relayed every hop"}
    print(f"route from node0: {route} ({how[remote['forwarding']]})")
    print(f"generated {len(remote['tokens'])} tokens in {remote['seconds']} s")
    print(f"through the shards: {remote_text!r}")
    print(f"single process:     {local_text!r}")
    same = remote["tokens"] == local
    print("identical to the single-process run" if same else "DIFFERENT from the single process")
    return same


def paid_demo(devnet: Devnet, chain: Any, parties: list[Any]) -> bool:
    """Fund every node, register and stake the shard servers, deposit a job for node0, run
    the shard demo as that job, let the providers settle, refund the rest after the deadline
    (the chain's clock moved on) and print each party's balance before and after. Returns
    whether the texts were identical and every balance is exactly right."""
    from rich.console import Console
    from rich.table import Table

    from daemon.payments import devnet_chain as dc

    daemons = devnet.daemons
    servers = daemons[1:4] if len(daemons) >= 4 else daemons
    requester = parties[0]
    providers = [parties[daemons.index(d)] for d in servers]
    fees = dc.Party("fees", chain.fee_recipient)
    chain.fund(parties, 1000 * dc.TUSD)
    methods = dc.methods_of(daemons[0])
    for party, daemon in zip(providers, servers, strict=True):
        if "stake" in methods:  # as `gridmesh stake 100tUSD` on that node does
            daemon.call("stake", {"amount": dc.MIN_STAKE}, timeout=120)
        else:
            chain.stake(party, daemon.peer_id)
    names = ", ".join(p.name for p in providers)
    print(f"funded every node (gas, 1000 tUSD); {names} registered and staked 100 tUSD each")
    before = chain.balances([*parties, fees])
    paid_flow = "job_id" in methods.get("generate", [])
    job = dc.create_job(chain, daemons[0], requester, "job_create" in methods)
    print(
        f"node0 deposited {dc.DEPOSIT / dc.TUSD:g} tUSD for job {job} (max price "
        f"{dc.PRICE_PER_UNIT}/unit, deadline in {dc.DEADLINE_S} s); servers charge "
        f"{dc.PRICE_PER_UNIT}/unit"
    )
    if not paid_flow:
        print("this build's generate takes no job_id: the demo runs free, the job is refunded")
    same = shard_demo(daemons, devnet.root, "gridmesh ", 24, job if paid_flow else None)
    acked: dict[str, int] = {}
    if paid_flow:
        acked = wait_for(lambda: dc.acknowledged(daemons[0], job), 30, "node0's vouchers")
        wait_for(
            lambda: (
                dc.settled(chain, job, providers)
                == {p.address: acked.get(p.address, 0) for p in providers}
            ),
            60,
            "the providers to settle what node0 acknowledged",
            poll_s=0.5,
        )
    paid = dc.settled(chain, job, providers)
    chain.advance(dc.DEADLINE_S + 1)
    refunded = dc.refund(chain, daemons[0], requester, job, "job_refund" in methods)
    after = chain.balances([*parties, fees])
    table = Table(title=f"tUSD balances before and after job {job[:18]}...")
    for column in ("party", "before", "after", "change"):
        table.add_column(column)
    for row in dc.balance_rows(before, after):
        table.add_row(*row)
    Console(width=200).print(table)
    for party in providers:
        print(
            f"{party.name}: acknowledged {acked.get(party.address, 0)}, settled "
            f"{paid[party.address]} (smallest units; fee {dc.FEE_BPS / 100:g} %)"
        )
    print(f"node0 refunded {refunded} after the deadline")
    wrong = dc.check_balances(before, after, requester, providers, paid)
    if paid_flow and not any(paid.values()):
        wrong.append("nothing was settled for the paid generation")
    for line in wrong:
        print(f"WRONG: {line}")
    if not wrong:
        print("every balance is exactly right")
    return same and not wrong


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
        print(f"starting {args.nodes} daemons under {devnet.root} ...", flush=True)
        devnet.start()
        for index, daemon in enumerate(devnet.daemons):
            print(f"  node{index} {daemon.peer_id} rpc {daemon.info['rpc_url']}", flush=True)
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
        if not paid_demo(devnet, chain, parties):
            return 1
        if once:
            return 0
        print("devnet running; Ctrl-C stops every daemon.", flush=True)
        signal.sigwait({signal.SIGINT, signal.SIGTERM})
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
