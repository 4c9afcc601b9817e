"""A new user's mistakes, made through the real CLI: each is one clear line and exit code 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from daemon.cli.main import app
from daemon.devnet import DaemonProcess

runner = CliRunner()
GM = [sys.executable, "-m", "daemon.cli.main"]


def gm(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*GM, *args], capture_output=True, text=True, timeout=timeout)


def one_line_error(result, *needles: str) -> str:
    """The CLI failed with exit code 1 and a single `gridmesh: ...` line naming the needles.

    `result` is a subprocess's CompletedProcess or typer's CliRunner Result."""
    if isinstance(result, subprocess.CompletedProcess):
        code, output = result.returncode, result.stderr + result.stdout
    else:
        code, output = result.exit_code, result.output
    assert code == 1, output
    lines = output.strip().splitlines()
    assert len(lines) == 1, output
    assert lines[0].startswith("gridmesh: "), output
    assert "Traceback" not in output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def cli(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


# -- item 12: multiaddrs are validated, for flags and for config.toml ---------------------


@pytest.mark.parametrize(
    ("flag", "value", "needle"),
    [
        ("--listen", "garbage", "expected /ip4/ADDRESS/tcp/PORT"),
        ("--listen", "/ip4/300.1.2.3/tcp/4001", "is not an ip4 address"),
        ("--listen", "/ip4/127.0.0.1/tcp/99999", "not a TCP port"),
        ("--listen", "/ip4/127.0.0.1/tcp/1/p2p/x", "ends with /tcp/PORT"),
        ("--listen", "/dns/localhost/tcp/0", "not /dns"),
        ("--bootstrap", "garbage", "expected /ip4/ADDRESS/tcp/PORT"),
        ("--bootstrap", "/ip4/1.2.3.4/tcp/4001", "must end with /p2p/<peer id>"),
        ("--bootstrap", "/ip4/1.2.3.4/tcp/4001/p2p/hello", "is not a peer id"),
        ("--rpc-port", "70000", "--rpc-port 70000 is not a TCP port"),
        ("--grpc-port", "-1", "--grpc-port -1 is not a TCP port"),
    ],
)
def test_bad_flag_is_one_line_naming_the_flag(tmp_path, flag, value, needle):
    result = cli("daemon", "--home", str(tmp_path / "h"), flag, value)
    assert result.exit_code == 1
    line = one_line_error(result, needle)
    assert line.startswith(f"gridmesh: {flag}")
    assert not (tmp_path / "h" / "daemon.json").exists()


@pytest.mark.parametrize(
    ("toml", "needle"),
    [
        ('[p2p]\nlisten = ["garbage"]\n', "p2p.listen[0]"),
        ("[p2p]\nlisten = []\n", "p2p.listen is empty"),
        ('[p2p]\nbootstrap = ["/ip4/1.2.3.4/tcp/4001"]\n', "p2p.bootstrap[0]"),
        ('[p2p]\nbootstrap = ["/dns/x.example/tcp/1/p2p/12D3Koo!"]\n', "not a peer id"),
    ],
)
def test_bad_multiaddr_in_config_names_the_key_and_file(tmp_path, toml, needle):
    path = tmp_path / "config.toml"
    path.write_text(toml)
    result = cli("daemon", "--home", str(tmp_path / "h"), "--config", str(path))
    assert result.exit_code == 1
    one_line_error(result, needle, str(path))


def test_config_that_is_not_a_readable_file(tmp_path):
    result = cli("daemon", "--home", str(tmp_path / "h"), "--config", str(tmp_path))
    assert result.exit_code == 1
    one_line_error(result, "cannot read config file", str(tmp_path))
    missing = cli("daemon", "--home", str(tmp_path / "h"), "--config", str(tmp_path / "no.toml"))
    one_line_error(missing, "does not exist")


def test_home_that_is_a_file_or_holds_a_bad_key(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    one_line_error(cli("init", "--home", str(a_file)), "cannot set up", str(a_file))
    home = tmp_path / "h"
    home.mkdir()
    (home / "node.key").write_text("garbage")
    (home / "node.key").chmod(0o600)
    args = ["daemon", "--home", str(home), "--rpc-port", "0", "--listen", "/ip4/127.0.0.1/tcp/0"]
    one_line_error(cli(*args), "node.key")


def test_deploy_mistakes_before_any_daemon_is_asked(tmp_path):
    home = ["--home", str(tmp_path / "h")]
    missing = cli("deploy", str(tmp_path / "nope"), "--model", "m", *home)
    one_line_error(missing, "is not a directory")
    (tmp_path / "empty").mkdir()
    empty = cli("deploy", str(tmp_path / "empty"), "--model", "m", *home)
    one_line_error(empty, "has no config.json")
    (tmp_path / "empty" / "config.json").write_text("{}")
    dtype = cli("deploy", str(tmp_path / "empty"), "--model", "m", "--dtype", "int4", *home)
    one_line_error(dtype, "--dtype 'int4'")
    no_daemon = cli("deploy", str(tmp_path / "empty"), "--model", "m", *home)
    one_line_error(no_daemon, "no daemon is running")


def test_good_multiaddrs_pass_validation():
    from daemon import config

    peer = "12D3KooWQQk2YcdHSkqWYZWhefsfH7ci8PACnWaNTJFtmssExvqk"
    cfg = config.with_overrides(
        config.Config(),
        listen=["/ip4/0.0.0.0/tcp/0", "/ip6/::1/tcp/4001"],
        bootstrap=[f"/ip4/203.0.113.7/tcp/4001/p2p/{peer}", f"/dns/a.example/tcp/1/p2p/{peer}"],
    )
    assert len(cfg.p2p.listen) == 2 and len(cfg.p2p.bootstrap) == 2


# -- item 11: ports ---------------------------------------------------------------------


@pytest.fixture
def taken_port():
    """A port something else listens on, as a second daemon would find 8645 or 4001."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.mark.parametrize(
    ("flag", "setting"),
    [("--rpc-port", "rpc.port"), ("--grpc-port", "grpc.port")],
)
def test_taken_local_api_port_is_one_line_naming_the_port(tmp_path, taken_port, flag, setting):
    args = ["daemon", "--home", str(tmp_path / "h"), "--listen", "/ip4/127.0.0.1/tcp/0"]
    args += ["--rpc-port", "0", "--grpc-port", "0", flag, str(taken_port)]
    result = cli(*args)
    assert result.exit_code == 1
    one_line_error(result, f"{setting} {taken_port}", "already in use", f"{flag} 0")


