"""`gridmesh vdag ...`: what each command sends, how it shows a plan (one compiled by the real
code from real registry entries), --json, and refusals as the daemon words them."""

from __future__ import annotations

import json
from typing import Any

import pytest
from typer.testing import CliRunner

from daemon.cli.main import app
from daemon.vdag_methods import Blocks, plan_json
from p2p.identity import NodeIdentity
from registry.blocks import announcement_key
from registry.entry import Entry, sign_entry
from registry.hlc import Timestamp
from registry.sync import Entries
from scheduler.vdag import Catalog, compile_plan, parse
from tests.daemon.test_cli_cluster import FakeDaemon

runner = CliRunner()
SERVER = NodeIdentity.generate()
SERVED = announcement_key("llama", 0, 4, SERVER.peer_id)
SUB = {
    "vdagName": "q",
    "vdagVersion": "1",
    "nodes": [
        {"nodeLabel": "x", "nodeType": "block", "manualBlockId": "detect"},
        {"nodeLabel": "y", "nodeType": "block", "manualBlockId": "llama"},
    ],
    "graph": {"input": ["x"], "output": ["y"], "connections": [{"from": "x", "to": "y"}]},
}
TOP = {
    "vdagName": "p",
    "vdagVersion": {"version": "1.0", "release-tag": "stable"},
    "nodes": [
        {
            "nodeLabel": "pre",
            "nodeType": "block",
            "assignmentPolicyRule": {"policyRuleURI": "least-loaded:1"},
            "preprocessingPolicyRule": {"policyRuleURI": "crop:2"},
        },
        {"nodeLabel": "s", "nodeType": "vdag", "vdagURI": "q"},
    ],
    "graph": {"input": ["pre"], "output": ["s"], "connections": [{"from": "pre", "to": "s"}]},
}


class _Replica:
    def __init__(self, entries: list[Entry]) -> None:
        self.entries = Entries(entries)


def entry(kind: str, key: str, value: dict[str, Any]) -> Entry:
    ts = Timestamp(1_800_000_000_000, 0)
    return sign_entry(
        SERVER, kind=kind, key=key, value=value, ts=ts, created=ts, owner=SERVER.peer_id
    )


def real_plan() -> dict[str, Any]:
    replica = _Replica(
        [
            entry("blocks", "detect", {"blockId": "detect", "blockComponentURI": "d:1"}),
            entry(
                "blocks",
                SERVED,
                {
                    "blockId": SERVED,
                    "blockComponentURI": "llama",
                    "model": "llama",
                    "layers": [0, 4],
                    "served_by": [SERVER.peer_id],
                    "parameters": {"ms_per_layer": 1.0},
                },
            ),
        ]
    )
    blocks = Blocks(replica.entries.values())
    plan = compile_plan(parse(TOP), Catalog.of([parse(SUB)]).versions, blocks.known)
    return plan_json(replica, plan)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def wide_console(monkeypatch):
    from rich.console import Console

    from daemon.cli import render

    monkeypatch.setattr(render, "console", Console(width=220))


@pytest.fixture
def fake(tmp_path):
    daemon = FakeDaemon(tmp_path)
    yield daemon
    daemon.close()


