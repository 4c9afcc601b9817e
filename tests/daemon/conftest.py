"""Fixtures for tests that start real daemons: a config with short periods."""

from pathlib import Path

import pytest

FAST_CONFIG = """
network_id = "proctest"
[p2p]
listen = ["/ip4/127.0.0.1/tcp/0"]
reconnect_min_s = 0.2
reconnect_max_s = 2.0
ping_interval_s = 1.0
dht_timeout_s = 2.0
[rpc]
port = 0
[resources]
publish_interval_s = 1.0
record_validity_s = 4.0
max_clock_skew_s = 5.0
[registry]
sync_interval_s = 0.5
sync_timeout_s = 1.0
[shards]
allow_remote_deploy = true
[grpc]
port = 0
[cluster]
# several daemons share this machine's cores and load models all at once: heartbeats can
# arrive a second late, which the defaults (0.6..1.2 s election timeouts) count as a dead
# coordinator. Twice to 2.5x the defaults: failover takes longer, terms stop churning.
heartbeat_s = 0.3
election_timeout_min_s = 1.5
election_timeout_max_s = 3.0
lease_s = 1.2
step_down_s = 6.0
"""


@pytest.fixture(scope="session")
def fast_config(tmp_path_factory) -> Path:
    """Daemons that republish every second, with records valid for 4 s."""
    path = tmp_path_factory.mktemp("cfg") / "fast.toml"
    path.write_text(FAST_CONFIG)
    return path
