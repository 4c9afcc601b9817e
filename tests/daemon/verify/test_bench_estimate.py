"""bench/verify.py's overhead estimate (issue 20): paired round by round, so that a round slowed
by other work on the shared machine moves its own ratio and not the whole estimate."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("torch")

BENCH = Path(__file__).resolve().parents[3] / "bench" / "verify.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_verify_under_test", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (its dataclasses look their module up)
    path = list(sys.path)
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = path  # (it puts the repository first on the path)
        sys.modules.pop(spec.name, None)
    return module


def _runs(bench: ModuleType, walls: list[float], cpus: list[float]) -> list:
    return [bench.Run(tokens=384, wall_s=w, cpu_s=c) for w, c in zip(walls, cpus, strict=True)]


def test_a_loaded_round_moves_only_its_own_ratio(bench: ModuleType) -> None:
    # every round's run with checks takes 5 % longer than its own run without; one round
    # ran under load, both its runs 4 times slower
    base = _runs(bench, [1.0, 1.0, 4.0, 1.0], [0.2, 0.2, 0.8, 0.2])
    checked = _runs(bench, [1.05, 1.05, 4.2, 1.05], [0.22, 0.22, 0.88, 0.22])
    wall, cpu = bench.paired(checked, base)
    assert wall == pytest.approx(1 - 1 / 1.05)
    assert cpu == pytest.approx(0.10)
    # the same with the loaded round's run with checks a little slower still: the estimate
    # moves by that round's share, a quarter of its log ratio
    checked[2] = bench.Run(tokens=384, wall_s=4.2 * 1.2, cpu_s=0.88)
    wall, _ = bench.paired(checked, base)
    expected = 1 - math.exp((3 * math.log(1 / 1.05) + math.log(1 / (1.05 * 1.2))) / 4)
    assert wall == pytest.approx(expected)
    totals, _ = bench.pooled(checked, base)
    assert totals > wall + 0.05  # the rounds' totals: the loaded round weighs 4 times


def test_interval_brackets_the_estimate_and_is_reproducible(bench: ModuleType) -> None:
    base = _runs(bench, [1.0, 1.1, 0.9, 1.2, 1.0, 0.95], [0.2] * 6)
    checked = _runs(bench, [1.06, 1.12, 0.97, 1.25, 1.04, 1.01], [0.21] * 6)
    wall, _ = bench.paired(checked, base)
    low, high = (float(x) for x in bench.interval(checked, base)[0].rstrip("%").split(".."))
    assert low <= 100 * wall <= high
    assert bench.interval(checked, base) == bench.interval(checked, base)
    assert bench.interval(checked[:2], base[:2]) == ("-", "-")  # too few rounds for one


def test_pooled_keep_files_pair_each_round_as_it_ran(bench: ModuleType, tmp_path, capsys) -> None:
    """`--pool`: two runs' rounds together, each paired with its own run without checks.
    The first file's runs with checks take 2 % longer than its runs without, the second's
    4 %, its runs twice as slow: pooled, 3 % (a total over both would weigh the second)."""

    def kept(name: str, slow: float, longer: float) -> Path:
        base = [{"tokens": 384, "wall_s": slow * (1 + i / 10), "cpu_s": 0.2} for i in range(5)]
        checked = [{**r, "wall_s": r["wall_s"] * longer} for r in base]
        path = tmp_path / name
        path.write_text(json.dumps({"load": [1.0, 1.5], "runs": {"none": base, "2%": checked}}))
        return path

    bench.pool([kept("a.json", 1.0, 1.02), kept("b.json", 2.0, 1.04)])
    row = next(
        line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("2%")
    )
    assert row.split("|")[1].strip() == f"{(1 - 1 / math.sqrt(1.02 * 1.04)) * 100:.1f}%"
