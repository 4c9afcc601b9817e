"""The committed artifacts are what the pinned compiler makes of the committed sources, byte for
byte, and `contracts.artifacts` reads them without Node."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from contracts import artifacts

CONTRACTS_DIR = Path(__file__).resolve().parents[2] / "contracts"
DEPLOYED = ["JobEscrow", "ProviderRegistry", "ReputationRegistry", "TestUSD"]


def test_committed_artifacts_equal_a_fresh_compile(tmp_path: Path) -> None:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot compile the contracts")
    if not (CONTRACTS_DIR / "node_modules" / "solc").is_dir():
        pytest.skip(
            "solc-js is not installed (run `make contracts-deps`, i.e. `npm ci` in contracts/)"
        )
    subprocess.run(
        ["node", str(CONTRACTS_DIR / "compile.mjs"), "--out", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    fresh = sorted(p.name for p in tmp_path.iterdir())
    committed = sorted(p.name for p in (CONTRACTS_DIR / "artifacts").iterdir())
    assert fresh == committed
    for name in committed:
        stale = f"contracts/artifacts/{name} is stale: run `node contracts/compile.mjs`, commit it"
        fresh_bytes = (tmp_path / name).read_bytes()
        assert fresh_bytes == (CONTRACTS_DIR / "artifacts" / name).read_bytes(), stale


def test_artifacts_load_without_node() -> None:
    assert set(DEPLOYED) | {"ReentrantToken"} == set(artifacts.names())
    for name in DEPLOYED:
        artifact = artifacts.load(name)
        assert artifact.name == name
        assert artifact.bytecode.startswith("0x") and len(artifact.bytecode) > 1000
        assert artifact.deployed_bytecode.startswith("0x")
        assert artifact.compiler == {
            "evmVersion": "cancun",
            "optimizer": {"enabled": True, "runs": 200},
            "solc": "0.8.37",
        }
    errors = {i["name"] for i in artifacts.all_abis()["JobEscrow"] if i["type"] == "error"}
    assert {"StaleVoucher", "BadSignature", "OverDeposit", "NotEquivocation"} <= errors
    with pytest.raises(KeyError, match="known: JobEscrow"):
        artifacts.load("Missing")
    with pytest.raises(KeyError):
        artifacts.load("../package")
