"""[verify] in the node's config: off by default; on, the daemon's generations are checked
(its ShardService holds a Verifier with the section's rules), `verify_status` and /metrics
show it; bad values are refused naming the key."""

from __future__ import annotations

import pytest

from daemon.settings import ConfigError, parse
from daemon.verify.policy import VerifyConfig
from daemon.verify.verifier import Verifier
from tests.daemon.harness import FAST, inline_threads, memory_cluster


@pytest.fixture(autouse=True)
def _inline(monkeypatch):
    inline_threads(monkeypatch)


def test_the_section_is_off_by_default_and_gives_the_verifiers_rules():
    assert parse({}).verify.enabled is False
    section = parse({"verify": {"enabled": True, "rate": 0.05, "exclude_after": 3}}).verify
    policy = section.policy()
    assert (policy.rate, policy.exclude_after, policy.probation_rate) == (0.05, 3, 0.10)
    assert (policy.speculate, policy.gather_s) == (True, 0.0)
    # (a verifier made in code speculates too: with replicas apart it costs less wall)
    assert VerifyConfig().speculate is True
    section = parse({"verify": {"speculate": False, "gather_s": 0.1}}).verify
    assert (section.policy().speculate, section.policy().gather_s) == (False, 0.1)


@pytest.mark.parametrize(
    ("raw", "says"),
    [
        ({"rate": 1.5}, "verify.rate"),
        ({"exclude_after": 0}, "verify.exclude_after"),
        ({"gather_s": 11.0}, "verify.gather_s"),
        ({"backoff_s": 100.0, "max_backoff_s": 10.0}, "verify.max_backoff_s"),
        ({"sometimes": True}, "sometimes"),
    ],
)
def test_bad_values_are_refused_naming_the_key(raw, says):
    with pytest.raises(ConfigError, match=says):
        parse({"verify": raw}, "x.toml")


async def test_a_daemon_with_verify_on_checks_its_generations(autojump_clock, tmp_path):
    settings = {**FAST, "verify": {"enabled": True, "rate": 0.25}}
    async with memory_cluster(tmp_path / "on", 1, settings=settings) as net:
        (daemon,) = net.daemons
        verifier = daemon.daemon.shards.verifier
        assert isinstance(verifier, Verifier) and verifier.config.rate == 0.25
        status = await daemon.call("verify_status")
        assert status["enabled"] is True and status["config"]["rate"] == 0.25
        exported = daemon.daemon.metrics.render().decode()
        assert 'gridmesh_verify_providers{standing="probation"} 0.0' in exported
    async with memory_cluster(tmp_path / "off", 1) as net:
        (daemon,) = net.daemons
        assert daemon.daemon.shards.verifier is None
        assert await daemon.call("verify_status") == {"enabled": False}
        assert "gridmesh_verify" not in daemon.daemon.metrics.render().decode()
