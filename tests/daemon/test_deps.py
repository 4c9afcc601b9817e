"""The import check (`python -m daemon.tools.deps`): the repository passes it, and small
synthetic trees prove that it fails on each thing it must catch."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from daemon.tools import deps

REPO = Path(__file__).resolve().parents[2]


def make_tree(root: Path, files: dict[str, str]) -> Path:
    """Write `files` (relative path -> source) under `root`, with the packages' __init__s."""
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(source))
    for package in deps.PACKAGES:
        if (root / package).is_dir():
            for folder in [root / package, *(p for p in (root / package).rglob("*") if p.is_dir())]:
                (folder / "__init__.py").touch(exist_ok=True)
    return root


def kinds(report: deps.Report) -> list[tuple[str, str, str]]:
    return sorted(v.key for v in report.violations)


def test_the_repository_passes_with_its_allow_list():
    allow = deps.read_allow_list(deps.DEFAULT_ALLOW)
    report = deps.check(REPO, allow)
    assert report.errors == []
    assert report.violations == [], "\n".join(v.message for v in report.violations)
    # an offence that is gone leaves the list with it (so the list only shrinks)
    assert report.stale == [], f"remove from {deps.DEFAULT_ALLOW.name}: {report.stale}"
    assert report.modules > 50 and report.edges > 100  # it really looked at the tree


