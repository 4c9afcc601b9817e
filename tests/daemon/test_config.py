import tomllib

import pytest

from daemon import config


def test_node_toml_documents_the_code_defaults():
    parsed = config.parse(tomllib.loads(config.template_text()))
    assert parsed == config.Config()


def test_devnet_toml_parses():
    cfg = config.load(config.REPO_CONFIGS / "devnet.toml")
    assert cfg.rpc.port == 0
    assert cfg.resources.publish_interval_s < cfg.resources.record_validity_s


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"bogus": 1}, "unknown top-level"),
        ({"rpc": {"port": "x"}}, "rpc.port must be an integer, not a string"),
        ({"rpc": {"port": 70000}}, "not a TCP port"),
        ({"p2p": {"listen": "/ip4/1.2.3.4"}}, "list of strings"),
        ({"p2p": {"nope": 1}}, "unknown key p2p.nope"),
        ({"resources": {"publish_interval_s": 100, "record_validity_s": 90}}, "below"),
        ({"shards": {"device": "tpu"}}, "use auto, cpu, cuda or cuda:N"),
        ({"shards": {"cache_gib": -1}}, "cache_gib must be >= 0"),
    ],
)
def test_bad_config_is_a_clear_error(raw, message):
    with pytest.raises(config.ConfigError, match=message):
        config.parse(raw)


def test_overrides(tmp_path):
    cfg = config.with_overrides(
        config.Config(), listen=["/ip4/127.0.0.1/tcp/0"], bootstrap=None, rpc_port=0
    )
    assert cfg.p2p.listen == ("/ip4/127.0.0.1/tcp/0",)
    assert cfg.rpc.port == 0


def test_load_reports_path(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("network_id = [")
    with pytest.raises(config.ConfigError, match="c.toml"):
        config.load(bad)


def test_any_multiaddr_text_is_accepted_or_a_config_error():
    """--listen/--bootstrap and p2p.listen/bootstrap take anything a user types: the check
    raises only ConfigError, and what it accepts has the documented shape."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    parts = st.sampled_from(
        [
            "ip4",
            "ip6",
            "dns",
            "tcp",
            "p2p",
            "udp",
            "1.2.3.4",
            "::1",
            "0",
            "4001",
            "99999",
            "12D3KooWQQk2YcdHSkqWYZWhefsfH7ci8PACnWaNTJFtmssExvqk",
            "",
            "x",
        ]
    )
    addrs = st.lists(parts, max_size=7).map(lambda p: "/" + "/".join(p)) | st.text(max_size=40)

    @settings(max_examples=300, deadline=None)
    @given(addr=addrs)
    def check(addr):
        for key in ("listen", "bootstrap"):
            try:
                cfg = config.parse({"p2p": {key: [addr]}})
            except config.ConfigError:
                continue
            assert addr.startswith(("/ip4/", "/ip6/") if key == "listen" else ("/ip", "/dns"))
            assert (key == "bootstrap") == ("/p2p/" in addr)
            assert getattr(cfg.p2p, key) == (addr,)
        try:
            config.with_overrides(config.Config(), listen=[addr], bootstrap=[addr])
        except config.ConfigError as exc:
            assert str(exc).startswith(("--listen", "--bootstrap"))

    check()
