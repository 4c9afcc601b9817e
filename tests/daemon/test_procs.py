"""Real daemons in separate processes on 127.0.0.1: what only processes show (HTTP and raw
sockets, libp2p peers, signals, SIGKILL, the home lock, the CLI). Discovery, RPC methods and a
killed node vanishing run on whole in-memory daemons (test_whole_daemons.py)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from daemon.api.client import RPCCallError
from daemon.devnet import DaemonProcess, Devnet, DevnetError, wait_for

pytestmark = pytest.mark.procs


@pytest.fixture(scope="module")
def net4(tmp_path_factory, fast_config):
    devnet = Devnet(4, root=tmp_path_factory.mktemp("net4"), config=fast_config)
    with devnet:
        devnet.wait_all_found(timeout_s=30)
        yield devnet


def test_bad_input_is_counted_and_daemon_keeps_serving(net4):
    target = net4.daemons[3]
    url = target.info["rpc_url"]
    host, port = url.split("//")[1].rstrip("/").split(":")
    token = (target.home / "rpc.cookie").read_text().strip()

    def post(body: bytes, auth: bool = True) -> int:
        request = urllib.request.Request(url, data=body, method="POST")
        if auth:
            request.add_header("Authorization", f"Bearer {token}")
        request.add_header("Content-Type", "application/json")
        try:
            return urllib.request.urlopen(request, timeout=10).status
        except urllib.error.HTTPError as exc:
            return exc.code

    before_large = target.metric("gridmesh_rejected_messages_total", reason="too_large")
    assert post(b"[" * (2 << 20)) == 413
    assert post(b"{not json") == 200  # a JSON-RPC parse error travels in a 200 body
    assert post(b'{"jsonrpc":"2.0","method":"node_info","id":1}', auth=False) == 401
    with socket.create_connection((host, int(port)), timeout=5) as raw:
        raw.sendall(os.urandom(4096))
    # random bytes on every libp2p protocol the daemon advertises
    subprocess.run(
        [sys.executable, "-m", "daemon.tools.hostile_peer", "garbage", target.addr, "proctest"],
        check=True,
        timeout=60,
        capture_output=True,
    )
    assert target.metric("gridmesh_rejected_messages_total", reason="too_large") > before_large
    assert target.metric("gridmesh_rejected_messages_total", reason="unauthorized") >= 1
    assert target.metric("gridmesh_rejected_messages_total", source="dht") >= 1
    assert target.metric("gridmesh_rejected_messages_total", source="stream") >= 1
    assert target.alive()
    assert target.call("node_info")["peer_id"] == target.peer_id
    assert len(target.call("nodes_find", {})) == 4


def test_a_daemon_process_freezes_what_start_up_built_and_times_its_collections(net4):
    """daemon.gcpauses in a real process: start-up's objects (torch, py-libp2p...) are out of
    full collections' reach, and every collection's pause is exported."""
    node = net4.daemons[0]
    assert node.metric("gridmesh_gc_frozen_objects") > 50_000
    wait_for(lambda: node.metric("gridmesh_gc_pause_seconds_count") > 0, 10, "a collection")


def test_sigkilled_daemon_restarts_in_its_home_with_its_identity(tmp_path, fast_config):
    """What only a process shows: SIGKILL leaves daemon.json behind, and a restart in that
    home starts anyway, as the same node. (Discovery's side of a kill and a restart, the
    killed node vanishing from its peers' nodes_find, runs on whole in-memory daemons:
    test_whole_daemons.py.)"""
    victim = DaemonProcess(tmp_path / "home", config=fast_config).start()
    victim.kill()
    assert (victim.home / "daemon.json").exists()  # stale: nobody cleaned up
    restarted = DaemonProcess(victim.home, config=fast_config).start()
    try:
        assert restarted.peer_id == victim.peer_id
        found = wait_for(lambda: restarted.call("nodes_find", {}), 10, "the node to find itself")
        assert [r["peer_id"] for r in found] == [victim.peer_id]
    finally:
        restarted.stop()


def test_sigterm_stops_cleanly_and_home_is_locked(tmp_path, fast_config):
    first = DaemonProcess(tmp_path / "home", config=fast_config).start()
    try:
        second = subprocess.run(
            [
                sys.executable,
                "-m",
                "daemon.cli.main",
                "daemon",
                "--home",
                str(first.home),
                "--config",
                str(fast_config),
                "--rpc-port",
                "0",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert second.returncode == 1
        assert "already running" in second.stderr
        assert first.alive()
        started = time.monotonic()
        first.proc.send_signal(signal.SIGTERM)
        assert first.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert not (first.home / "daemon.json").exists()
        assert not (first.home / "rpc.cookie").exists()
    finally:
        first.stop()


def test_node_shutdown_rpc(tmp_path, fast_config):
    daemon = DaemonProcess(tmp_path / "home", config=fast_config).start()
    try:
        assert daemon.call("node_shutdown") == {"stopping": True}
        assert daemon.proc.wait(10) == 0
    finally:
        daemon.stop()


def test_cli_against_a_running_daemon(tmp_path, fast_config):
    home = tmp_path / "home"
    gm = [sys.executable, "-m", "daemon.cli.main"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*gm, *args], capture_output=True, text=True, timeout=60)

    absent = run("status", "--home", str(home))
    assert absent.returncode == 1
    assert absent.stderr.strip().count("\n") == 0 and "no daemon is running" in absent.stderr
    init = run("init", "--home", str(home))
    assert init.returncode == 0 and "peer id" in init.stdout
    assert (home / "config.toml").exists()
    daemon = DaemonProcess(home, config=fast_config).start()
    try:
        status = json.loads(run("status", "--home", str(home), "--json").stdout)
        assert status["peer_id"] == daemon.peer_id
        assert daemon.peer_id[:10] in run("status", "--home", str(home)).stdout
        nodes = wait_for(
            lambda: json.loads(run("nodes", "--home", str(home), "--json").stdout),
            10,
            "the node to find itself",
        )
        assert nodes[0]["peer_id"] == daemon.peer_id
        assert run("nodes", "--home", str(home), "--min-gpus", "1", "--json").stdout.strip() == "[]"
        assert json.loads(run("rpc", "rpc_methods", "--home", str(home)).stdout)
        bad = run("rpc", "no_such_method", "--home", str(home))
        assert bad.returncode == 1 and "-32601" in bad.stderr
        assert run("peers", "--home", str(home)).returncode == 0
    finally:
        daemon.stop()


def test_a_daemon_that_does_not_start_in_time_is_not_left_running(tmp_path, fast_config):
    """A test (or the devnet) giving up on a slow start stops the process it spawned."""
    daemon = DaemonProcess(tmp_path / "home", config=fast_config)
    with pytest.raises(DevnetError, match="to start"):
        daemon.start(timeout_s=0.01)
    assert daemon.proc is not None and daemon.proc.poll() is not None


def test_sigint_stops_within_five_seconds(tmp_path, fast_config):
    daemon = DaemonProcess(tmp_path / "home", config=fast_config).start()
    try:
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGINT)
        assert daemon.proc.wait(10) == 0
        assert time.monotonic() - started < 5
        assert not (daemon.home / "daemon.json").exists()
    finally:
        daemon.stop()


def test_node_connect_to_a_closed_port_fails(net4):
    """Over the real RPC: nothing listening there is an error, even for a connected peer."""
    d, other = net4.daemons[0], net4.daemons[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(RPCCallError) as err:
        d.call("node_connect", {"multiaddr": f"/ip4/127.0.0.1/tcp/{closed}/p2p/{other.peer_id}"})
    assert err.value.code == -32010
    assert str(closed) in str(err.value)


def test_libp2p_peer_without_hello_gets_nothing(net4):
    """A plain libp2p peer (no gridmesh hello) asks a daemon for its registry: refused, not
    listed among its peers, and counted."""
    import trio
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as create_x25519_key_pair
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.noise.transport import PROTOCOL_ID, Transport
    from multiaddr import Multiaddr

    from p2p import codec
    from p2p.host import read_frame, write_frame
    from registry.replication import SYNC_PROTOCOL, WIRE_VERSION

    target = net4.daemons[1]
    before = target.metric("gridmesh_rejected_messages_total", reason="no_hello")
    outcome: dict[str, object] = {}

    async def attack() -> None:
        keys = create_new_key_pair()
        noise = Transport(keys, noise_privkey=create_x25519_key_pair().private_key)
        host = new_host(key_pair=keys, sec_opt={PROTOCOL_ID: noise}, muxer_preference="YAMUX")
        async with host.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            info = info_from_p2p_addr(Multiaddr(target.addr))
            await host.connect(info)
            outcome["listed"] = host.get_id().to_base58() in {
                p["peer_id"] for p in await trio.to_thread.run_sync(target.call, "node_peers")
            }
            pull = codec.encode({"v": WIRE_VERSION, "op": "pull", "ids": [["components", "x"]]})
            try:
                with trio.fail_after(15):
                    stream = await host.new_stream(info.peer_id, [SYNC_PROTOCOL])
                    await write_frame(stream, pull)
                    outcome["answer"] = await read_frame(stream)
            except Exception as exc:  # reset, or dropped with the connection
                outcome["refused"] = type(exc).__name__

    trio.run(attack)
    assert "answer" not in outcome, outcome
    assert outcome["listed"] is False
    wait_for(
        lambda: target.metric("gridmesh_rejected_messages_total", reason="no_hello") > before,
        10,
        "the refusal to be counted",
    )
    assert target.alive()
