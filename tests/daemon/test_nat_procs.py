"""Reachability across NAT with real daemon processes in network namespaces (tests/daemon/
natlab.py: iproute2 + iptables, root; skipped with the reason printed where not).

A public daemon serves circuit relay; two daemons, each behind its own masquerading NAT,
bootstrap to it. AutoNAT makes the public one `public` and the two `private`; each private
one reserves a slot on the relay and advertises the relayed address in its DHT record. They
find each other's records through the DHT, connect through the relay (the hello
request/response crosses it), and DCUtR then tries to upgrade the connection to a direct one.
Where the NATs pick a random port per flow (symmetric) it cannot, and the test asserts the
connection stays relayed. Where they keep ports (cone) it often does, but py-libp2p's DCUtR
misses there in some runs on a loaded machine: the test prints which happened (with DCUtR's
log lines when it missed) rather than failing. Either way a registry write on one reaches
the other, and a generation asked of one runs on a tiny model served by the other (shard
streams across the NATs: abstract Unix sockets are per network namespace, so the same-host
shortcut cannot be taken).
"""

from __future__ import annotations

import time

import pytest

from daemon.devnet import wait_for
from tests.daemon import natlab
from tests.daemon.netns import NetnsDaemon
from tests.daemon.shard_procs import LAYERS, NEW_TOKENS, PROMPT, reference_tokens, tiny_model

pytestmark = pytest.mark.procs

PUBLIC_ENV = {
    "GRIDMESH_RELAY__SERVE": "true",
    "GRIDMESH_RELAY__CONFIRMATIONS": "1",
    "GRIDMESH_RELAY__CHECK_S": "1",
}
PRIVATE_ENV = {"GRIDMESH_RELAY__CONFIRMATIONS": "1", "GRIDMESH_RELAY__CHECK_S": "1"}
DIRECT_WAIT_S = 40.0  # a failed first punch is tried again 30 s later (p2p.reach)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model(tmp_path_factory)


@pytest.fixture(scope="module")
def expected(model_dir):
    return reference_tokens(model_dir)


@pytest.fixture(params=["cone", "symmetric"])
def lab(request):
    why = natlab.unavailable()
    if why is not None:
        print(f"skipped: {why}")
        pytest.skip(why)
    with natlab.NatLab(symmetric=request.param == "symmetric") as made:
        yield made


def kind_of(daemon: NetnsDaemon, peer_id: str) -> str | None:
    """`direct`/`relayed` for a connected peer, per `node_peers`; None if not connected."""
    row = next((p for p in daemon.call("node_peers") if p["peer_id"] == peer_id), None)
    return row["connection"] if row and row["connected"] else None


