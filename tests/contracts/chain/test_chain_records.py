"""Deployment records in the node's home: written whole, read back, refused when corrupt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts.chain.errors import ChainError
from contracts.chain.records import (
    DeploymentRecord,
    check_redeploy,
    read_record,
    record_path,
    write_record,
)

RECORD = DeploymentRecord("anvil", 31337, {"JobEscrow": "0x" + "ab" * 20}, 12, "0x" + "cd" * 20)


def test_written_whole_and_read_back(tmp_path: Path) -> None:
    assert read_record(tmp_path, "anvil") is None
    path = write_record(tmp_path, RECORD)
    assert path == record_path(tmp_path, "anvil") == tmp_path / "chain" / "anvil.json"
    assert json.loads(path.read_text()) == {
        "network": "anvil",
        "chainId": 31337,
        "addresses": {"JobEscrow": "0x" + "ab" * 20},
        "block": 12,
        "deployer": "0x" + "cd" * 20,
    }
    assert read_record(tmp_path, "anvil") == RECORD
    newer = DeploymentRecord("anvil", 31337, {"JobEscrow": "0x" + "ef" * 20}, 40)
    write_record(tmp_path, newer)
    assert read_record(tmp_path, "anvil") == newer
    assert [p.name for p in path.parent.iterdir()] == ["anvil.json"]  # nothing left aside


@pytest.mark.parametrize(
    "text",
    [
        "{not json",
        "[]",
        '{"network": "anvil"}',
        '{"network": "a", "chainId": "1", "block": 1, "addresses": {}}',
    ],
)
def test_corrupt_record_says_what_to_do(tmp_path: Path, text: str) -> None:
    path = record_path(tmp_path, "anvil")
    path.parent.mkdir()
    path.write_text(text)
    with pytest.raises(ChainError, match="is not a deployment record.*--force"):
        read_record(tmp_path, "anvil")


def test_redeploy_rules(tmp_path: Path) -> None:
    path = record_path(tmp_path, "anvil")
    check_redeploy(None, path, 31337, "u", escrow_alive=False, force=False)
    check_redeploy(RECORD, path, 31337, "u", escrow_alive=False, force=False)  # chain was reset
    with pytest.raises(ChainError, match="already deployed"):
        check_redeploy(RECORD, path, 31337, "u", escrow_alive=True, force=False)
    with pytest.raises(ChainError, match="chain id 31337, but u is chain id 1"):
        check_redeploy(RECORD, path, 1, "u", escrow_alive=False, force=False)
    check_redeploy(RECORD, path, 1, "u", escrow_alive=True, force=True)
