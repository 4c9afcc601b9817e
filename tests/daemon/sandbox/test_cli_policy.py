"""`gridmesh policy test|hash|layers`: a policy run locally through the sandbox, its result
printed as JSON, and clear errors."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from daemon.cli.policy import policy_app
from daemon.sandbox import load_package
from tests.daemon.sandbox.policies import make_policy

runner = CliRunner()

SUM = "return {'sum': sum(input_data['load']), 'k': parameters['k'], 'ctx': context}"


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(policy_app, list(args))
    return result.exit_code, result.stdout, result.stderr


def test_policy_test_prints_the_result_as_json(tmp_path: Path) -> None:
    folder = make_policy(tmp_path / "sum", SUM, name="sum")
    (tmp_path / "in.json").write_text(json.dumps({"load": [3, 4, 5]}))
    code, out, err = invoke(
        "test",
        str(folder),
        "--input",
        str(tmp_path / "in.json"),
        "--parameters",
        '{"k": 2}',
        "--context",
        '{"session": "s1"}',
        "--home",
        str(tmp_path / "home"),
    )
    assert code == 0, err
    assert json.loads(out) == {"sum": 12, "k": 2, "ctx": {"session": "s1"}}
    digest = load_package(folder).digest
    code, out, _ = invoke("hash", str(folder))
    assert code == 0 and out.strip() == digest
    code, out, err = invoke(
        "test",
        str(folder),
        "--input",
        str(tmp_path / "in.json"),
        "--method",
        "management",
        "--action",
        "reset",
        "--digest",
        digest,
        "--home",
        str(tmp_path / "home"),
    )
    assert code == 0, err
    assert json.loads(out) == {"action": "reset", "data": {"load": [3, 4, 5]}, "count": 1}


def test_policy_test_errors_are_clear(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    folder = make_policy(tmp_path / "p", "raise ValueError('bad input: ' + repr(input_data))")
    (tmp_path / "in.json").write_text("[1]")
    (tmp_path / "bad.json").write_text("{nope")
    code, _, err = invoke("test", str(folder), "--input", str(tmp_path / "in.json"), "--home", home)
    assert (
        code == 1
        and "policy_error: policy test-policy eval raised ValueError: bad input: [1]" in err
    )
    code, _, err = invoke(
        "test", str(folder), "--input", str(tmp_path / "bad.json"), "--home", home
    )
    assert code == 1 and "is not valid JSON" in err
    code, _, err = invoke(
        "test", str(folder), "--input", str(tmp_path / "none.json"), "--home", home
    )
    assert code == 1 and "cannot read input" in err
    code, _, err = invoke(
        "test",
        str(folder),
        "--input",
        str(tmp_path / "in.json"),
        "--digest",
        "sha256:00",
        "--home",
        home,
    )
    assert code == 1 and "changed: its content hash is sha256:" in err
    code, _, err = invoke("test", str(tmp_path / "missing"), "--input", str(tmp_path / "in.json"))
    assert code == 1 and "does not exist" in err
    spin = make_policy(tmp_path / "spin", "while True:\n    pass", name="spin")
    code, _, err = invoke(
        "test", str(spin), "--input", str(tmp_path / "in.json"), "--timeout", "0.3", "--home", home
    )
    assert code == 1 and "timeout: policy spin ran past its deadline of 0.3 s" in err
    needs = make_policy(tmp_path / "needs", name="needs", requirements=("numpy",))
    code, _, err = invoke("test", str(needs), "--input", str(tmp_path / "in.json"), "--home", home)
    assert code == 1 and "requires numpy, not on this node's allow-list" in err


def test_policy_layers_and_main_registration(tmp_path: Path) -> None:
    code, out, err = invoke("layers", "--home", str(tmp_path / "home"))
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()]
    assert names == ["rlimits", "namespaces", "capabilities", "landlock", "seccomp"]
    from daemon.cli.main import app

    result = runner.invoke(app, ["policy", "--help"])
    assert result.exit_code == 0 and "test" in result.stdout and "hash" in result.stdout
