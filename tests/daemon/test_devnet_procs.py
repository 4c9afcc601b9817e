"""`make devnet` (`python -m daemon.devnet`, stopped by SIGTERM once it runs): its daemons
form one cluster through the cluster_* RPC methods, it prints the coordinator they elected
(peer id and term), deploys the demo model through that coordinator, and the paid generation
through the cluster gives the tokens of one process with every balance exactly right; then
node0 (alone serving the OpenAI endpoint) streams a chat with the deployed model; SIGTERM
stops every daemon."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("torch")

pytestmark = pytest.mark.procs

PEER = r"12D3KooW[1-9A-HJ-NP-Za-km-z]+"


def _run_until_running_then_terminate(env: dict[str, str], err: Path) -> tuple[str, int, str]:
    """`python -m daemon.devnet` until it says it is running, then SIGTERM (as a service
    manager stops it): its output, exit code and stderr."""
    with open(err, "w") as err_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "daemon.devnet", "--nodes", "4"],
            stdout=subprocess.PIPE,
            stderr=err_file,
            text=True,
            env=env,
        )
    watchdog = threading.Timer(300, proc.kill)
    watchdog.start()
    lines = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("devnet running"):
                proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return "".join(lines), code, err.read_text()


def test_make_devnet_forms_a_cluster_deploys_through_its_coordinator_and_chats(tmp_path):
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    env.pop("DEVNET_ONCE", None)
    out, code, err = _run_until_running_then_terminate(env, tmp_path / "stderr.txt")
    assert code == 0, f"{out}\n{err[-4000:]}"
    # SIGTERM stopped every daemon and removed the devnet's folder
    assert "stopping daemons ..." in out
    assert not list(tmp_path.glob("gridmesh-devnet-*")), out
    nodes = dict(re.findall(rf"^  (node\d) ({PEER}) rpc ", out, re.M))
    assert sorted(nodes) == ["node0", "node1", "node2", "node3"], out
    # only node0 serves the OpenAI endpoint, on loopback
    serving = re.findall(r"^  (node\d) \S+ rpc \S+ openai (http://127\.0\.0\.1:\d+/v1)$", out, re.M)
    assert [name for name, _ in serving] == ["node0"], out
    assert "node0 created cluster 'devnet'" in out
    joined = dict(re.findall(r"^(node\d) joined as a (voter|worker)$", out, re.M))
    assert joined == {"node1": "voter", "node2": "voter", "node3": "worker"}, out
    elected = re.search(
        rf"^cluster 'devnet': elected coordinator (node\d) ({PEER}) \(term (\d+)\), "
        r"known to all 4 daemons",
        out,
        re.M,
    )
    assert elected is not None, out
    name, peer, term = elected.groups()
    assert nodes[name] == peer and int(term) >= 1
    # only voters coordinate: never the worker
    assert joined.get(name) != "worker"
    deployed = re.search(
        r"^deployed through cluster 'devnet': coordinator (node\d) \(term (\d+)\) placed "
        r"((?:node\d\[\d+,\d+\)(?:, )?)+)$",
        out,
        re.M,
    )
    assert deployed is not None, out
    assert joined.get(deployed.group(1)) != "worker" and int(deployed.group(2)) >= int(term)
    # the ranges placed cover the model's 6 layers (once, but for a known race: a deploy
    # asked again across its stream breaking can place one extra copy, released later; see
    # the session 8 note, issue 15/16's open points)
    ranges = sorted(
        {(int(a), int(b)) for a, b in re.findall(r"node\d\[(\d+),(\d+)\)", deployed.group(3))}
    )
    assert ranges[0][0] == 0 and ranges[-1][1] == 6, ranges
    assert all(x[1] == y[0] for x, y in zip(ranges, ranges[1:], strict=False)), ranges
    assert "identical to the single-process run" in out
    assert "every balance is exactly right" in out
    assert "WRONG" not in out
    # then one streamed chat through node0's endpoint, with a non-empty reply, and how to
    # point the openai client and curl at it
    url = serving[0][1]
    assert f"POST {url}/chat/completions (stream) to 'tiny'" in out
    reply = re.search(r"^reply \(streamed\): (.+)\nstreamed (\d+) tokens in ", out, re.M)
    assert reply is not None and reply.group(1).strip() and int(reply.group(2)) > 0, out
    assert f'client = OpenAI(base_url="{url}", api_key=' in out
    assert f"curl -N {url}/chat/completions " in out
