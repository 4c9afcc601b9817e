"""The dashboard in a real headless Chromium, on a devnet of 3 daemon processes serving the
tiny model: refused without the login, then opened with `gridmesh dashboard`'s one-time link;
each view loads without console errors, shows the 3 nodes and the model's layer map, the
tokens per second rise live during a generation without a reload, and the generation's row
(with its failovers) and its live route (which server serves which layers) appear on the jobs
and models views, pushed by the feed; keyboard navigation works
and axe-core finds no violation. Screenshots of each view go to $GRIDMESH_DASHBOARD_SCREENSHOTS
(default: the test's tmp dir)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.daemon.dashboard.browser import (
    AXE_MISSING,
    axe_source,
    console_errors,
    run_axe,
    start_chromium,
)

pytest.importorskip("torch")
pytest.importorskip("selenium", reason="browser tests need selenium: pip install selenium")

pytestmark = pytest.mark.procs

LAYERS = 6
VIEWS = ["node", "network", "models", "jobs", "money", "registry"]
CLUSTER = "lab"
# what a GPU's row reads (daemon.resources.GpuInfo): the test machine has none, so the node
# view's renderer is also given this one in the page (test_dashboard_views: the daemon sends it)
GPU = {
    "index": 0,
    "name": "Fake H100",
    "memory_total_bytes": 80 << 30,
    "memory_free_bytes": 60 << 30,
    "utilization_pct": 37,
    "power_w": 212.5,
}
REROUTED = [  # the second server's range taken over by a third
    {"peer": "12D3KooW" + "a" * 44, "start": 0, "end": 2},
    {"peer": "12D3KooW" + "c" * 44, "start": 2, "end": 6},
]
FAILED = "12D3KooW…bbbbbb (from layer 2): connection reset"
FAILED_OVER = {  # a generation_list row after one failover (daemon.shards.recent)
    "job": "f" * 32,
    "model": "tiny",
    "state": "done",
    "tokens": 12,
    "tokens_per_s": 30.5,
    "ttft_s": 0.25,
    "route": REROUTED,
    "failovers": 1,
    "failed": [{"peer": "12D3KooW" + "b" * 44, "reason": "connection reset", "from_layer": 2}],
    "error": None,
}
PAID = {  # the money view's parts as a provider with a chain gets them (test_dashboard_money)
    "wallet": {"address": "0xab", "balance": 1234, "gas_balance": 1, "stake": {"stake": 500}},
    "earnings": {
        "jobs": [
            {
                "job_id": "0x" + "11" * 32,
                "provider": "0xab",
                "receipts": 3,
                "signed": 90,
                "acknowledged": 90,
                "nonce": 7,
                "settled": 60,
                "pending": 30,
            }
        ],
        "history": [  # the payment store's (earnings_history): signed = acknowledged
            {"at": at, "signed": acked, "acknowledged": acked, "settled": paid}
            | {"pending": acked - paid}
            for at, acked, paid in [(1000.0, 0, 0), (1030.0, 20, 20), (1120.0, 90, 60)]
        ],
    },
    "jobs": [],
    "history": [  # the daemon's samples; the stake, 500, tops the wallet plot
        {"at": at, "balance": balance, "stake": 500}
        for at, balance in [(1000.0, 100), (1030.0, 120), (1120.0, 160)]
    ],
}


def short(peer_or_job: str) -> str:
    """An id as the page shows it (app.js `short`)."""
    return peer_or_job[:8] + "…" + peer_or_job[-6:]


def shots_dir(tmp_path: Path) -> Path:
    path = Path(os.environ.get("GRIDMESH_DASHBOARD_SCREENSHOTS") or tmp_path / "screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_the_dashboard_in_chromium_on_three_daemons(tmp_path):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from daemon.devnet import Devnet, wait_for
    from daemon.shards.model import make_tiny

    axe = axe_source()
    shots = shots_dir(tmp_path)
    model_dir = make_tiny(tmp_path / "tiny", layers=LAYERS, seed=7, max_positions=4096)
    driver = start_chromium(tmp_path / "profile")
    try:
        with Devnet(3, root=tmp_path / "net") as net:
            net.wait_all_found()
            node0 = net.daemons[0]
            # a cluster of one: its election runs while the test does the rest (network view)
            node0.call("cluster_create", {"name": CLUSTER, "admission": "open"})
            plan = [
                {"peer_id": d.peer_id, "start": 2 * i, "end": 2 * i + 2}
                for i, d in enumerate(net.daemons)
            ]
            deployed = node0.call(
                "block_deploy", {"model": "tiny", "model_dir": str(model_dir), "plan": plan}
            )
            assert deployed["ok"], [r.get("error") for r in deployed.get("results", [])]
            wait_for(
                lambda: len(node0.call("block_list", {"model": "tiny"})["announced"]["tiny"]) == 3,
                20,
                "every range announced",
            )
            base = node0.info["rpc_url"].rstrip("/")
            # a view redrawn by a live event replaces its elements under the test's feet
            wait = WebDriverWait(
                driver, 30, ignored_exceptions=(StaleElementReferenceException, ValueError)
            )

            # without the login: the page says how to log in, and the data is refused
            driver.get(base + "/dashboard/")
            assert driver.find_element(By.ID, "login-required").is_displayed()
            status = driver.execute_script(
                "return fetch('/dashboard/api/node').then((r) => r.status)"
            )
            assert status == 401
            driver.save_screenshot(str(shots / "0-login-required.png"))
            if axe is not None:  # the login page is labelled too
                assert run_axe(driver, axe) == [], "login page"
            console_errors(driver)  # the refused loads above are logged as errors: expected

            # `gridmesh dashboard` prints the one-time link
            printed = subprocess.run(
                [sys.executable, "-m", "daemon.cli.main", "dashboard", "--home", str(node0.home)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout.strip()
            assert printed.startswith(base + "/dashboard/login?code="), printed
            driver.get(printed)
            wait.until(lambda d: node0.peer_id in d.find_element(By.ID, "view-body").text)
            # node_info's reachability (p2p.reach: AutoNAT), shown as the daemon says it
            info = node0.call("node_info")
            shown = driver.find_element(By.ID, "view-body").text
            assert f"reachable from outside {info['reachability']}" in shown
            assert f"version {info['version']}" in shown
            # a GPU's utilisation and memory, as the GPUs table shows them
            gpus = driver.execute_script(
                "return RENDER.node({info: {resources: {gpus: [arguments[0]]}}})"
                ".find((part) => part.id === 'gpus').textContent",
                GPU,
            )
            assert "Fake H100" in gpus and "37 %" in gpus and "60.0 GiB of 80.0 GiB" in gpus
            # and the money view's tables with a chain (this devnet has none; the numbers are
            # test_dashboard_money's): receipts, the voucher, settled, balance and stake
            money, settled, balance = driver.execute_script(
                "const kept = money.splice(0), mine = earned.splice(0),"
                " box = document.createElement('div');"
                "box.append(...RENDER.money(arguments[0]).flat());"
                "money.splice(0, money.length, ...kept);"  # the page's own points back
                "earned.splice(0, earned.length, ...mine);"
                "return [Array.from(box.querySelectorAll('table')).map((t) => t.textContent),"
                " box.querySelector('#earnings-plot polyline.settled').getAttribute('points'),"
                " box.querySelector('#wallet-plot polyline.balance').getAttribute('points')];",
                PAID,
            )
            wallet, stake, earned, _ = money
            # the earnings plot: the store's history placed by time (30 s, then 90 s on)
            assert settled == "0.0,78.0 75.0,61.1 300.0,27.3", settled
            assert balance == "0.0,62.8 75.0,59.8 300.0,53.7", balance  # stake: 500 on top
            # a generation that failed over (test_recent makes one on whole daemons): its row
            # counts it and says what failed; the route shown is the one after the failover
            failed_over = driver.execute_script(
                "const kept = lastGenerations, box = document.createElement('div');"
                "box.append(...RENDER.jobs({generations: [arguments[0]], per_model: [],"
                " paid_jobs: []}).flat(), ...RENDER.models({models: [], local: [],"
                " generations: [arguments[0]]}).flat());"
                "lastGenerations = kept;"  # the page's own, as the feed sent them
                "const cells = (id) => Array.from(box.querySelector(`#${id} tbody tr`).cells,"
                " (c) => c.textContent);"
                "return [cells('generations'), cells('routes')];",
                FAILED_OVER,
            )
            row, route = failed_over
            # generation, model, state, tokens, tokens per second, ttft, failovers, what failed
            assert row[2:8] == ["done", "12", "30.5", "250 ms", "1", FAILED], row
            hops = [f"{short(h['peer'])} layers {h['start']}–{h['end']}" for h in REROUTED]
            assert route[2:4] == ["done", "".join(hops)] and route[5] == "1", route
            assert "balance1234" in wallet and "stake500" in stake, money
            assert "voucher nonce" in earned and "7" in earned and "pending" in earned, money
            wait.until(lambda d: d.find_element(By.ID, "feed-state").text == "live")
            driver.execute_script("window.notReloaded = true")
            driver.find_element(By.ID, "run-doctor").click()  # reachability, on demand
            checks = (By.ID, "doctor-checks")
            WebDriverWait(driver, 130, ignored_exceptions=(NoSuchElementException,)).until(
                lambda d: "reachability" in d.find_element(*checks).text
            )
            driver.save_screenshot(str(shots / "node-doctor.png"))

            def open_view(view: str) -> None:
                driver.find_element(By.CSS_SELECTOR, f'nav a[data-view="{view}"]').click()
                wait.until(
                    lambda d: (
                        d.find_element(By.ID, "view").get_attribute("aria-busy") == "false"
                        and d.find_elements(By.CSS_SELECTOR, "#view-body > *")
                    )
                )

            open_view("network")
            rows = lambda d: d.find_elements(By.CSS_SELECTOR, "#nodes tbody tr")  # noqa: E731
            wait.until(lambda d: len(rows(d)) == 3)
            wait.until(lambda d: "Nodes found (3)" in d.find_element(By.ID, "nodes").text)
            wait.until(
                lambda d: len(d.find_elements(By.CSS_SELECTOR, "#peer-map circle.peer")) == 2
            )
            overlaps = driver.execute_script(  # the peers' labels can be read: none overlap
                "const boxes = Array.from(document.querySelectorAll('#peer-map text'),"
                " (t) => t.getBBox());"
                "return boxes.flatMap((a, i) => boxes.slice(i + 1).filter((b) =>"
                " a.x < b.x + b.width && b.x < a.x + a.width"
                " && a.y < b.y + b.height && b.y < a.y + a.height)).length;"
            )
            assert overlaps == 0

            open_view("models")
            layer_rows = "#layer-map-tiny tbody tr"
            ranges = wait.until(  # read in one go: a `models` event may redraw the table
                lambda d: (
                    [r.text for r in d.find_elements(By.CSS_SELECTOR, layer_rows)]
                    if len(d.find_elements(By.CSS_SELECTOR, layer_rows)) == 3
                    else None
                )
            )
            assert all(f"{2 * i}–{2 * i + 2}" in text for i, text in enumerate(ranges)), ranges

            # tokens per second rise during a generation, pushed by the feed (no reload)
            open_view("jobs")
            job = node0.call(
                "generate",
                {"model": "tiny", "token_ids": [1, 2, 3], "max_tokens": 3000, "stream": True},
            )["job"]
            try:
                wait.until(lambda d: float(d.find_element(By.ID, "live-steps").text) > 0)
                seen = driver.find_element(By.ID, "live-steps").text
                # the generation's row, pushed by the feed, with its failovers column
                tag = short(job)

                def generation_row(d, table: str) -> dict | None:
                    heads = [h.text for h in d.find_elements(By.CSS_SELECTOR, f"#{table} th")]
                    for row in d.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr"):
                        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
                        if cells and cells[0] == tag:
                            return dict(zip(heads, cells, strict=True))
                    return None

                row = wait.until(  # once its first token came back
                    lambda d: (
                        (r := generation_row(d, "generations"))
                        and r["time to first token"] != "–"
                        and r
                    )
                )
                assert row["failovers"] == "0" and row["model"] == "tiny", row
                assert re.fullmatch(r"\d+ ms", row["time to first token"]), row
                # the live strip's too (this generation is not the OpenAI endpoint's)
                ttft = (By.ID, "live-ttft")
                wait.until(lambda d: d.find_element(*ttft).text.endswith("(newest generation)"))
                driver.save_screenshot(str(shots / "jobs.png"))
                # its live route on the models view: which server serves which layers
                open_view("models")
                row = wait.until(lambda d: generation_row(d, "routes"))
                hops = [f"{short(p['peer_id'])} layers {p['start']}–{p['end']}" for p in plan]
                assert row["route (peer and layers, in order)"].split("\n") == hops, row
                driver.save_screenshot(str(shots / "models-route.png"))
            finally:
                node0.call("generate_cancel", {"job": job})
            assert driver.execute_script("return window.notReloaded === true"), "page reloaded"
            print(f"tokens per second seen live: {seen}")

            def elected() -> bool:
                asked = node0.call("cluster_coordinator", {"name": CLUSTER})
                return asked["coordinator"] is not None

            def network_shown(d) -> tuple[str, list[str]] | None:
                """The cluster row and the RTT cells, once a round trip is shown (a ping
                that failed under load shows "–" until the next: then load the view again)."""
                peers = d.find_elements(By.CSS_SELECTOR, "#peers tbody tr")
                rtts = [r.find_elements(By.TAG_NAME, "td")[2].text for r in peers]
                if not any(t.endswith(" ms") for t in rtts):
                    d.execute_script("load('network')")
                    return None
                return d.find_element(By.CSS_SELECTOR, "#clusters tbody tr").text, rtts

            for view in VIEWS:
                if view == "network":  # it shows clusters as they are when it loads
                    wait_for(elected, 30, "the cluster's election")
                open_view(view)
                if view == "network":  # the coordinator (node0, alone in it), its term, RTTs
                    cluster, rtts = wait.until(network_shown)  # read in one go (redraws)
                    name, leader, term, admission = cluster.split(" ")
                    assert (name, leader, admission) == (CLUSTER, short(node0.peer_id), "open")
                    assert int(term) >= 1, cluster
                    assert len(rtts) == 2, rtts
                    assert all(re.fullmatch(r"\d+\.\d ms|–", t) for t in rtts), rtts
                if view == "jobs":  # after the generation: this node's shard counted its steps
                    assert "tiny" in driver.find_element(By.ID, "per-model").text
                if view == "money":  # the feed's first `money` event is plotted
                    plot = (By.CSS_SELECTOR, "#earnings-plot figcaption")
                    wait.until(lambda d, p=plot: "(0 points" not in d.find_element(*p).text)
                    assert "no chain configured" in driver.find_element(*plot).text
                if view != "jobs":
                    driver.save_screenshot(str(shots / f"{view}.png"))
                if axe is not None:
                    violations = run_axe(driver, axe)
                    assert violations == [], (view, violations)

            # the registries with the filter syntax, and a bad filter's message
            driver.find_element(By.ID, "reg-filter").send_keys("key LIKE 'ti%'", Keys.ENTER)
            wait.until(lambda d: "Entries" in d.find_element(By.ID, "registry-entries").text)
            assert console_errors(driver) == []  # every view so far, live updates included
            driver.find_element(By.ID, "reg-filter").clear()
            driver.find_element(By.ID, "reg-filter").send_keys("key ==", Keys.ENTER)
            wait.until(lambda d: "bad filter" in d.find_element(By.ID, "reg-error").text)
            driver.save_screenshot(str(shots / "registry-bad-filter.png"))
            refused = console_errors(driver)  # Chromium logs the 400 itself, nothing else
            assert [e["source"] for e in refused] == ["network"], refused
            assert "registry?filter=key+%3D%3D" in refused[0]["message"], refused

            # keyboard only: Tab from the top reaches the skip link, then each view's link;
            # Enter opens it
            driver.get("about:blank")  # a fresh load, not a same-page jump to #node
            driver.get(base + "/dashboard/#node")
            wait.until(lambda d: d.find_element(By.ID, "feed-state").text == "live")
            # keys to the document as loaded (nothing clicked: Tab starts at the top)
            ActionChains(driver).send_keys(Keys.TAB).perform()
            focused = lambda: driver.switch_to.active_element  # noqa: E731
            assert focused().text == "Skip to content"
            labels = []
            for _ in VIEWS:
                focused().send_keys(Keys.TAB)
                labels.append(focused().text)
            assert labels == [
                "This node",
                "Network",
                "Models",
                "Sessions and jobs",
                "Money",
                "Registries",
            ]
            focused().send_keys(Keys.SHIFT, Keys.TAB)  # back to "Money"
            focused().send_keys(Keys.ENTER)
            wait.until(lambda d: d.find_element(By.ID, "view-title").text == "Money")
            # the skip link takes the focus past the navigation, to the view
            for _ in range(5):  # Money, Sessions and jobs, Models, Network, This node
                focused().send_keys(Keys.SHIFT, Keys.TAB)
            assert focused().text == "Skip to content"
            focused().send_keys(Keys.ENTER)
            assert focused().get_attribute("id") == "main"
            assert console_errors(driver) == []
            if axe is not None:  # the check itself: an unlabelled field is caught
                driver.execute_script(
                    "document.getElementById('main').append(document.createElement('input'))"
                )
                assert "label" in {v["id"] for v in run_axe(driver, axe)}
            # offline: everything the page loaded came from this daemon
            loaded = driver.execute_script(
                "return performance.getEntriesByType('resource').map((e) => e.name)"
            )
            assert loaded and all(url.startswith(base + "/dashboard/") for url in loaded), loaded
        written = sorted(p.name for p in shots.iterdir())
        print(f"screenshots in {shots}: {written}")
        for view in VIEWS:  # one of each view at least (jobs and models during the generation)
            assert f"{view}.png" in written, (view, written)
    finally:
        driver.quit()
    if axe is None:  # everything else was checked above
        pytest.skip(AXE_MISSING)