def test_taken_libp2p_port_is_one_line_naming_the_port(tmp_path, taken_port):
    listen = f"/ip4/127.0.0.1/tcp/{taken_port}"
    result = cli("daemon", "--home", str(tmp_path / "h"), "--listen", listen, "--rpc-port", "0")
    assert result.exit_code == 1
    one_line_error(result, f"p2p.listen {listen}", "already in use", "/ip4/127.0.0.1/tcp/0")


def test_listen_on_an_address_not_of_this_machine(tmp_path):
    result = cli("daemon", "--home", str(tmp_path / "h"), "--listen", "/ip4/192.0.2.1/tcp/0")
    assert result.exit_code == 1
    one_line_error(result, "192.0.2.1 is not an address of this machine")


@pytest.mark.procs
def test_two_daemons_on_one_host_with_the_documented_flags(tmp_path):
    """Default config (no config.toml) plus `--listen .../tcp/0 --rpc-port 0`: both start."""
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    first = DaemonProcess(tmp_path / "a", config=empty)
    second = DaemonProcess(tmp_path / "b", config=empty)
    try:
        first.start()
        second.start()
        assert first.info["grpc_addr"] != second.info["grpc_addr"]
        shown = gm("status", "--home", str(second.home))
        assert second.info["grpc_addr"] in shown.stdout  # where to point a gRPC client
        assert first.call("node_info")["peer_id"] != second.call("node_info")["peer_id"]
        # the same home twice is refused in one line, before any port is touched
        again = gm("daemon", "--home", str(first.home), "--rpc-port", "0", timeout=30)
        one_line_error(again, "already running", str(first.home))
    finally:
        for daemon in (first, second):  # stop both at once
            if daemon.alive():
                daemon.proc.terminate()
        first.stop()
        second.stop()


# -- item 15: a crashed daemon's files ----------------------------------------------------


