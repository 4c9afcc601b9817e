import stat

import pytest

from p2p import identity


def test_peer_id_matches_libp2p():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    ident = identity.NodeIdentity.generate()
    libp2p_id = ID.from_pubkey(create_new_key_pair(ident.node_seed).public_key)
    assert ident.peer_id == libp2p_id.to_base58()
    assert ident.peer_id.startswith("12D3KooW")


def test_sign_and_verify_roundtrip_and_tamper():
    ident = identity.NodeIdentity.generate()
    sig = ident.sign(b"hello")
    assert identity.verify(ident.peer_id, b"hello", sig)
    assert not identity.verify(ident.peer_id, b"hellO", sig)
    other = identity.NodeIdentity.generate()
    assert not identity.verify(other.peer_id, b"hello", sig)
    assert not identity.verify("not-a-peer-id!", b"hello", sig)


def test_binding_verifies_both_directions():
    ident = identity.NodeIdentity.generate()
    binding = ident.binding()
    assert binding["payout_address"].startswith("0x") and len(binding["payout_address"]) == 42
    assert identity.verify_binding(binding)
    other = identity.NodeIdentity.generate()
    # someone else's address under our peer id: the payout signature no longer matches
    assert not identity.verify_binding({**binding, "payout_address": other.payout_address})
    # our address claimed by another peer id: the node signature no longer matches
    assert not identity.verify_binding({**binding, "peer_id": other.peer_id})
    assert not identity.verify_binding({**binding, "node_signature": "zz"})
    assert not identity.verify_binding({})


def test_init_creates_private_files_and_never_overwrites(tmp_path):
    home = tmp_path / "home"
    first, created = identity.init_identity(home)
    assert created
    for name in (identity.NODE_KEY_FILE, identity.PAYOUT_KEY_FILE, identity.BINDING_FILE):
        mode = stat.S_IMODE((home / name).stat().st_mode)
        assert mode == 0o600, (name, oct(mode))
    key_bytes = (home / identity.NODE_KEY_FILE).read_bytes()
    again, created_again = identity.init_identity(home)
    assert not created_again
    assert again == first
    assert (home / identity.NODE_KEY_FILE).read_bytes() == key_bytes


def test_load_rejects_corrupt_or_mismatched_files(tmp_path):
    identity.init_identity(tmp_path)
    (tmp_path / identity.NODE_KEY_FILE).write_text("abc")
    with pytest.raises(identity.IdentityError):
        identity.load_identity(tmp_path)
    (tmp_path / identity.NODE_KEY_FILE).write_text("11" * 32)  # valid key, wrong binding
    with pytest.raises(identity.IdentityError, match="does not match"):
        identity.load_identity(tmp_path)
    with pytest.raises(identity.IdentityError, match="gridmesh init"):
        identity.load_identity(tmp_path / "empty")


def test_the_keys_are_derived_once_per_identity(monkeypatch):
    """A daemon asks its peer id on every stream it opens and every entry it writes: the
    key behind it is derived once, and two identities still keep their own."""
    ident, other = identity.NodeIdentity.generate(), identity.NodeIdentity.generate()
    derived = []
    real = identity.Ed25519PrivateKey.from_private_bytes

    def counting(seed: bytes):
        derived.append(seed)
        return real(seed)

    monkeypatch.setattr(identity.Ed25519PrivateKey, "from_private_bytes", counting)
    first = ident.peer_id
    assert ident.peer_id == first and ident.sign(b"m") and ident.public_key
    assert derived == [ident.node_seed]
    assert other.peer_id != first and derived == [ident.node_seed, other.node_seed]
    assert identity.verify(first, b"m", ident.sign(b"m"))
    assert ident == identity.NodeIdentity(ident.node_seed, ident.payout_key)  # fields only
