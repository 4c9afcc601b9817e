"""[serving] (daemon.serving.settings): its defaults, its layers (file, environment) and every
rule between its keys, each refused naming the key and where it was set."""

from __future__ import annotations

import hashlib
import tomllib
from pathlib import Path

import pytest

from daemon import settings
from daemon.serving.settings import ApiKey, ServingConfig, is_loopback
from daemon.settings import Config, ConfigError, resolve

NODE_TOML = Path(settings.__file__).resolve().parents[1] / "configs" / "node.toml"
KEY = "gm-" + "k" * 40
DIGEST = hashlib.sha256(KEY.encode()).hexdigest()


def refused(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        settings.parse(raw, "x.toml")
    return str(info.value)


def test_the_endpoint_is_off_and_on_loopback_by_default():
    serving = Config().serving
    assert serving == ServingConfig()
    assert (serving.openai, serving.host, serving.port) == (False, "127.0.0.1", 0)
    assert serving.api_keys is None and not serving.keys_required
    assert settings.load(NODE_TOML).serving == serving  # node.toml documents the defaults
    assert "serving" in settings.SECTIONS


def test_keys_come_from_the_file_and_the_environment(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text(
        "[serving]\nopenai = true\nhost = '0.0.0.0'\nport = 8000\n"
        f"[[serving.api_keys]]\nname = 'alice'\nkey_sha256 = '{DIGEST}'\n"
        "requests_per_minute = 60\ntokens_per_day = 1000\nmax_concurrent = 2\n"
        f"[[serving.api_keys]]\nname = 'bob'\nkey = '{'b' * 20}'\n"
    )
    cfg = resolve(path).serving
    assert (cfg.openai, cfg.host, cfg.port, cfg.keys_required) == (True, "0.0.0.0", 8000, True)
    alice, bob = cfg.api_keys
    assert (alice.name, alice.requests_per_minute, alice.tokens_per_day) == ("alice", 60, 1000)
    assert alice.digest() == hashlib.sha256(KEY.encode()).digest()
    assert bob.digest() == hashlib.sha256(b"b" * 20).digest()
    env = {"GRIDMESH_SERVING__PORT": "9000", "GRIDMESH_SERVING__REQUIRE_KEYS": "true"}
    over = resolve(path, env=env).serving
    assert (over.port, over.require_keys, len(over.api_keys)) == (9000, True, 2)
    keys = f'[{{name = "ci", key_sha256 = "{DIGEST}"}}]'
    from_env = resolve(env={"GRIDMESH_SERVING__API_KEYS": keys}).serving
    assert from_env.api_keys == (ApiKey(name="ci", key_sha256=DIGEST),)


def test_the_sample_in_node_toml_is_a_working_key_table():
    """The commented [[serving.api_keys]] sample parses once its digest is filled in."""
    lines = NODE_TOML.read_text().splitlines()
    start = lines.index("# [[serving.api_keys]]")
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("#")), len(lines))
    sample = "\n".join(line.removeprefix("# ") for line in lines[start:end])
    sample = sample.replace("<64 hex digits from gridmesh serve keygen>", DIGEST)
    cfg = settings.parse(tomllib.loads(sample)).serving
    (key,) = cfg.api_keys
    assert (key.name, key.requests_per_minute, key.max_concurrent) == ("alice", 60, 4)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"host": "0.0.0.0"},
            "x.toml: serving.host is '0.0.0.0', beyond loopback: set api_keys too",
        ),
        ({"host": "::"}, "x.toml: serving.host is '::', beyond loopback: set api_keys too"),
        ({"host": "example.org"}, "x.toml: serving.host 'example.org' is not an IP address"),
        ({"require_keys": True}, "x.toml: serving.require_keys is true but api_keys is empty"),
        (
            {"require_keys": True, "api_keys": []},
            "x.toml: serving.require_keys is true but api_keys is empty",
        ),
        (
            {"api_keys": [{"name": "a", "key": "short"}]},
            "x.toml: serving.api_keys[0].key is 5 characters: a key has at least 20",
        ),
        (
            {"api_keys": [{"name": "a", "key": KEY}, {"name": "a", "key_sha256": "0" * 64}]},
            "x.toml: serving.api_keys[1].name 'a' is also api_keys[0]'s name",
        ),
        (
            {"api_keys": [{"name": "a", "key": KEY}, {"name": "b", "key_sha256": DIGEST}]},
            "x.toml: serving.api_keys[1].key_sha256 is the same key as api_keys[0]'s",
        ),
        (
            {"api_keys": [{"name": "a"}]},
            "x.toml: serving.api_keys[0] needs exactly one of key_sha256",
        ),
        (
            {"api_keys": [{"name": "a", "key": KEY, "key_sha256": DIGEST}]},
            "x.toml: serving.api_keys[0] needs exactly one of key_sha256",
        ),
        ({"api_keys": [{"name": "a", "key_sha256": "zz"}]}, "x.toml: serving.api_keys[0].key_sha"),
        (
            {"api_keys": [{"name": "a b", "key": KEY}]},
            "x.toml: serving.api_keys[0].name 'a b' is not a key name",
        ),
        (
            {"api_keys": [{"name": "a", "key": KEY, "requests_per_minute": 0}]},
            "x.toml: serving.api_keys[0].requests_per_minute must be >= 1",
        ),
        (
            {"api_keys": [{"name": "a", "key": KEY, "tokens_per_day": -5}]},
            "x.toml: serving.api_keys[0].tokens_per_day must be >= 1",
        ),
        ({"port": 70000}, "x.toml: serving.port 70000 is not a TCP port"),
        ({"max_body_bytes": 10}, "x.toml: serving.max_body_bytes must be >= 1024"),
        ({"max_queue": -1}, "x.toml: serving.max_queue must be >= 0"),
        ({"openai": "yes"}, "x.toml: serving.openai must be true or false"),
        ({"opanai": True}, "x.toml: unknown key serving.opanai"),
    ],
)
def test_a_serving_mistake_names_its_key(raw, expected):
    message = refused({"serving": raw})
    assert message.startswith(expected), message


def test_a_rule_names_the_environment_variable_that_broke_it():
    with pytest.raises(ConfigError) as info:
        resolve(env={"GRIDMESH_SERVING__HOST": "0.0.0.0"})
    assert str(info.value).startswith("GRIDMESH_SERVING__HOST: serving.host is '0.0.0.0'")
    assert "api_keys" in str(info.value)


def test_loopback_hosts():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.168.1.2", "example.org"]))
    keyed = {"api_keys": [{"name": "a", "key": KEY}]}
    assert settings.parse({"serving": {"host": "::1"}}).serving.keys_required is False
    assert settings.parse({"serving": {"host": "10.0.0.1", **keyed}}).serving.keys_required
    assert settings.parse({"serving": {"require_keys": True, **keyed}}).serving.keys_required