def run(fake: FakeDaemon, *args: str) -> Any:
    result = runner.invoke(app, ["vdag", *args, "--home", str(fake.home)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result


def test_plan_prints_the_compiled_graph_with_the_serving_blocks(fake):
    fake.results = {"vdag_plan": real_plan()}
    result = run(fake, "plan", "p")
    assert result.exit_code == 0, result.output
    assert fake.calls == [("vdag_plan", {"name": "p"})]
    lines = result.output.splitlines()
    assert "vDAG p:1.0-stable: 3 steps, nests q:1" in result.output
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in lines if "│" in line]
    row = {c[1].split()[0]: " | ".join(c) for c in cells}
    assert [c[0] for c in cells] == ["0", "1", "2"]  # the levels
    assert set(row) == {"pre", "s/x", "s/y"}
    assert "(input)" in row["pre"] and "assign=least-loaded:1 pre=crop:2" in row["pre"]
    assert "assignment policy" in row["pre"]  # no manualBlockId: the policy picks
    assert "detect" in row["s/x"] and "none now" in row["s/x"] and "pre" in row["s/x"]
    short = f"{SERVER.peer_id[:10]}…{SERVER.peer_id[-6:]} [0-4)"
    assert "s/y -> (output)" in row["s/y"] and "llama" in row["s/y"] and short in row["s/y"]


def test_plan_json_and_version(fake):
    fake.results = {"vdag_plan": real_plan()}
    result = run(fake, "plan", "p", "--version", "1.0", "--json")
    assert fake.calls == [("vdag_plan", {"name": "p", "version": "1.0"})]
    plan = json.loads(result.output)
    assert plan["levels"] == [["pre"], ["s/x"], ["s/y"]]
    assert plan["steps"][2]["servers"] == [
        {"peer_id": SERVER.peer_id, "model": "llama", "layers": [0, 4], "block": SERVED}
    ]


def test_a_refusal_is_shown_as_the_daemon_words_it(fake):
    message = "vDAG refused: nodes[1] 'b': unknown block 'nope'"
    fake.results = {"vdag_plan": {"error": {"code": -32004, "message": "no vDAG p"}}}
    result = run(fake, "plan", "p")
    assert result.exit_code == 1 and "vdag_plan failed (-32004): no vDAG p" in result.output
    fake.results = {"vdag_check": {"error": {"code": -32602, "message": message}}}
    spec = fake.home / "p.yaml"
    spec.write_text(json.dumps({"kind": "vdags", "value": TOP}))
    result = run(fake, "check", str(spec))
    assert result.exit_code == 1 and message in result.output


def test_check_and_apply_send_each_document(fake):
    spec = fake.home / "specs.yaml"
    spec.write_text(
        "kind: vdags\nvalue: " + json.dumps(SUB) + "\n---\n"
        "kind: vdags\nkey: p-stable\nvalue: " + json.dumps(TOP) + "\n"
    )
    fake.results = {
        "vdag_check": real_plan(),
        "vdag_apply": {"kind": "vdags", "key": "q:1", "version": "1800000000000.0"},
    }
    result = run(fake, "check", str(spec), "--json")
    assert result.exit_code == 0, result.output
    assert [c[0] for c in fake.calls] == ["vdag_check", "vdag_check"]
    assert len(json.loads(result.output)) == 2
    fake.calls.clear()
    result = run(fake, "apply", str(spec))
    assert fake.calls == [
        ("vdag_apply", {"value": SUB}),  # keyed name:version by the daemon
        ("vdag_apply", {"value": TOP, "key": "p-stable"}),
    ]
    assert "vdags/q:1 applied (version 1800000000000)" in result.output
    other = fake.home / "block.yaml"
    other.write_text(json.dumps({"kind": "blocks", "key": "b", "value": {}}))
    result = run(fake, "apply", str(other))
    assert result.exit_code == 1 and "blocks/b is not a vDAG" in result.output


def test_infer_sends_the_input_and_prints_the_output(fake):
    answer = {"vdag": "p:1.0", "output": {"text": "HELLO"}, "steps": [{"label": "up"}]}
    fake.results = {"vdag_infer": answer}
    result = run(fake, "infer", "p", "--input", '{"text": "hello"}', "--deadline", "5")
    assert result.exit_code == 0, result.output
    assert fake.calls == [
        ("vdag_infer", {"name": "p", "input": {"text": "hello"}, "deadline_s": 5.0})
    ]
    assert json.loads(result.output) == {"text": "HELLO"}
    given = fake.home / "in.json"
    given.write_text("[1, 2, 3]")
    fake.calls.clear()
    result = run(fake, "infer", "p:1.0", "--input", f"@{given}", "--json", "--session", "s1")
    assert fake.calls == [("vdag_infer", {"name": "p:1.0", "input": [1, 2, 3], "session": "s1"})]
    assert json.loads(result.output) == answer


def test_infer_refuses_bad_input_and_shows_the_daemons_error(fake):
    result = run(fake, "infer", "p", "--input", "{nope")
    assert result.exit_code == 1 and "--input is not JSON" in result.output and not fake.calls
    result = run(fake, "infer", "p", "--input", "@/nonexistent/in.json")
    assert result.exit_code == 1 and "cannot read the input file" in result.output
    message = "step 'up' failed on every instance"
    fake.results = {"vdag_infer": {"error": {"code": -32030, "message": message}}}
    result = run(fake, "infer", "p", "--input", "{}")
    assert result.exit_code == 1 and message in result.output
