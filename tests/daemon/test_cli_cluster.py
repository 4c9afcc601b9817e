"""`gridmesh cluster ...`: what each command sends, how it shows the answer, its errors, its
help, and (with real daemon processes) the whole create / join / approve / leave round."""

from __future__ import annotations

import fcntl
import http.server
import json
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
from typer.testing import CliRunner

from daemon.cli.main import app

runner = CliRunner()
GM = [sys.executable, "-m", "daemon.cli.main"]
HEAVY = ("libp2p", "torch", "web3", "eth_account", "grpc", "trio", "transformers")
ADMIN = "12D3KooWAdminAdminAdminAdminAdminAdminAdmin0001"
BOB = "12D3KooWBobBobBobBobBobBobBobBobBobBobBobBob0002"
INFO = {
    "name": "lab",
    "description": "the lab",
    "admins": [ADMIN],
    "admission": "approval",
    "require": "gpus >= 1",
    "allowlist": [],
    "voters": [ADMIN, BOB],
    "members": [
        {
            "peer_id": ADMIN,
            "roles": ["admin"],
            "voter": True,
            "admin": True,
            "status": "active",
            "since": 1_800_000_000.0,
        },
        {
            "peer_id": BOB,
            "roles": ["voter"],
            "voter": True,
            "admin": False,
            "status": "requested",
            "since": 1_800_000_100.0,
        },
    ],
    "this_node": {"peer_id": ADMIN, "status": "active", "admin": True},
    "runtime": {"coordinator": ADMIN, "term": 7, "members": {ADMIN: "alive", BOB: "suspect"}},
    "placements": [{"block": "llama.0-4", "peer_id": BOB, "layers": [0, 4]}],
}


class FakeDaemon:
    """A home whose daemon.json names a JSON-RPC endpoint answering from `results` (a value,
    or an exception's {"code", "message", "data"} under "error"), recording each call."""

    def __init__(self, home: Any) -> None:
        self.home = home
        self.results: dict[str, Any] = {}
        self.calls: list[tuple[str, Any]] = []
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.calls.append((request["method"], request.get("params")))
                answer = fake.results[request["method"]]
                reply: dict[str, Any] = {"jsonrpc": "2.0", "id": request["id"]}
                if isinstance(answer, dict) and set(answer) == {"error"}:
                    reply["error"] = answer["error"]
                else:
                    reply["result"] = answer
                body = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.lock = os.open(home / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.lock, fcntl.LOCK_EX)
        url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        (home / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "rpc_url": url}))
        (home / "rpc.cookie").write_text("token")
        (home / "rpc.cookie").chmod(0o600)

    def close(self) -> None:
        self.server.shutdown()
        os.close(self.lock)


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    """The CLI's rich console is made once per process, its width fixed then (COLUMNS or 80):
    another test file may have made it before this one's `env={"COLUMNS": ...}` could count."""
    from rich.console import Console

    from daemon.cli import render

    monkeypatch.setattr(render, "console", Console(width=220))


@pytest.fixture
def fake(tmp_path):
    daemon = FakeDaemon(tmp_path)
    yield daemon
    daemon.close()