@pytest.mark.procs
def test_stale_files_of_a_killed_daemon_are_reported_and_removed(tmp_path, fast_config):
    daemon = DaemonProcess(tmp_path / "home", config=fast_config).start()
    pid = daemon.proc.pid
    daemon.kill()
    assert (daemon.home / "daemon.json").exists() and (daemon.home / "rpc.cookie").exists()
    result = gm("status", "--home", str(daemon.home))
    one_line_error(result, "no daemon is running", f"stale files from pid {pid} removed")
    assert not (daemon.home / "daemon.json").exists()
    assert not (daemon.home / "rpc.cookie").exists()
    again = gm("status", "--home", str(daemon.home))
    line = one_line_error(again, "no daemon is running")
    assert "stale files" not in line
    # the next daemon on the home finds the leftovers of a killed one too, and says so
    daemon.start()
    pid = daemon.proc.pid
    daemon.kill()
    assert json.loads((daemon.home / "daemon.json").read_text())["pid"] == pid
    args = ["daemon", "--home", str(daemon.home), "--config", str(fast_config)]
    restarted = subprocess.Popen([*GM, *args], stderr=subprocess.PIPE, text=True)
    try:
        line = ""
        while "up; rpc" not in line:  # the daemon logs its start on stderr, line by line
            line = restarted.stderr.readline()
            assert line, "the restarted daemon exited"
            if "stale" in line:
                assert f"removed stale daemon.json and rpc.cookie of pid {pid}" in line
                break
        else:
            pytest.fail("the restarted daemon did not report the stale files")
    finally:
        restarted.terminate()
        restarted.wait(10)


# -- item 14: commands that only talk to the daemon import nothing heavy -----------------

HEAVY = ("libp2p", "torch", "web3", "eth_account", "grpc", "trio", "transformers")


