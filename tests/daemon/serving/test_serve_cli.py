"""`gridmesh serve` (daemon/cli/serve.py): keys from keygen that the endpoint's Access takes,
mistakes refused in one line naming the flag, the daemon's options reused, and the URL and
client example printed once the daemon is up."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import tomllib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from typer.testing import CliRunner

from daemon import settings
from daemon.cli import serve
from daemon.cli.main import app
from daemon.serving.access import Access
from daemon.serving.settings import ServingConfig

runner = CliRunner()
GM = [sys.executable, "-m", "daemon.cli.main"]


def one_line_error(result, *needles: str) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gridmesh: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# -- keygen --------------------------------------------------------------------------------


def test_keygen_prints_a_key_and_a_table_that_admits_it():
    result = runner.invoke(app, ["serve", "keygen", "--name", "alice"])
    assert result.exit_code == 0, result.output
    key = re.search(r"^  (gm-\S+)$", result.output, re.MULTILINE)[1]
    assert len(key) >= 40
    table = result.output[result.output.index("[[serving.api_keys]]") :]
    assert key not in table  # only its digest goes into the config
    raw = tomllib.loads(f"[serving]\nhost = '0.0.0.0'\n{table}")
    cfg = settings.parse(raw).serving
    assert cfg.api_keys[0].name == "alice"
    # the commented limits are the documented keys, and parse when uncommented
    limits = tomllib.loads(table.replace("# ", ""))["serving"]["api_keys"][0]
    assert settings.parse({"serving": {"api_keys": [limits]}}).serving.api_keys[0].max_concurrent
    assert Access(cfg).admit(f"Bearer {key}", loopback=False).name == "alice"
    again = runner.invoke(app, ["serve", "keygen"])
    assert key not in again.output and 'name = "default"' in again.output


def test_keygen_refuses_a_bad_name():
    one_line_error(runner.invoke(app, ["serve", "keygen", "--name", "a b"]), "--name 'a b'")


# -- mistakes before anything starts --------------------------------------------------------


@pytest.fixture
def taken_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def serve_args(tmp_path, *args: str) -> list[str]:
    return ["serve", "--home", str(tmp_path / "h"), "--rpc-port", "0", *args]


def test_serve_without_openai_says_what_to_add(tmp_path):
    one_line_error(runner.invoke(app, serve_args(tmp_path)), "gridmesh serve --openai")
    # unless the config turns it on; then the rest is checked as with --openai
    config = tmp_path / "c.toml"
    config.write_text("[serving]\nopenai = true\n")
    result = runner.invoke(app, serve_args(tmp_path, "--config", str(config), "--port", "-1"))
    one_line_error(result, "--port -1 is not a TCP port")


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["--host", "0.0.0.0"], ["--host is '0.0.0.0', beyond loopback: set api_keys too"]),
        (["--host", "nowhere"], ["--host 'nowhere' is not an IP address"]),
        (["--port", "70000"], ["--port 70000 is not a TCP port"]),
    ],
)
def test_a_bad_flag_is_one_line_naming_it(tmp_path, args, needles):
    before = dict(os.environ)
    one_line_error(runner.invoke(app, serve_args(tmp_path, "--openai", *args)), *needles)
    assert dict(os.environ) == before
    assert not (tmp_path / "h" / "daemon.json").exists()


def test_a_taken_port_is_one_line_naming_it(tmp_path, taken_port):
    result = runner.invoke(app, serve_args(tmp_path, "--openai", "--port", str(taken_port)))
    one_line_error(result, f"serving.port {taken_port} on 127.0.0.1 is already in use", "--port")


def test_a_config_with_keys_may_listen_beyond_loopback(tmp_path):
    """--host over a config that has keys passes the check; the daemon's own options are
    then checked by the daemon command (a bad --listen here), and the environment is left
    as it was."""
    config = tmp_path / "c.toml"
    config.write_text(f"[[serving.api_keys]]\nname = 'a'\nkey = '{'k' * 24}'\n")
    before = dict(os.environ)
    args = serve_args(tmp_path, "--openai", "--host", "0.0.0.0", "--config", str(config))
    result = runner.invoke(app, [*args, "--listen", "garbage"])
    one_line_error(result, "--listen 'garbage' is not a listen multiaddr")
    assert dict(os.environ) == before


def test_serve_takes_every_option_of_daemon():
    text = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "120"}).output
    for option in ("--openai", "--port", "--host", "--home", "--config", "--listen"):
        assert option in text
    for option in ("--bootstrap", "--rpc-port", "--grpc-port", "--log-level"):
        assert option in text
    assert 'OpenAI(base_url="http://127.0.0.1:8000/v1"' in text and "keygen" in text


# -- the URL and the example ----------------------------------------------------------------


def test_the_url_is_the_nodes_or_the_configs():
    fixed = ServingConfig(port=8000)
    assert serve.endpoint_url(None, fixed) == "http://127.0.0.1:8000/v1"
    assert serve.endpoint_url({"openai_url": "http://127.0.0.1:9/v1"}, fixed).endswith(":9/v1")
    assert serve.endpoint_url({"openai_url": "http://127.0.0.1:9/"}, fixed).endswith(":9/v1")
    wide = {"openai_url": "http://0.0.0.0:9/v1"}
    assert serve.endpoint_url(wide, fixed) == "http://127.0.0.1:9/v1"
    assert serve.endpoint_url({"openai_url": "http://[::]:9/v1"}, fixed) == "http://[::1]:9/v1"
    assert serve.endpoint_url({"peer_id": "x"}, ServingConfig()) is None  # port 0: unknown
    keyed = ServingConfig(host="::", port=8000, api_keys=())
    assert serve.endpoint_url(None, keyed) == "http://[::1]:8000/v1"


def test_the_example_tells_whether_a_key_is_needed():
    lines = serve.example_lines("http://127.0.0.1:8000/v1", ServingConfig(port=8000))
    assert 'client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="none")' in lines[3]
    code = "\n".join(line.strip() for line in lines[2:5])
    compile(code, "example", "exec")  # the three lines are Python
    wide = ServingConfig(host="0.0.0.0", port=8000, require_keys=True)
    lines = serve.example_lines("http://127.0.0.1:8000/v1", wide)
    assert "from other machines: http://THIS-MACHINE:8000/v1" in lines[1]
    assert any('api_key="YOUR_KEY"' in line for line in lines)


@pytest.fixture
def fake_daemon(tmp_path):
    """A home whose daemon.json names a JSON-RPC endpoint answering node_info."""
    info: dict = {"peer_id": "x", "openai_url": None}

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            body = json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": info}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/"
    (tmp_path / "daemon.json").write_text(json.dumps({"pid": 4242, "rpc_url": url}))
    (tmp_path / "rpc.cookie").write_text("token")
    yield tmp_path, info
    server.shutdown()


def test_announce_waits_for_the_node_to_report_its_url(fake_daemon):
    home, info = fake_daemon
    printed: list[str] = []
    done = threading.Event()

    def run() -> None:
        serve.announce_when_up(home, ServingConfig(), pid=4242, echo=printed.append, timeout_s=30)
        done.set()

    threading.Thread(target=run, daemon=True).start()
    assert not done.wait(0.5) and printed == []  # openai_url None: not listening yet
    info["openai_url"] = "http://127.0.0.1:5555/v1"
    assert done.wait(10)
    assert printed[0].startswith("OpenAI-compatible endpoint: http://127.0.0.1:5555/v1")


def test_announce_gives_up_for_another_pid_and_when_stopped(fake_daemon):
    home, info = fake_daemon
    printed: list[str] = []
    assert not serve.announce_when_up(
        home, ServingConfig(), pid=1, echo=printed.append, timeout_s=0.3
    )
    stop = threading.Event()
    stop.set()
    assert not serve.announce_when_up(home, ServingConfig(), pid=4242, stop=stop, timeout_s=30)
    del info["openai_url"]  # a node that does not report one: [serving] says where
    assert serve.announce_when_up(home, ServingConfig(port=8123), pid=4242, echo=printed.append)
    assert printed[0].startswith("OpenAI-compatible endpoint: http://127.0.0.1:8123/v1")


@pytest.mark.procs
def test_serve_runs_a_daemon_and_prints_the_url(tmp_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = ["serve", "--openai", "--port", str(port), "--home", str(tmp_path / "h")]
    args += ["--rpc-port", "0", "--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "warning"]
    proc = subprocess.Popen(
        [*GM, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        lines: list[str] = []
        timer = threading.Timer(90, proc.kill)  # a deadline for the reads below
        timer.start()
        for line in proc.stdout:
            lines.append(line)
            if "/models" in line:
                break
        timer.cancel()
        text = "".join(lines)
        assert f"OpenAI-compatible endpoint: http://127.0.0.1:{port}/v1" in text, text
        assert f'OpenAI(base_url="http://127.0.0.1:{port}/v1", api_key="none")' in text
    finally:
        proc.terminate()
        proc.wait(timeout=30)
