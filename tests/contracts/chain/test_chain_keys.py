"""Where the node's chain key comes from (environment, else its payout key in its home, mode
0600), that it is never shown, and the named networks with their endpoints."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from eth_account import Account

from contracts.chain import networks
from contracts.chain.errors import ChainError
from contracts.chain.keys import ENV_VAR, KEY_FILE, load_key, parse_key
from p2p.identity import init_identity

DEV_KEY = "0x" + "00" * 31 + "01"


def test_it_is_the_nodes_payout_key(tmp_path: Path) -> None:
    home = tmp_path / "home"
    ident, _ = init_identity(home)
    key = load_key(home, env={})
    path = home / KEY_FILE
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert key.source == str(path)
    assert key.address == ident.payout_address  # the address bound to the peer id
    assert load_key(home, env={}) == key
    assert Account.from_key(key.private_key).address == key.address


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    init_identity(tmp_path)
    key = load_key(tmp_path, env={ENV_VAR: DEV_KEY.removeprefix("0x")})
    assert key.private_key == DEV_KEY and key.source == ENV_VAR
    assert key.address == "0x7E5F4552091A69125d5DfCb7b8C2659029395Bdf"
    # an empty variable is unset, not a key
    assert load_key(tmp_path, env={ENV_VAR: " "}).source == str(tmp_path / KEY_FILE)


def test_never_shown(tmp_path: Path) -> None:
    init_identity(tmp_path)
    key = load_key(tmp_path, env={})
    secret = key.private_key.removeprefix("0x")
    assert secret not in repr(key) and secret not in str(key) and key.address in str(key)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("zz" * 32, "not a hex-encoded"),
        ("ab" * 31, "32-byte"),
        ("00" * 32, "not a valid secp256k1"),
        ("ff" * 32, "not a valid secp256k1"),
    ],
)
def test_bad_keys_named_by_source_not_content(text: str, why: str) -> None:
    with pytest.raises(ChainError, match=why) as caught:
        parse_key(text, ENV_VAR)
    assert ENV_VAR in str(caught.value) and text not in str(caught.value)


def test_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_text(DEV_KEY)
    path.chmod(0o644)
    with pytest.raises(ChainError, match="chmod 600"):
        load_key(tmp_path, env={})
    path.chmod(0o600)
    assert load_key(tmp_path, env={}).private_key == DEV_KEY


def test_without_a_key_says_how(tmp_path: Path) -> None:
    with pytest.raises(ChainError, match=f"gridmesh init.*{ENV_VAR}"):
        load_key(tmp_path, env={})
    assert not (tmp_path / KEY_FILE).exists()  # nothing made behind the node's back


def test_networks_and_their_endpoints() -> None:
    assert networks.endpoint("devnet")[1] == "http://127.0.0.1:8545"
    anvil, url = networks.endpoint("anvil", "http://127.0.0.1:9999")
    assert anvil.chain_id == 31337 and url == "http://127.0.0.1:9999"
    sepolia, url = networks.endpoint("base-sepolia", "https://sepolia.example/rpc")
    assert sepolia.chain_id == 84532
    with pytest.raises(ChainError, match="--rpc-url") as caught:
        networks.endpoint("base-sepolia")
    assert "rpc_url" in str(caught.value) and "84532" in str(caught.value)
    with pytest.raises(ChainError, match="known: devnet, anvil, base-sepolia"):
        networks.get("mainnet")
    with pytest.raises(ChainError, match="not an http"):
        networks.endpoint("anvil", "ws://127.0.0.1:8545")
    with pytest.raises(ChainError, match="chain id 1, but base-sepolia is chain id 84532"):
        networks.check_chain_id(sepolia, "https://x", 1)


def test_settings_name_the_same_networks() -> None:
    """daemon.settings lists the names as a literal (loading a config must not import the
    chain client): they must stay the ones defined here."""
    from daemon import sections

    assert tuple(networks.NETWORKS) == sections.CHAIN_NETWORKS