def test_private_nodes_meet_through_the_relay_and_punch_through_where_the_nat_allows(
    tmp_path, fast_config, lab, model_dir, expected
):
    daemons: list[NetnsDaemon] = []
    try:
        public = NetnsDaemon(
            tmp_path / "pub", lab.pub, natlab.PUBLIC_ADDR, config=fast_config, env=PUBLIC_ENV
        )
        daemons.append(public.start())
        for index, netns in enumerate(lab.privs):
            daemon = NetnsDaemon(
                tmp_path / f"priv{index}",
                netns,
                lab.private_addr(index),
                config=fast_config,
                bootstrap=[public.addr],
                env=PRIVATE_ENV,
            )
            daemons.append(daemon.start())
        a, b = daemons[1:]

        def reach(daemon: NetnsDaemon) -> str:
            return daemon.call("node_info")["reachability"]

        wait_for(lambda: reach(public) == "public", 30, "the public node to be public")
        for daemon in (a, b):
            wait_for(lambda d=daemon: reach(d) == "private", 30, "a NATed node to be private")
            info = wait_for(
                lambda d=daemon: (i := d.call("node_info"))["relayed_addrs"] and i,
                30,
                "a relay slot",
            )
            assert info["relays"] == [public.peer_id]
            nat = lab.nat_addr(daemons.index(daemon) - 1)
            assert any(x.startswith(f"/ip4/{nat}/") for x in info["observed_addrs"]), info

        # each finds the other's record through the DHT; its only dialable address is relayed
        def record_of(finder: NetnsDaemon, peer_id: str) -> dict | None:
            found = finder.call("nodes_find", {})
            return next((r for r in found if r["peer_id"] == peer_id), None)

        def relayed_record_of(finder: NetnsDaemon, peer_id: str) -> dict | None:
            """Its record once it advertises its relay slot: a walk may meet it, and list
            a record it published before it had one, earlier (refreshed within the
            record's validity)."""
            record = record_of(finder, peer_id)
            return record if record and any("/p2p-circuit/" in x for x in record["addrs"]) else None

        started = time.monotonic()
        record = wait_for(lambda: relayed_record_of(b, a.peer_id), 30, "b to find a's record")
        wait_for(lambda: relayed_record_of(a, b.peer_id), 30, "a to find b's record")
        circuit = [x for x in record["addrs"] if "/p2p-circuit/" in x]
        assert circuit and all(x.startswith(public.addr) for x in circuit), record["addrs"]
        # finding a meant reaching it (its hello): through the relay, the only way there
        wait_for(lambda: kind_of(b, a.peer_id), 30, "b to be connected to a")
        found_s = time.monotonic() - started
        dials = a.call("node_info")["circuit_dials"] + b.call("node_info")["circuit_dials"]
        assert dials >= 1
        # (not dialled again here by node_connect: a second circuit to a peer already
        # connected fails py-libp2p's security upgrade now and then; tests/p2p/test_reach.py
        # dials relayed addresses of peers not yet connected)

        deadline = time.monotonic() + DIRECT_WAIT_S
        while time.monotonic() < deadline and kind_of(b, a.peer_id) != "direct":
            time.sleep(0.5)
        kind = kind_of(b, a.peer_id)
        nat_type = "symmetric" if lab.symmetric else "port-preserving (cone)"
        print(f"{nat_type} NATs: found and connected through the relay {found_s:.2f} s after start")
        if kind == "direct":
            print(f"upgraded to direct by DCUtR within {time.monotonic() - started:.2f} s")
        elif lab.symmetric:
            print(
                f"still {kind} after {DIRECT_WAIT_S:.0f} s, as expected: DCUtR dials the address "
                "the relay saw with the peer's listen port; a symmetric NAT maps each new flow to "
                "a random port, so that prediction misses and the SYNs are dropped"
            )
        else:  # reported, not failed: py-libp2p's DCUtR misses here now and then (see README)
            lines = [
                line
                for d in (a, b)
                for line in d.log_tail(400).splitlines()
                if "dcutr" in line.lower() or "hole" in line.lower()
            ]
            print(
                f"NOT upgraded: still {kind} after {DIRECT_WAIT_S:.0f} s through port-preserving "
                "NATs; DCUtR's log lines:\n" + "\n".join(lines[-20:])
            )
        if lab.symmetric:
            assert kind == "relayed", "a symmetric NAT cannot be punched through by prediction"
        assert kind in ("direct", "relayed"), kind  # connected either way

        # either way: a registry write on a reaches b over the connection they have
        value = {"name": "natlab", "admins": [a.peer_id]}
        a.call("registry_put", {"kind": "clusters", "key": "natlab", "value": value})

        def b_has_it() -> bool:
            try:
                got = b.call("registry_get", {"kind": "clusters", "key": "natlab"})
            except Exception:
                return False
            return (got.get("value") or {}).get("name") == "natlab"

        wait_for(b_has_it, 30, "a's registry write to reach b")

        # and a generation: b asks, a serves every layer
        plan = [{"peer_id": a.peer_id, "start": 0, "end": LAYERS}]
        result = a.call(
            "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
        )
        assert all(r["ok"] for r in result["results"]), result
        wait_for(
            lambda: b.call("block_list", {"model": "tiny"})["announced"].get("tiny"),
            30,
            "b to see a's shard",
        )
        started = time.monotonic()
        result = b.call(
            "generate", {"model": "tiny", "token_ids": PROMPT, "max_tokens": NEW_TOKENS}, 120
        )
        assert result["error"] is None, result
        assert result["tokens"] == expected
        assert [h["peer_id"] for h in result["route"]] == [a.peer_id]
        print(
            f"generation of {NEW_TOKENS} tokens asked of b, served by a over a "
            f"{kind_of(b, a.peer_id)} connection: {time.monotonic() - started:.2f} s"
        )
    finally:
        for daemon in daemons:
            daemon.stop()