@pytest.fixture
def answering_home(tmp_path):
    """A home whose daemon.lock is held and whose daemon.json names a JSON-RPC endpoint on a
    real socket that answers node_info, registry_list and block_list: what the CLI sees of a
    running daemon, without libp2p in this test process either."""
    import fcntl
    import http.server
    import threading

    results = {
        "node_info": {"peer_id": "12D3KooWFakeFakeFake", "resources": {}, "listen_addrs": []},
        "registry_list": {"items": [], "next_cursor": None},
        "block_list": {"local": [], "announced": {}},
    }

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps(
                {"jsonrpc": "2.0", "id": request["id"], "result": results[request["method"]]}
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lock = os.open(tmp_path / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX)
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": os.getpid(), "rpc_url": url}))
    (tmp_path / "rpc.cookie").write_text("token")
    (tmp_path / "rpc.cookie").chmod(0o600)
    yield tmp_path
    server.shutdown()
    os.close(lock)


def test_cli_imports_nothing_heavy(answering_home):
    """Commands that only talk to the daemon, run in a fresh interpreter against a daemon's
    JSON-RPC endpoint, load none of libp2p, torch, grpc, trio, web3."""
    home = str(answering_home)
    code = (
        "import sys\n"
        "from typer.testing import CliRunner\n"
        "from daemon.cli.main import app\n"
        "for args in (['status'], ['get', 'blocks'], ['blocks'], ['status', '--json']):\n"
        f"    result = CliRunner().invoke(app, [*args, '--home', {home!r}])\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        "    assert 'FakeFake' in result.output or 'entries' in result.output or args == "
        "['blocks'], result.output\n"
        f"print([m for m in sys.modules if m.split('.')[0] in {HEAVY!r}])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1].replace("'", '"')) == []


def test_status_without_a_daemon_is_one_line(tmp_path):
    result = gm("status", "--home", str(tmp_path))
    one_line_error(result, "no daemon is running", str(tmp_path))


# -- item 13: registry documents and versions ---------------------------------------------

SAMPLES = Path(__file__).resolve().parents[2] / "configs" / "samples"


@pytest.mark.procs
def test_apply_hints_files_directories_and_integer_versions(tmp_path, fast_config):
    daemon = DaemonProcess(tmp_path / "home", config=fast_config).start()
    home = ["--home", str(daemon.home)]
    try:
        alone = gm("apply", "-f", str(SAMPLES / "component.yaml"), *home)
        one_line_error(alone, "not known here", "apply the cluster's document first")
        # several files after one -f, in the wrong order: clusters still go first
        files = [str(SAMPLES / n) for n in ("block.yaml", "component.yaml", "cluster.yaml")]
        several = gm("apply", "-f", *files, *home)
        assert several.returncode == 0, several.stderr
        assert several.stdout.splitlines()[0].startswith("clusters/lab-west applied")
        assert len(several.stdout.splitlines()) == 3
        directory = gm("apply", "-f", str(SAMPLES), *home)
        assert directory.returncode == 0, directory.stderr
        assert len(directory.stdout.splitlines()) == 3
        version = directory.stdout.splitlines()[0].split("(version ")[1].rstrip(")")
        assert version.isdigit(), directory.stdout
        table = gm("get", "clusters", *home, "--json")
        assert json.loads(table.stdout)[0]["key"] == "lab-west"
        shown = gm("get", "clusters", *home)
        assert f"{version[:6]}" in shown.stdout and f"{version}.0" not in shown.stdout
        empty = tmp_path / "empty"
        empty.mkdir()
        one_line_error(gm("apply", "-f", str(empty), *home), "without .yaml")
    finally:
        daemon.stop()


# -- item 13: deploy, exactly N nodes, refusing peers, rollback, undeploy ------------------


def _found_all(daemon: DaemonProcess, count: int) -> bool:
    return len(daemon.call("nodes_find", {})) == count


@pytest.mark.procs
def test_deploy_plans_only_on_willing_nodes_rolls_back_and_undeploys(tmp_path, fast_config):
    pytest.importorskip("torch")
    from daemon.devnet import wait_for
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=4, seed=3)
    refusing = tmp_path / "refusing.toml"
    refusing.write_text(
        fast_config.read_text().replace("allow_remote_deploy = true", "allow_remote_deploy = false")
    )
    first = DaemonProcess(tmp_path / "a", config=fast_config).start()
    daemons = [first]
    try:
        daemons.append(DaemonProcess(tmp_path / "b", config=fast_config, bootstrap=[first.addr]))
        daemons.append(DaemonProcess(tmp_path / "c", config=refusing, bootstrap=[first.addr]))
        for daemon in daemons[1:]:
            daemon.start()
        wait_for(lambda: _found_all(first, 3), 30, "three nodes to be found")
        willing, unwilling = daemons[1].peer_id, daemons[2].peer_id
        home = ["--home", str(first.home)]
        deploy = ["deploy", str(model_dir), "--model", "tiny", *home]

        three = gm(*deploy, "--nodes", "3", "--dry-run")
        line = one_line_error(three, "exactly 3 nodes", "only 2 known node(s) accept a deploy")
        assert "allow_remote_deploy" in line
        two = gm(*deploy, "--nodes", "2", "--dry-run")
        assert two.returncode == 0, two.stderr
        planned = {row.split()[0] for row in two.stdout.splitlines()}
        assert planned == {first.peer_id, willing} and unwilling not in two.stdout

        done = gm(*deploy, "--nodes", "2")
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("loaded") == 2
        wait_for(
            lambda: len(first.call("block_list", {"model": "tiny"})["announced"]["tiny"]) == 2,
            15,
            "both shards to be announced",
        )
        gone = gm("undeploy", "tiny", *home)
        assert gone.returncode == 0, gone.stderr
        assert gone.stdout.count("unloaded") == 2
        assert daemons[1].call("block_list", {})["local"] == []
        missing = gm("undeploy", "tiny", *home)
        one_line_error(missing, "no node")

        # one part fails (a range past the model's 4 layers): the part a peer loaded is
        # unloaded again there, through the real CLI's raw RPC command
        plan = [
            {"peer_id": willing, "start": 0, "end": 2},
            {"peer_id": first.peer_id, "start": 2, "end": 9},
        ]
        params = {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
        raw = gm("rpc", "block_deploy", json.dumps(params), *home)
        assert raw.returncode == 0, raw.stderr
        result = json.loads(raw.stdout)
        assert result["ok"] is False
        assert [r["ok"] for r in result["results"]] == [True, False]
        assert result["rolled_back"] == [{"peer_id": willing, "ok": True, "unloaded": True}]
        assert daemons[1].call("block_list", {})["local"] == []
    finally:
        for daemon in daemons:
            if daemon.alive():
                daemon.proc.terminate()
        for daemon in daemons:
            daemon.stop()


def test_commands_without_home_use_gridmesh_home(tmp_path, monkeypatch):
    """No --home: the node's home is $GRIDMESH_HOME (else ~/.gridmesh), for every command."""
    home = tmp_path / "node"
    monkeypatch.setenv("GRIDMESH_HOME", str(home))
    result = runner.invoke(app, ["init"])
    assert result.exit_code == 0, result.output
    assert (home / "config.toml").is_file()
    status = runner.invoke(app, ["status"])  # no daemon runs there: said in one line
    assert status.exit_code == 1
    assert f"no daemon is running with home {home}" in status.output
