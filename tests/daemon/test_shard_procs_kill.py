"""A SIGKILLed shard server with a replica, over the same-host socket and over libp2p: the
generation goes on with the single-process tokens. Apart from test_shard_procs.py so that
parallel test workers run it beside the other process tests."""

from __future__ import annotations

import pytest

from daemon.devnet import Devnet, wait_for

torch = pytest.importorskip("torch")

from tests.daemon.shard_procs import PROMPT, deploy, reference_tokens, tiny_model  # noqa: E402

pytestmark = pytest.mark.procs


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.mark.parametrize("local_sockets", [True, False], ids=["local", "libp2p"])
def test_sigkilled_server_with_a_replica_still_gives_the_same_tokens(
    tmp_path, fast_config, model_dir, local_sockets
):
    long = 100  # long enough that the kill lands mid-generation
    expected = reference_tokens(model_dir, long)
    config = tmp_path / "node.toml"
    text = fast_config.read_text()
    config.write_text(
        text.replace("[shards]", f"[shards]\nlocal_sockets = {str(local_sockets).lower()}")
    )
    with Devnet(4, root=tmp_path / "net", config=config) as net:
        net.wait_all_found(30)
        deploy(net, model_dir, [(0, 2), (2, 4), (2, 4), (4, 6)])
        client = net.daemons[0]
        job = client.call(
            "generate",
            {"model": "tiny", "token_ids": PROMPT, "max_tokens": long, "stream": True},
        )["job"]
        first = wait_for(lambda: client.call("generate_poll", {"job": job})["route"], 30, "route")
        middle = first[1]["peer_id"]
        victim = next(d for d in net.daemons if d.peer_id == middle)
        wait_for(
            lambda: client.call("generate_poll", {"job": job})["n_tokens"] >= 3, 30, "3 tokens"
        )
        victim.kill()
        state = wait_for(
            lambda: (s := client.call("generate_poll", {"job": job}))["done"] and s, 60, "the end"
        )
        assert state["error"] is None
        if not state["recoveries"]:
            pytest.fail(f"the kill came too late to test failover: {state['n_tokens']} tokens")
        assert state["tokens"] == expected
        assert [r["peer_id"] for r in state["recoveries"]] == [middle]
        assert middle not in [h["peer_id"] for h in state["route"]]
        assert all(r["seconds"] <= 5 for r in state["recoveries"]), state["recoveries"]
        if not local_sockets:
            streams = "gridmesh_shard_streams_total"
            assert client.metric(streams, transport="libp2p") >= 3
            assert client.metric(streams, transport="local") == 0
