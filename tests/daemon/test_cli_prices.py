"""Prices in the CLI: the tables show each provider's price per unit (`gridmesh nodes`,
`gridmesh blocks`), and `deploy` and `generate` pass a maximum on to the daemon."""

from __future__ import annotations

import io

import pytest
from rich.console import Console
from typer.testing import CliRunner

from daemon.cli import render, shards
from daemon.cli.main import app

PEER = "12D3KooWQQk2YcdHSkqWYZWhefsfH7ci8PACnWaNTJFtmssExvqk"
OLDER = "12D3KooWAaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"


@pytest.fixture
def screen(monkeypatch) -> io.StringIO:
    out = io.StringIO()
    monkeypatch.setattr(render, "console", Console(file=out, width=200))
    return out


def _row(text: str, peer: str) -> str:
    return next(line for line in text.splitlines() if render.short_id(peer) in line)


def test_nodes_show_each_price_and_a_dash_for_none(screen):
    record = {"peer_id": PEER, "resources": {"cpu": {"cores": 4}}, "addrs": ["/ip4/1.2.3.4"]}
    older = {**record, "peer_id": OLDER}  # a record without a price (an older node)
    render.nodes([{**record, "price_per_unit": 1234}, older])
    text = screen.getvalue()
    assert "price/unit" in text
    assert "1234" in _row(text, PEER)
    assert " - " in _row(text, OLDER)


def test_announced_servers_show_their_price(screen):
    server = {"peer_id": PEER, "start": 0, "end": 4, "ms_per_layer": 1.5}
    older = {**server, "peer_id": OLDER, "price_per_unit": None}
    render.blocks({"local": [], "announced": {"m": [{**server, "price_per_unit": 7}, older]}})
    text = screen.getvalue()
    assert "price/unit" in text
    assert _row(text, PEER).rstrip(" │").endswith("7")
    assert _row(text, OLDER).rstrip(" │").endswith("-")


@pytest.mark.parametrize(("value", "shown"), [(0, "0"), (5, "5"), (None, "-"), (True, "-")])
def test_price_text(value, shown):
    assert render.price(value) == shown


def test_deploy_and_generate_pass_a_maximum_price_on(tmp_path, monkeypatch):
    calls: list[tuple[str, dict]] = []

    def answer(home, method, params, *rest):
        calls.append((method, dict(params)))
        if method == "shard_plan":
            return {"assignments": [{"peer_id": PEER, "start": 0, "end": 2}]}
        if method == "generate":
            return {"job": "j"}
        state = {"text": "", "done": True, "error": None, "route": [], "n_tokens": 0}
        return {**state, "seconds": 0}

    monkeypatch.setattr(shards, "call", answer)
    monkeypatch.setattr(shards, "long_call", answer)
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "config.json").write_text("{}")
    home = ["--home", str(tmp_path / "h")]
    runner = CliRunner()
    plan = ["deploy", str(model_dir), "--model", "m", "--dry-run", *home]
    assert runner.invoke(app, [*plan, "--max-price-per-unit", "12"]).exit_code == 0
    assert runner.invoke(app, plan).exit_code == 0
    generate = ["generate", "hi", "--model", "m", *home]
    assert runner.invoke(app, [*generate, "--max-price-per-unit", "0"]).exit_code == 0
    assert runner.invoke(app, generate).exit_code == 0
    sent = [(method, params.get("max_price_per_unit")) for method, params in calls]
    assert sent == [
        ("shard_plan", 12),
        ("shard_plan", None),  # not sent: the daemon's [market] max_price_per_unit applies
        ("generate", 0),
        ("generate_poll", None),
        ("generate", None),
        ("generate_poll", None),
    ]
    assert "max_price_per_unit" not in calls[1][1] and "max_price_per_unit" not in calls[4][1]
    refused = runner.invoke(app, [*generate, "--max-price-per-unit", "-1"])
    assert refused.exit_code != 0 and len(calls) == 6


def test_generate_runs_as_a_paid_job_with_job(tmp_path, monkeypatch):
    calls: list[tuple[str, dict]] = []
    job_id = "0x" + "ab" * 32

    def answer(home, method, params, *rest):
        calls.append((method, dict(params)))
        if method == "generate":
            return {"job": "j"}
        state = {"text": "x", "done": True, "error": None, "route": [], "n_tokens": 1}
        payment = {"job_id": job_id, "acknowledged": 4000, "receipts_refused": []}
        return {**state, "seconds": 0, "payment": payment}

    monkeypatch.setattr(shards, "call", answer)
    home = ["--home", str(tmp_path / "h")]
    result = CliRunner().invoke(app, ["generate", "hi", "--model", "m", "--job", job_id, *home])
    assert result.exit_code == 0, result.output
    assert calls[0][0] == "generate" and calls[0][1]["job_id"] == job_id
    assert f"paid job {job_id}: 4000 acknowledged" in result.output
