"""Where a node remembers its deployments: `HOME/chain/<network>.json` =
`{"network", "chainId", "addresses": {contract name: address}, "block", "deployer"}`.

Written atomically (a temporary file renamed over the old one), so a reader sees the old record
or the new one, never half of one. `check_redeploy` says when a new deployment would replace a
record it should not: one made on another chain (a different endpoint behind the same name), or
contracts still alive on this one.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contracts.chain.errors import ChainError

RECORD_DIR = "chain"


@dataclass(frozen=True)
class DeploymentRecord:
    network: str
    chain_id: int
    addresses: dict[str, str]  # TestUSD, ReputationRegistry, ProviderRegistry, JobEscrow
    block: int
    deployer: str = ""

    def as_json(self) -> dict[str, Any]:
        return {
            "network": self.network,
            "chainId": self.chain_id,
            "addresses": dict(self.addresses),
            "block": self.block,
            "deployer": self.deployer,
        }

    @classmethod
    def from_json(cls, data: Any, source: str) -> DeploymentRecord:
        try:
            addresses = data["addresses"]
            if not isinstance(addresses, dict) or not all(
                isinstance(k, str) and isinstance(v, str) for k, v in addresses.items()
            ):
                raise TypeError("addresses")
            chain_id, block = data["chainId"], data["block"]
            if not isinstance(chain_id, int) or not isinstance(block, int):
                raise TypeError("chainId/block")
            return cls(
                str(data["network"]), chain_id, addresses, block, str(data.get("deployer", ""))
            )
        except (KeyError, TypeError) as exc:
            raise ChainError(
                f"{source} is not a deployment record ({exc}): remove it or redeploy with "
                "`gridmesh chain deploy --force`"
            ) from None


def record_path(home: Path, network: str) -> Path:
    return home / RECORD_DIR / f"{network}.json"


def read_record(home: Path, network: str) -> DeploymentRecord | None:
    """The record of `network` in `home`, None if there is none."""
    path = record_path(home, network)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ChainError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    return DeploymentRecord.from_json(data if isinstance(data, dict) else {}, str(path))


def write_record(home: Path, record: DeploymentRecord) -> Path:
    """Replace the record of `record.network` atomically; its path."""
    path = record_path(home, record.network)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    text = json.dumps(record.as_json(), indent=2, sort_keys=True) + "\n"
    fd, aside = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(aside, 0o644)
        os.replace(aside, path)
    except BaseException:
        Path(aside).unlink(missing_ok=True)
        raise
    return path


def check_redeploy(
    existing: DeploymentRecord | None,
    path: Path,
    chain_id: int,
    url: str,
    *,
    escrow_alive: bool,
    force: bool,
) -> None:
    """ChainError when deploying at `url` (chain `chain_id`) would silently replace
    `existing`; `force` replaces it anyway."""
    if existing is None or force:
        return
    if existing.chain_id != chain_id:
        raise ChainError(
            f"{path} records a deployment on chain id {existing.chain_id}, but {url} is chain "
            f"id {chain_id}: is --rpc-url the endpoint you meant? To deploy anew there and "
            "replace the record, add --force"
        )
    if escrow_alive:
        escrow = existing.addresses.get("JobEscrow", "?")
        raise ChainError(
            f"already deployed on {existing.network} (chain id {chain_id}, block "
            f"{existing.block}; JobEscrow at {escrow}, recorded in {path}). To deploy a new set "
            "and replace the record, add --force"
        )
