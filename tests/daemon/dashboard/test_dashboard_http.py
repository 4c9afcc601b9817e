"""The dashboard over HTTP without a browser, on whole in-memory daemons (virtual clock):
the login link and its session cookie, every view's JSON, refused inputs, and the live
feed's bounds (a cap on feeds, a reader that stops reading is dropped)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio

from daemon.dashboard import auth
from tests.daemon.dashboard.http_client import events, feed, login, make_server, request
from tests.daemon.harness import inline_threads, memory_cluster

LAYERS = 6


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


async def test_login_views_and_refused_inputs(autojump_clock, tmp_path, nursery):
    from daemon.shards.model import make_tiny

    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7)
    async with memory_cluster(tmp_path, 3) as net:
        d0 = net.daemons[0]
        rejects: list[str] = []
        server = make_server(d0.daemon, rejects)

        # nothing without the login: the page says how to log in, the API answers 401
        page = await request(nursery, server, "/dashboard/")
        assert page.status == 401 and b"gridmesh dashboard" in page.body
        api = await request(nursery, server, "/dashboard/api/node")
        assert api.status == 401 and "gridmesh dashboard" in api.json()["error"]
        forged = f"{auth.COOKIE_NAME}={'a' * 43}"
        assert (await request(nursery, server, "/dashboard/api/node", cookie=forged)).status == 401
        assert (await request(nursery, server, "/dashboard/events")).status == 401
        bad_code = await request(nursery, server, "/dashboard/login?code=" + "b" * 43)
        assert bad_code.status == 403
        accented = await request(nursery, server, "/dashboard/login?code=" + "b" * 42 + "%C3%A9")
        assert accented.status == 403
        assert rejects.count("dashboard_unauthorized") == 4 and "dashboard_login" in rejects

        cookie = await login(d0, server, nursery)
        page = await request(nursery, server, "/dashboard/", cookie=cookie)
        assert page.status == 200 and b'src="/dashboard/static/app.js"' in page.body
        assert b"script-src 'self'" in page.headers[b"content-security-policy"]
        js = await request(nursery, server, "/dashboard/static/app.js", cookie=cookie)
        assert js.status == 200 and js.headers[b"content-type"].startswith(b"text/javascript")
        missing = await request(nursery, server, "/dashboard/static/../http.py", cookie=cookie)
        assert missing.status == 404

        node = (await request(nursery, server, "/dashboard/api/node", cookie=cookie)).json()
        assert node["info"]["peer_id"] == d0.peer_id
        assert node["peers_connected"] == 2 and node["advertised"]
        doctor = (await request(nursery, server, "/dashboard/api/doctor", cookie=cookie)).json()
        names = {c["name"] for c in doctor["checks"]}
        assert "reachability" in names, names
        assert {c["status"] for c in doctor["checks"]} <= {"pass", "fail", "warn"} and names

        await net.deploy(model_dir, net.daemons, [(0, 2), (2, 4), (4, 6)])
        network = (await request(nursery, server, "/dashboard/api/network", cookie=cookie)).json()
        assert {n["peer_id"] for n in network["nodes"]} == {d.peer_id for d in net.daemons}
        assert len(network["peers"]) == 2 and network["clusters"] == []

        async def models_with_load() -> dict | None:  # once the node records list the blocks
            reply = await request(nursery, server, "/dashboard/api/models", cookie=cookie)
            servers = reply.json()["models"][0]["servers"]
            return reply.json() if all(s["sessions"] is not None for s in servers) else None

        models = await net.wait_for(models_with_load, 10, "the node records to list blocks")
        (tiny,) = models["models"]
        assert tiny["model"] == "tiny" and tiny["layers"] == LAYERS and tiny["replicas"] == 1
        assert [(s["peer_id"], s["start"], s["end"]) for s in tiny["servers"]] == [
            (d.peer_id, 2 * i, 2 * i + 2) for i, d in enumerate(net.daemons)
        ]
        assert all(s["cache_tokens_free"] > 0 for s in tiny["servers"])
        assert all(s["sessions"] == 0 and s["max_sessions"] > 0 for s in tiny["servers"])
        await d0.call("generate", {"model": "tiny", "token_ids": [1, 2, 3], "max_tokens": 5})
        jobs = (await request(nursery, server, "/dashboard/api/jobs", cookie=cookie)).json()
        (row,) = jobs["per_model"]  # this node's shard computed the prompt and 4 more steps
        assert row["model"] == "tiny" and row["steps"] >= 5 and row["mean_batch"] >= 1
        assert jobs["paid_jobs"] == []  # none created here
        # the generation's route through the 3 servers, with its speed and no failover
        (gen,) = jobs["generations"]
        assert gen["state"] == "done" and gen["tokens"] == 5 and gen["failovers"] == 0
        assert gen["ttft_s"] is not None and "tokens_per_s" in gen  # None: 0 s on this clock
        assert [(h["peer"], h["start"], h["end"]) for h in gen["route"]] == [
            (d.peer_id, 2 * i, 2 * i + 2) for i, d in enumerate(net.daemons)
        ]
        models = (await request(nursery, server, "/dashboard/api/models", cookie=cookie)).json()
        assert models["generations"] == jobs["generations"]
        money = (await request(nursery, server, "/dashboard/api/money", cookie=cookie)).json()
        assert set(money) == {"wallet", "earnings", "jobs", "history"}  # no chain: parts say why
        assert "error" in money["wallet"]

        # the registries, browsed with the filter syntax; bad input refused with why
        await d0.call(
            "registry_put",
            {
                "kind": "components",
                "key": "alpha",
                "value": {"name": "a", "version": "1", "description": "big"},
            },
        )
        await d0.call(
            "registry_put",
            {
                "kind": "components",
                "key": "beta",
                "value": {"name": "b", "version": "1", "description": "small"},
            },
        )
        q = "/dashboard/api/registry?kind=components&filter=description+%3D%3D+%27big%27"
        reg = (await request(nursery, server, q, cookie=cookie)).json()
        assert [e["key"] for e in reg["items"]] == ["alpha"] and "components" in reg["kinds"]
        page1 = await request(nursery, server, "/dashboard/api/registry?limit=1", cookie=cookie)
        assert len(page1.json()["items"]) == 1 and page1.json()["next_cursor"]
        for target, why in [
            ("/dashboard/api/registry?filter=n+%3D%3D", "bad filter: expected a value"),
            ("/dashboard/api/registry?limit=0", "limit"),
            ("/dashboard/api/registry?limit=abc", "whole number"),
            ("/dashboard/api/registry?kind=No+Such", "kind"),
            ("/dashboard/api/registry?kind=a&kind=b", "given twice"),
            ("/dashboard/api/registry?sort=key", "unknown parameter 'sort'"),
            ("/dashboard/api/registry?filter=%FF", "malformed query string"),
            ("/dashboard/api/node?x=1", "unknown parameter 'x'"),
        ]:
            reply = await request(nursery, server, target, cookie=cookie)
            assert reply.status == 400 and why in reply.json()["error"], (target, reply.body)
        assert (await request(nursery, server, "/dashboard/api/nope", cookie=cookie)).status == 404
        posted = await request(
            nursery, server, "/dashboard/api/node", cookie=cookie, method=b"POST"
        )
        assert posted.status == 405
        with_body = await request(nursery, server, "/dashboard/", cookie=cookie, body=b"x")
        assert with_body.status == 413
        # a page elsewhere whose DNS name points at 127.0.0.1 (rebinding) is refused
        rebound = await request(
            nursery, server, "/dashboard/api/node", cookie=cookie, host=b"evil.example:8545"
        )
        assert rebound.status == 421 and "dashboard_host" in rejects
        assert d0.metric("gridmesh_rpc_requests_total", method="nodes_find") >= 2


async def test_live_feed_is_capped_and_drops_a_reader_that_stops(autojump_clock, tmp_path, nursery):
    async with memory_cluster(tmp_path, 2) as net:
        d0 = net.daemons[0]
        rejects: list[str] = []
        server = make_server(d0.daemon, rejects)
        dash = server._dashboard
        dash.max_feeds, dash.interval_s, dash.write_timeout_s = 2, 0.5, 3.0
        cookie = await login(d0, server, nursery)

        async def peers_counted() -> bool:  # the gauge is set every publish interval
            return d0.metric("gridmesh_peers", state="connected") == 1

        await net.wait_for(peers_counted, 5, "the peers gauge")
        client, conn, reply = await feed(nursery, server, cookie)
        assert reply.status == 200 and reply.headers[b"content-type"] == b"text/event-stream"
        await events(client, conn, reply, 5)
        names = [name for name, _ in reply.events]
        assert names == ["live", "models", "nodes", "money", "live"]
        money = reply.events[3][1]  # no chain here: totals 0 and why there is no balance
        assert money["jobs"] == 0 and money["settled"] == 0 and money["balance"] is None
        assert "no chain configured" in money["chain_error"]
        # the point is kept for the plot: a page opened (or reloaded) later starts with it
        view = (await request(nursery, server, "/dashboard/api/money", cookie=cookie)).json()
        assert view["history"] == [money] and money["at"] > 0
        live = reply.events[-1][1]
        assert live["peers_connected"] == 1 and live["steps_per_s"] == 0.0
        assert {n["peer_id"] for n in reply.events[2][1]} == {d.peer_id for d in net.daemons}
        # a generation starts: a tick pushes its live route (sent only when something changed)
        route = [{"peer_id": net.daemons[1].peer_id, "start": 0, "end": 2}]
        model = SimpleNamespace(route=route, recoveries=[], chained=True)
        d0.daemon.shards.generations.begin("g" * 32, "tiny", model, prompt_tokens=3, paid=False)
        before = len(reply.events)
        while reply.events[-1][0] != "generations":  # this tick's or the next one's
            await events(client, conn, reply, 1)
            assert len(reply.events) - before <= 3, reply.events[before:]
        (gen,) = reply.events[-1][1]
        assert gen["route"] == [{"peer": net.daemons[1].peer_id, "start": 0, "end": 2}]
        assert gen["state"] == "running" and gen["failovers"] == 0

        # a second feed that never reads after its head: dropped once a write blocks past
        # the deadline; the daemon holds at most the one event it was writing
        stuck, _, stuck_reply = await feed(nursery, server, cookie)
        assert stuck_reply.status == 200 and dash.feeds == 2
        third = await request(nursery, server, "/dashboard/events", cookie=cookie)
        assert third.status == 503 and "dashboard_feeds" in rejects
        await events(client, conn, reply, 2)  # the first feed keeps going meanwhile
        with trio.fail_after(dash.write_timeout_s + 2 * dash.interval_s):
            while dash.feeds > 1:
                await events(client, conn, reply, 1)
        assert "dashboard_slow_reader" in rejects
        assert len(dash.money_points) == 1  # the second feed reused the first one's point
        while sum(name == "money" for name, _ in reply.events) < 2:  # 30 intervals on
            await events(client, conn, reply, 1)
        view = (await request(nursery, server, "/dashboard/api/money", cookie=cookie)).json()
        assert len(view["history"]) == len(dash.money_points) == 2
        assert view["history"] == [e for name, e in reply.events if name == "money"]
        await client.aclose()  # a reader that leaves ends its feed too

        async def no_feeds() -> bool:
            return dash.feeds == 0

        await net.wait_for(no_feeds, 2 * dash.interval_s + 1, "the closed feed to end")
        again = await request(nursery, server, "/dashboard/events", cookie=cookie, method=b"HEAD")
        assert again.status == 200 and again.body == b""
        await net.wait_for(no_feeds, 1, "a HEAD feed to end after its head")