def run(fake: FakeDaemon, *args: str):
    result = runner.invoke(app, ["cluster", *args, "--home", str(fake.home)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_each_command_sends_its_params(fake):
    fake.results = {
        "cluster_create": {**INFO, "admission": "allowlist"},
        "cluster_join": {"cluster": "lab", "peer_id": BOB, "roles": ["voter"], "status": "active"},
        "cluster_approve": {"cluster": "lab", "peer_id": BOB, "roles": ["worker"]},
        "cluster_remove": {"cluster": "lab", "peer_id": BOB, "status": "removed"},
        "cluster_leave": {"cluster": "lab", "peer_id": ADMIN, "status": "left"},
    }
    created = run(
        fake,
        "create",
        "lab",
        "--admission",
        "allowlist",
        "--allow",
        BOB,
        "--allow",
        ADMIN,
        "--require",
        "gpus >= 1",
        "--description",
        "the lab",
    )
    assert created.exit_code == 0, created.output
    assert "created cluster lab (allowlist)" in created.output
    assert "gridmesh cluster join lab" in created.output
    joined = run(fake, "join", "lab", "--role", "voter")
    assert joined.exit_code == 0 and "joined lab as voter" in joined.output
    approved = run(fake, "approve", "lab", BOB, "--role", "worker")
    assert f"{BOB} is a member of lab as worker" in approved.output
    assert "removed" in run(fake, "remove", "lab", BOB).output
    assert "left lab" in run(fake, "leave", "lab").output
    assert fake.calls == [
        (
            "cluster_create",
            {
                "name": "lab",
                "admission": "allowlist",
                "require": "gpus >= 1",
                "allowlist": [BOB, ADMIN],
                "description": "the lab",
            },
        ),
        ("cluster_join", {"name": "lab", "role": "voter"}),
        ("cluster_approve", {"name": "lab", "peer": BOB, "role": "worker"}),
        ("cluster_remove", {"name": "lab", "peer": BOB}),
        ("cluster_leave", {"name": "lab"}),
    ]


def test_a_request_says_how_an_admin_approves_it(fake):
    fake.results["cluster_join"] = {
        "cluster": "lab",
        "peer_id": BOB,
        "roles": ["worker"],
        "status": "requested",
    }
    result = run(fake, "join", "lab")
    assert result.exit_code == 0
    assert f"gridmesh cluster approve lab {BOB}" in result.output
    assert fake.calls == [("cluster_join", {"name": "lab", "role": "worker"})]


def test_info_shows_rule_coordinator_members_states_and_placements(fake):
    fake.results["cluster_info"] = INFO
    result = runner.invoke(
        app, ["cluster", "info", "lab", "--home", str(fake.home)], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    out = result.output
    for needle in (
        "approval",
        "gpus >= 1",
        "the lab",
        "term",
        "7",
        "admin (coordinator)",
        "suspect",
        "requested",
        "1 member, 1 request",
        "1 placement",
        "llama.0-4",
        "[0, 4]",
    ):
        assert needle in out, (needle, out)
    as_json = run(fake, "info", "lab", "--json")
    assert json.loads(as_json.output) == INFO
    # a runtime that failed, and no placements
    fake.results["cluster_info"] = {**INFO, "runtime": {"error": "RuntimeError: x"}}
    del fake.results["cluster_info"]["placements"]
    out = run(fake, "info", "lab").output
    assert "unknown (RuntimeError: x)" in out and "placements" not in out


def test_members_table(fake):
    fake.results["cluster_members"] = INFO["members"]
    out = runner.invoke(
        app, ["cluster", "members", "lab", "--home", str(fake.home)], env={"COLUMNS": "200"}
    ).output
    assert ADMIN in out and BOB in out and "requested" in out
    assert "2027-01-15" in out  # since, in UTC


def test_refusals_are_one_line_with_the_reason(fake):
    fake.results["cluster_join"] = {
        "error": {
            "code": -32020,
            "message": "requirement: cluster 'gpu' requires gpus >= 1; not met: gpus >= 1 "
            "(this node: 0)",
            "data": {"reason": "requirement"},
        }
    }
    result = run(fake, "join", "gpu")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridmesh: cluster_join failed")
    assert "gpus >= 1 (this node: 0)" in lines[0]
    # choices are checked before the daemon is asked
    for args, needle in (
        (["create", "lab", "--admission", "anyone"], "--admission 'anyone'"),
        (["join", "lab", "--role", "admin"], "--role 'admin': use one of voter, worker"),
        (["approve", "lab", BOB, "--role", "boss"], "--role 'boss'"),
    ):
        result = run(fake, *args)
        assert result.exit_code == 1 and needle in result.output, result.output
    assert [c[0] for c in fake.calls] == ["cluster_join"]


def test_help_teaches_roles_admission_and_require():
    out = runner.invoke(app, ["cluster", "--help"], env={"COLUMNS": "200"}).output
    for needle in ("open", "approval", "allowlist", "--require", "vram_gb", "voter", "worker"):
        assert needle in out, needle
    for command in ("create", "join", "approve", "remove", "leave", "members", "info", "plan"):
        assert command in out
        help_ = runner.invoke(app, ["cluster", command, "--help"])
        assert help_.exit_code == 0


def test_cluster_commands_import_nothing_heavy(fake):
    fake.results = {"cluster_info": INFO, "cluster_members": INFO["members"]}
    home = str(fake.home)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from daemon.cli.main import app\n"
        "for args in (['cluster', 'info', 'lab'], ['cluster', 'members', 'lab']):\n"
        f"    result = CliRunner().invoke(app, [*args, '--home', {home!r}])\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []


PLAN = {
    "cluster": "lab",
    "coordinator": ADMIN,
    "term": 4,
    "model": "tiny",
    "num_layers": 8,
    "replicas": 1,
    "assignments": [
        {"peer_id": ADMIN, "start": 0, "end": 5, "replica": 0},
        {"peer_id": BOB, "start": 5, "end": 8, "replica": 0},
    ],
    "start": 0,
    "end": 8,
    "scores": [
        {
            "peer_id": ADMIN,
            "total": 0.8125,
            "terms": {
                "memory": 0.5,
                "throughput": 0.4,
                "rtt": -0.05,
                "energy": -0.0375,
                "carbon": 0.0,
            },
            "inputs": {},
            "assumed": [],
            "chosen": True,
        },
        {
            "peer_id": BOB,
            "total": 0.25,
            "terms": {"memory": 0.3, "throughput": 0.0, "rtt": 0.0, "energy": -0.05, "carbon": 0.0},
            "inputs": {},
            "assumed": ["ms_per_layer", "carbon_g_per_kwh"],
            "chosen": True,
        },
    ],
    "excluded": {"12D3KooWCarol": "does not accept deploys"},
}


def test_plan_sends_its_params_and_shows_scores_by_term(fake):
    fake.results["cluster_plan"] = PLAN
    result = runner.invoke(
        app,
        [
            "cluster",
            "plan",
            "lab",
            "/models/tiny",
            "--model",
            "tiny",
            "--dtype",
            "float16",
            "--replicas",
            "2",
            "--home",
            str(fake.home),
        ],
        env={"COLUMNS": "220"},
    )
    assert result.exit_code == 0, result.output
    assert fake.calls == [
        (
            "cluster_plan",
            {
                "name": "lab",
                "model_dir": "/models/tiny",
                "dtype": "float16",
                "replicas": 2,
                "model": "tiny",
            },
        )
    ]
    out = result.output
    for needle in (
        f"tiny: 8 layers, 1 replica(s) on cluster lab, planned by {ADMIN} (term 4)",
        "[0, 5)",
        "[5, 8)",
        "0.812",
        "-0.0375",
        "ms_per_layer, carbon_g_per_kwh",
        "left out 12D3KooWCarol: does not accept deploys",
    ):
        assert needle in out, (needle, out)
    bad = run(fake, "plan", "lab", "/m", "--dtype", "int4")
    assert bad.exit_code == 1 and "--dtype 'int4'" in bad.output
    assert json.loads(run(fake, "plan", "lab", "/m", "--json").output) == PLAN


def test_info_shows_the_coordinators_placement_rows(fake):
    rows = [
        {
            "model": "tiny",
            "target": 1,
            "instances": "1..2",
            "servers": [f"{ADMIN} 0..5 alive", f"{BOB} 5..8 alive"],
            "last": "place: deployed",
        }
    ]
    fake.results["cluster_info"] = {**INFO, "placements": rows}
    out = runner.invoke(
        app, ["cluster", "info", "lab", "--home", str(fake.home)], env={"COLUMNS": "220"}
    ).output
    assert f"{ADMIN} 0..5 alive" in out and f"{BOB} 5..8 alive" in out
    assert "place: deployed" in out and "1..2" in out and '["' not in out


# -- real daemon processes ---------------------------------------------------------------


def gm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GM, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.procs
def test_create_join_approve_members_info_leave_with_real_daemons(tmp_path, fast_config):
    from daemon.devnet import DaemonProcess, wait_for

    pytest.importorskip("torch")
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=4, seed=3)
    first = DaemonProcess(tmp_path / "a", config=fast_config).start()
    daemons = [first]
    try:
        second = DaemonProcess(tmp_path / "b", config=fast_config, bootstrap=[first.addr])
        daemons.append(second.start())
        a, b = ["--home", str(first.home)], ["--home", str(second.home)]
        created = gm("cluster", "create", "lab", "--description", "the lab", *a)
        assert created.returncode == 0, created.stderr

        def known_on_b() -> bool:
            return gm("cluster", "members", "lab", *b).returncode == 0

        wait_for(known_on_b, 30, "the cluster to reach the second daemon")
        asked = gm("cluster", "join", "lab", "--role", "voter", *b)
        assert asked.returncode == 0, asked.stderr
        assert f"gridmesh cluster approve lab {second.peer_id}" in asked.stdout

        def listed(home: list[str], peer: str, status: str) -> bool:
            out = gm("cluster", "members", "lab", "--json", *home)
            rows = json.loads(out.stdout) if out.returncode == 0 else []
            return any(r["peer_id"] == peer and r["status"] == status for r in rows)

        wait_for(lambda: listed(a, second.peer_id, "requested"), 30, "the request at the admin")
        # the requester cannot approve itself
        refused = gm("cluster", "approve", "lab", second.peer_id, *b)
        assert refused.returncode == 1 and "only an admin" in refused.stderr
        approved = gm("cluster", "approve", "lab", second.peer_id, *a)
        assert approved.returncode == 0, approved.stderr
        wait_for(lambda: listed(b, second.peer_id, "active"), 30, "the approval at the member")
        info = gm("cluster", "info", "lab", "--json", *b)
        assert info.returncode == 0, info.stderr
        shown = json.loads(info.stdout)
        assert shown["voters"] == sorted([first.peer_id, second.peer_id])
        assert shown["this_node"]["status"] == "active" and "runtime" in shown
        table = gm("cluster", "info", "lab", *b)
        assert "the lab" in table.stdout and "approval" in table.stdout

        def coordinator() -> str | None:
            runtime = json.loads(gm("cluster", "info", "lab", "--json", *a).stdout)["runtime"]
            return runtime["coordinator"]

        leader = wait_for(coordinator, 30, "a coordinator")
        assert leader in (first.peer_id, second.peer_id)
        # a dry run through the coordinator (C's cluster_plan, with the params it documents)
        planned = gm("cluster", "plan", "lab", str(model_dir), "--model", "tiny", *b)
        assert planned.returncode == 0, planned.stderr
        assert "tiny: 4 layers" in planned.stdout and "(term " in planned.stdout
        assert "scores" in planned.stdout
        # every member scored (the JSON: the table may shorten a peer id to fit the terminal)
        as_json = gm("cluster", "plan", "lab", str(model_dir), "--model", "tiny", "--json", *b)
        plan = json.loads(as_json.stdout)
        considered = {row["peer_id"] for row in plan["scores"]} | set(plan["excluded"])
        assert first.peer_id in considered, as_json.stdout
        left = gm("cluster", "leave", "lab", *b)
        assert left.returncode == 0, left.stderr
        wait_for(lambda: not listed(a, second.peer_id, "active"), 30, "the leave at the admin")
    finally:
        for daemon in daemons:
            daemon.stop()


def test_deploy_with_cluster_goes_through_block_deploy_to_the_coordinator(fake, tmp_path):
    model_dir = tmp_path / "ckpt"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    fake.results = {
        "block_deploy": {
            "ok": True,
            "coordinator": ADMIN,
            "term": 3,
            "servers": [{"peer_id": BOB, "start": 0, "end": 4, "state": "alive"}],
        }
    }
    args = ["deploy", str(model_dir), "--model", "tiny", "--cluster", "lab"]
    done = runner.invoke(app, [*args, "--home", str(fake.home)])
    assert done.exit_code == 0, done.output
    assert fake.calls == [
        (
            "block_deploy",
            {
                "cluster": "lab",
                "model": "tiny",
                "model_dir": str(model_dir.resolve()),
                "dtype": "float32",
                "replicas": 1,
            },
        )
    ]
    assert f"coordinator {ADMIN} (term 3)" in done.output
    assert f"{BOB}  [0, 4)  alive" in done.output
    # options that only the plain deploy has are refused, naming why
    refused = runner.invoke(app, [*args, "--nodes", "2", "--home", str(fake.home)])
    assert refused.exit_code != 0
    assert "the coordinator places the model" in refused.output
    # a deploy the coordinator could not complete yet exits non-zero, pointing at cluster info
    fake.results["block_deploy"] = {**fake.results["block_deploy"], "ok": False}
    partial = runner.invoke(app, [*args, "--home", str(fake.home)])
    assert partial.exit_code != 0
    assert "gridmesh cluster info lab" in partial.output
