"""Node identity: an Ed25519 node key (the libp2p peer id) and a secp256k1 payout key.

The payout key is an Ethereum account. It is bound to the node key in both directions:
the node key signs the payout address and the payout key signs the peer id, so nobody can
claim another node's address, nor attach their node to someone else's address.

Peer ids are computed here without importing libp2p (which costs ~0.7 s): for Ed25519 keys a
libp2p peer id is the identity multihash of the protobuf-encoded public key, in base58btc.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

# protobuf PublicKey{Type: Ed25519 (1), Data: 32 bytes}, wrapped in an identity multihash.
_ED25519_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
NODE_KEY_FILE = "node.key"
PAYOUT_KEY_FILE = "payout.key"
BINDING_FILE = "identity.json"


class IdentityError(ValueError):
    """A key file or binding is missing, malformed or does not verify."""


def peer_id_from_public_key(public_key: bytes) -> str:
    if len(public_key) != 32:
        raise IdentityError("an Ed25519 public key is 32 bytes")
    return base58.b58encode(_ED25519_PEER_ID_PREFIX + public_key).decode()


def public_key_from_peer_id(peer_id: str) -> bytes:
    """Recover the Ed25519 public key embedded in a peer id, or raise IdentityError."""
    try:
        raw = base58.b58decode(peer_id.encode("ascii"))
    except (ValueError, UnicodeEncodeError) as exc:
        raise IdentityError(f"peer id is not base58: {peer_id[:64]!r}") from exc
    if len(raw) != 38 or not raw.startswith(_ED25519_PEER_ID_PREFIX):
        raise IdentityError("peer id is not an Ed25519 identity peer id")
    return raw[len(_ED25519_PEER_ID_PREFIX) :]


def verify(peer_id: str, message: bytes, signature: bytes) -> bool:
    """True when `signature` over `message` was made by the key behind `peer_id`."""
    try:
        key = Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
        key.verify(signature, message)
    except (IdentityError, InvalidSignature, ValueError):
        return False
    return True


def _binding_message(peer_id: str, payout_address: str) -> bytes:
    return f"gridmesh payout binding v1\npeer: {peer_id}\naddress: {payout_address}".encode()


@dataclass(frozen=True)
class NodeIdentity:
    """A node's keys. `node_seed` is the 32-byte Ed25519 seed; `payout_key` is secp256k1."""

    node_seed: bytes
    payout_key: bytes

    @classmethod
    def generate(cls) -> NodeIdentity:
        return cls(node_seed=secrets.token_bytes(32), payout_key=secrets.token_bytes(32))

    # Derived once per identity (the fields are frozen): a daemon asks its peer id on every
    # stream it opens and every entry it writes, and deriving it (a scalar multiplication and
    # a base58 encoding in Python) took ~5 % of a requester's RPC handler in a profile.
    @cached_property
    def _signing_key(self) -> Ed25519PrivateKey:
        return Ed25519PrivateKey.from_private_bytes(self.node_seed)

    @cached_property
    def public_key(self) -> bytes:
        return self._signing_key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)

    @cached_property
    def peer_id(self) -> str:
        return peer_id_from_public_key(self.public_key)

    @cached_property
    def payout_address(self) -> str:
        from eth_account import Account

        return Account.from_key(self.payout_key).address

    def sign(self, message: bytes) -> bytes:
        return self._signing_key.sign(message)

    def binding(self) -> dict[str, str]:
        """The two signatures that tie the payout address to the peer id."""
        from eth_account import Account
        from eth_account.messages import encode_defunct

        address = self.payout_address
        message = _binding_message(self.peer_id, address)
        payout_sig = Account.sign_message(encode_defunct(message), self.payout_key).signature
        return {
            "peer_id": self.peer_id,
            "payout_address": address,
            "node_signature": self.sign(message).hex(),
            "payout_signature": payout_sig.hex(),
        }


def verify_binding(binding: dict[str, str]) -> bool:
    """Check both directions of a payout binding produced by `NodeIdentity.binding`."""
    from eth_account import Account
    from eth_account.messages import encode_defunct

    try:
        peer_id, address = binding["peer_id"], binding["payout_address"]
        message = _binding_message(peer_id, address)
        if not verify(peer_id, message, bytes.fromhex(binding["node_signature"])):
            return False
        signer = Account.recover_message(
            encode_defunct(message), signature=bytes.fromhex(binding["payout_signature"])
        )
    except (KeyError, TypeError, ValueError):
        return False
    return signer.lower() == address.lower()


def _write_private(path: Path, data: bytes) -> None:
    """Create `path` readable by the owner only; never overwrite an existing file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_key(path: Path) -> bytes:
    try:
        key = bytes.fromhex(path.read_text().strip())
    except FileNotFoundError as exc:
        raise IdentityError(f"{path} is missing: run `gridmesh init` first") from exc
    except ValueError as exc:
        raise IdentityError(f"{path} is not a hex-encoded key") from exc
    if len(key) != 32:
        raise IdentityError(f"{path} must hold 32 bytes, found {len(key)}")
    return key


def init_identity(home: Path) -> tuple[NodeIdentity, bool]:
    """Create the keys in `home` unless they exist. Returns (identity, created)."""
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    node_path, payout_path = home / NODE_KEY_FILE, home / PAYOUT_KEY_FILE
    if node_path.exists() or payout_path.exists():
        return load_identity(home), False
    ident = NodeIdentity.generate()
    _write_private(node_path, ident.node_seed.hex().encode())
    _write_private(payout_path, ident.payout_key.hex().encode())
    binding_path = home / BINDING_FILE
    binding_path.write_text(json.dumps(ident.binding(), indent=2) + "\n")
    binding_path.chmod(0o600)
    return ident, True


def load_identity(home: Path) -> NodeIdentity:
    ident = NodeIdentity(
        node_seed=_read_key(home / NODE_KEY_FILE), payout_key=_read_key(home / PAYOUT_KEY_FILE)
    )
    binding_path = home / BINDING_FILE
    if binding_path.exists():
        try:
            stored = json.loads(binding_path.read_text())
        except ValueError as exc:
            raise IdentityError(f"{binding_path} is not valid JSON") from exc
        if stored.get("peer_id") != ident.peer_id or not verify_binding(stored):
            raise IdentityError(f"{binding_path} does not match the keys in {home}")
    return ident
