"""The key this node signs chain transactions with: `GRIDMESH_CHAIN_KEY` (hex) when set, else
the node's payout key (`payout.key` in its home, mode 0600, made by `gridmesh init` and bound
to its peer id by p2p.identity). One key per node: the address that registers and stakes as a
provider is the one that signs receipts and is paid, and as a requester the one that deposits
and signs vouchers. Never from the repository, never printed or logged: a `ChainKey` shows
only its address.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from contracts.chain.errors import ChainError
from p2p.identity import PAYOUT_KEY_FILE

ENV_VAR = "GRIDMESH_CHAIN_KEY"
KEY_FILE = PAYOUT_KEY_FILE
# secp256k1's group order: a private key is an integer in [1, N)
_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141


@dataclass(frozen=True)
class ChainKey:
    """A private key and where it came from; repr and str show the address only."""

    private_key: str = field(repr=False)  # 0x + 64 hex digits
    source: str  # "GRIDMESH_CHAIN_KEY" or the file's path

    @property
    def address(self) -> str:
        from eth_account import Account

        return Account.from_key(self.private_key).address

    def __str__(self) -> str:
        return f"chain key {self.address} (from {self.source})"


def parse_key(text: str, source: str) -> ChainKey:
    """A hex private key (with or without 0x); ChainError names `source`, never the text."""
    value = text.strip().removeprefix("0x").removeprefix("0X")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise ChainError(f"{source} is not a hex-encoded private key") from None
    if len(raw) != 32:
        raise ChainError(f"{source} must hold a 32-byte private key (64 hex digits)")
    if not 0 < int.from_bytes(raw, "big") < _N:
        raise ChainError(f"{source} is not a valid secp256k1 private key")
    return ChainKey("0x" + raw.hex(), source)


def load_key(home: Path, env: Mapping[str, str] | None = None) -> ChainKey:
    """The node's chain key (see the module docstring): its payout key unless
    GRIDMESH_CHAIN_KEY is set."""
    env = os.environ if env is None else env
    if env.get(ENV_VAR, "").strip():
        return parse_key(env[ENV_VAR], ENV_VAR)
    path = home / KEY_FILE
    if not path.exists():
        raise ChainError(
            f"no chain key: {path} is missing (run `gridmesh init`) and {ENV_VAR} is not set"
        )
    return _read(path)


def _read(path: Path) -> ChainKey:
    try:
        mode = path.stat().st_mode
        text = path.read_text()
    except OSError as exc:
        raise ChainError(f"cannot read {path}: {exc.strerror or exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ChainError(
            f"{path} can be read by other users (mode {stat.S_IMODE(mode):o}): "
            f"run `chmod 600 {path}` (and consider the key exposed)"
        )
    return parse_key(text, str(path))
