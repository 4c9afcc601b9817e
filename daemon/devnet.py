"""A local network on one machine: N daemons in separate processes, chained bootstrap.

`make devnet` runs this. Each daemon gets a temporary home, free ports and only the previous
daemon as its bootstrap; we wait until every daemon finds all N through `nodes_find`, print
what they found, put them all in one cluster (node0 creates it, the others join as voters or
workers), print the coordinator they elect, deploy a tiny model through it (cluster_deploy)
and run a paid generation through the cluster from a node that serves none of it, compared
token by token with one process; then keep running until Ctrl-C (or exit with DEVNET_ONCE=1).
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
from daemon.devnet_chat import chat_demo, print_client_example, serving_toml
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
        listen: str = "/ip4/127.0.0.1/tcp/0",
        prefix: list[str] | None = None,
    ) -> None:
        """`prefix`: a command the daemon's command line is run under (e.g. `ip netns exec
        NAME`, which execs it: the child's pid stays the daemon's)."""
        self.home = home
        self.listen = listen
        self.prefix = prefix or []
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
            *self.prefix,
            sys.executable,
            "-m",
            "daemon.cli.main",
            "daemon",
            "--home",
            str(self.home),
            "--config",
            str(self.config),
            "--listen",
            self.listen,
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
        node_configs: dict[int, Path] | None = None,
    ):
        """`node_configs`: the config file of the daemon at that index, instead of `config`."""
        if size < 1:
            raise DevnetError("a devnet needs at least one daemon")
        self.size = size
        self.config = config
        self.env = env or {}
        self.node_configs = node_configs or {}
        self._own_root = root is None
        self.root = root or Path(tempfile.mkdtemp(prefix="gridmesh-devnet-"))
        self.daemons: list[DaemonProcess] = []

    def start(self) -> Devnet:
        for index in range(self.size):
            bootstrap = [self.daemons[-1].addr] if self.daemons else []
            daemon = DaemonProcess(
                self.root / f"node{index}",
                config=self.node_configs.get(index, self.config),
                bootstrap=bootstrap,
                env=self.env,
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
    is forwarded to it when node0 is not it). Returns the daemons serving it, once announced."""
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
    return [by_peer[s["peer_id"]] for s in served if s["peer_id"] in by_peer]


def _cluster_deploy(asker: DaemonProcess, params: dict[str, Any]) -> dict[str, Any] | None:
    """The deploy's answer; None (retry) while the cluster is between coordinators."""
    try:
        return asker.call("cluster_deploy", params, timeout=120)
    except RPCCallError as exc:
        if (exc.data or {}).get("reason") in ("not_coordinator", "no_coordinator"):
            return None
        raise


def generate_demo(
    client: DaemonProcess,
    daemons: list[DaemonProcess],
    model_dir: Path,
    prompt: str,
    max_tokens: int,
    job_id: str | None = None,
) -> bool:
    """Generate from `client` (as paid job `job_id` when given) through the deployed model
    and compare with a single-process run. Returns whether the token ids are equal."""
    from daemon.shards.model import greedy_generate, load_model, load_tokenizer

    tokenizer = load_tokenizer(model_dir)
    ids = tokenizer.encode(prompt)
    params: dict[str, Any] = {"model": MODEL, "token_ids": ids, "max_tokens": max_tokens}
    if job_id is not None:
        params["job_id"] = job_id
    remote = client.call("generate", params)
    local = greedy_generate([load_model(model_dir)], ids, max_tokens)
    names = {d.peer_id: f"node{i}" for i, d in enumerate(daemons)}
    me = names[client.peer_id]
    route = " -> ".join(f"{names[h['peer_id']]}[{h['start']},{h['end']})" for h in remote["route"])
    remote_text, local_text = tokenizer.decode(remote["tokens"]), tokenizer.decode(local)
    how = {"chained": "each server pushed to the next", "relayed": f"{me} relayed every hop"}
    print(f"route from {me}: {route} ({how[remote['forwarding']]})")
    print(f"generated {len(remote['tokens'])} tokens in {remote['seconds']} s")
    print(f"through the cluster: {remote_text!r}")
    print(f"single process:      {local_text!r}")
    same = remote["tokens"] == local
    print("identical to the single-process run" if same else "DIFFERENT from the single process")
    return same


def paid_demo(devnet: Devnet, chain: Any, parties: list[Any]) -> bool:
    """Fund every node, make a tiny model and deploy it through the cluster's coordinator,
    register and stake the members it placed it on, deposit a job for a node that serves
    none of it, generate as that job, let the providers settle, refund the rest after the
    deadline (the chain's clock moved on) and print each party's balance before and after.
    Returns whether the texts were identical and every balance is exactly right."""
    from rich.console import Console
    from rich.table import Table

    from daemon.payments import devnet_chain as dc
    from daemon.shards.model import make_tiny

    daemons = devnet.daemons
    fees = dc.Party("fees", chain.fee_recipient)
    chain.fund(parties, 1000 * dc.TUSD)
    print("funded every node (gas, 1000 tUSD)")
    model_dir = make_tiny(devnet.root / MODEL_DIR, layers=6, hidden=64, heads=4, kv_heads=2, seed=1)
    print(f"made a tiny 6-layer model in {model_dir}; deploying it through {CLUSTER!r}")
    servers = deploy_through_cluster(daemons, model_dir)
    client = next((d for d in daemons if d not in servers), daemons[0])
    requester = parties[daemons.index(client)]
    providers = [parties[daemons.index(d)] for d in servers]
    methods = dc.methods_of(client)
    for party, daemon in zip(providers, servers, strict=True):
        if "stake" in methods:  # as `gridmesh stake 100tUSD` on that node does
            daemon.call("stake", {"amount": dc.MIN_STAKE}, timeout=120)
        else:
            chain.stake(party, daemon.peer_id)
    names = ", ".join(p.name for p in providers)
    print(f"{names} (serving it) registered and staked 100 tUSD each")
    before = chain.balances([*parties, fees])
    paid_flow = "job_id" in methods.get("generate", [])
    job = dc.create_job(chain, client, requester, "job_create" in methods)
    print(
        f"{requester.name} deposited {dc.DEPOSIT / dc.TUSD:g} tUSD for job {job} (max price "
        f"{dc.PRICE_PER_UNIT}/unit, deadline in {dc.DEADLINE_S} s); servers charge "
        f"{dc.PRICE_PER_UNIT}/unit"
    )
    if not paid_flow:
        print("this build's generate takes no job_id: the demo runs free, the job is refunded")
    same = generate_demo(client, daemons, model_dir, "gridmesh ", 24, job if paid_flow else None)
    acked: dict[str, int] = {}
    if paid_flow:
        acked = wait_for(lambda: dc.acknowledged(client, job), 30, f"{requester.name}'s vouchers")
        wait_for(
            lambda: (
                dc.settled(chain, job, providers)
                == {p.address: acked.get(p.address, 0) for p in providers}
            ),
            60,
            f"the providers to settle what {requester.name} acknowledged",
            poll_s=0.5,
        )
    paid = dc.settled(chain, job, providers)
    chain.advance(dc.DEADLINE_S + 1)
    refunded = dc.refund(chain, client, requester, job, "job_refund" in methods)
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
    print(f"{requester.name} refunded {refunded} after the deadline")
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