def test_the_command_runs_on_the_repository():
    done = subprocess.run(
        [sys.executable, "-m", "daemon.tools.deps", "--strict"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "deps ok:" in done.stdout


def test_a_module_level_circle_fails_naming_it(tmp_path, capsys):
    root = make_tree(
        tmp_path,
        {
            "daemon/a.py": "from daemon import b\n",
            "daemon/b.py": "import os\n\nimport daemon.c\n",
            "daemon/c.py": "from daemon.a import thing\n",
        },
    )
    assert deps.main(["--root", str(root), "--allow", str(tmp_path / "none.txt")]) == 1
    out = capsys.readouterr().out
    assert "import circle daemon.a -> daemon.b -> daemon.c -> daemon.a" in out
    assert "daemon/b.py:3" in out and "daemon/c.py:1" in out
    assert "deps FAILED" in out


@pytest.mark.parametrize(
    "back",
    [
        "def late():\n    from daemon.node import Daemon\n",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from daemon.node import Daemon\n",
        "import importlib\nnode = importlib.import_module('daemon.node')\n",
        "from .. import node\n",
    ],
    ids=["inside-a-function", "type-checking", "import-module", "relative"],
)
def test_a_lazy_or_type_only_import_still_closes_a_circle(tmp_path, back):
    root = make_tree(
        tmp_path,
        {"daemon/node.py": "from daemon.svc import service\n", "daemon/svc/service.py": back},
    )
    report = deps.check(root)
    assert [v.kind for v in report.violations] == ["cycle"]
    assert "daemon.node -> daemon.svc.service -> daemon.node" in report.violations[0].message


def test_no_circle_no_failure(tmp_path):
    root = make_tree(
        tmp_path,
        {
            "daemon/node.py": "from daemon.svc import service\nimport torch\n",
            "daemon/svc/service.py": "from . import helpers\nfrom p2p.codec import x\n",
            "daemon/svc/helpers.py": "def f():\n    import torch\n",
            "p2p/codec.py": "import msgpack\nfrom .  import other\n",
            "p2p/other.py": "",
        },
    )
    report = deps.check(root)
    assert report.ok(strict=True) and report.violations == []
    assert report.edges == 4  # node->service, service->helpers, service->codec, codec->other


def test_production_import_of_the_testing_kit_fails(tmp_path):
    root = make_tree(
        tmp_path,
        {
            "daemon/shards/service.py": "from p2p.testing.memnet import stream_pair\n",
            "daemon/tools/chaos.py": "def f():\n    from p2p.testing import strategies\n",
            "registry/sim.py": "from p2p import memnet\n",
            "p2p/testing/memnet.py": "from p2p import network\n",
            "p2p/testing/strategies.py": "from p2p.testing import memnet\n",
            "p2p/network.py": "",
            "p2p/memnet.py": "from p2p.testing.memnet import *  # the kit's own shim\n",
            # tests and benchmarks are not production
            "tests/test_x.py": "from p2p.testing import memnet\n",
            "bench/sim.py": "from p2p.testing.memnet import MemoryNetwork\n",
        },
    )
    report = deps.check(root)
    assert kinds(report) == [
        ("testing-kit", "daemon.shards.service", "p2p.testing.memnet"),
        ("testing-kit", "daemon.tools.chaos", "p2p.testing.strategies"),
        ("testing-kit", "registry.sim", "p2p.memnet"),
    ]
    assert "daemon/shards/service.py:1" in report.violations[0].message


def test_layering_rules_of_the_design(tmp_path):
    root = make_tree(
        tmp_path,
        {
            "p2p/host.py": "from registry import store\n",
            "registry/store.py": "from p2p import host\nfrom scheduler import plan\n",
            "scheduler/plan.py": "from registry.store import x\nfrom p2p.host import y\n",
            "scheduler/bad.py": "def f():\n    from daemon import node\n",
            "contracts/chain.py": "from p2p import host\nfrom registry import store\n",
            "daemon/node.py": "import contracts.chain, registry.store, scheduler.plan, p2p.host\n",
        },
    )
    report = deps.check(root)
    layer = [v.key for v in report.violations if v.kind == "layer"]
    assert sorted(layer) == [
        ("layer", "contracts.chain", "registry.store"),
        ("layer", "p2p.host", "registry.store"),
        ("layer", "registry.store", "scheduler.plan"),
        ("layer", "scheduler.bad", "daemon.node"),
    ]
    p2p_msg = next(v.message for v in report.violations if v.importer == "p2p.host")
    assert "p2p may import nothing of ours; it imports registry.store" in p2p_msg


def test_the_allow_list_allows_listed_offences_and_reports_stale_ones(tmp_path, capsys):
    root = make_tree(
        tmp_path,
        {
            "daemon/a.py": "from daemon import b\n",
            "daemon/b.py": "def f():\n    from daemon import a\n",
            "daemon/c.py": "from p2p.testing import kit\n",
            "p2p/testing/kit.py": "",
        },
    )
    allow = tmp_path / "allow.txt"
    allow.write_text(
        "# known\ncycle daemon.b -> daemon.a  # being removed\n\n"
        "testing-kit daemon.c -> p2p.testing.kit\n"
    )
    assert deps.main(["--root", str(root), "--allow", str(allow), "--strict"]) == 0
    out = capsys.readouterr().out
    assert "allowed (known, listed in allow.txt) cycle daemon.b -> daemon.a" in out

    # allowing the other edge of the circle works as well; only listed edges are allowed
    allow.write_text("cycle daemon.a -> daemon.b\n")
    assert deps.main(["--root", str(root), "--allow", str(allow)]) == 1
    out = capsys.readouterr().out
    assert "FAIL testing-kit" in out and "import circle" not in out

    # once the offence is gone its entry is stale: reported, and a failure with --strict;
    # a cycle entry is stale once its import closes no circle, even if the import remains
    (root / "daemon/b.py").write_text("")
    (root / "daemon/c.py").write_text("")
    assert deps.main(["--root", str(root), "--allow", str(allow)]) == 0
    assert (
        "STALE allow-list entry, remove it: cycle daemon.a -> daemon.b" in capsys.readouterr().out
    )
    assert deps.main(["--root", str(root), "--allow", str(allow), "--strict"]) == 1


def test_a_malformed_allow_list_is_refused(tmp_path, capsys):
    allow = tmp_path / "allow.txt"
    allow.write_text("cycle daemon.a daemon.b\n")
    assert deps.main(["--root", str(tmp_path), "--allow", str(allow)]) == 2
    assert "allow.txt:1: expected 'KIND IMPORTER -> IMPORTED'" in capsys.readouterr().err


def test_a_file_that_does_not_parse_fails(tmp_path):
    root = make_tree(tmp_path, {"daemon/broken.py": "def (:\n"})
    report = deps.check(root)
    assert not report.ok() and "daemon/broken.py: does not parse" in report.errors[0]
