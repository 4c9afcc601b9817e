"""[p2p] max_connections, peer_max_connections, connection_max_buffered_bytes and
max_buffered_bytes reach the host's limits (HostLimits), with their bounds checked at load."""

from __future__ import annotations

import pytest

from daemon.settings import ConfigError, resolve
from p2p import caps
from p2p.limits import HostLimits


def test_the_connection_caps_are_configured_under_p2p():
    defaults = resolve(env={}).host_limits()
    assert (defaults.max_connections, defaults.max_connections_per_peer) == (256, 4)
    env = {"GRIDMESH_P2P__MAX_CONNECTIONS": "40", "GRIDMESH_P2P__PEER_MAX_CONNECTIONS": "2"}
    limits = resolve(env=env).host_limits()
    assert (limits.max_connections, limits.max_connections_per_peer) == (40, 2)
    manager = caps.resource_manager(limits, lambda source, reason: None)
    lifecycle = manager.connection_lifecycle.limits
    assert (lifecycle.max_established_total, lifecycle.max_established_per_peer) == (40, 2)


def test_the_buffer_bounds_are_configured_under_p2p():
    defaults = resolve(env={}).host_limits()
    assert defaults.max_buffered_bytes_per_connection == 128 << 20
    assert defaults.max_buffered_bytes == 1 << 30
    env = {
        "GRIDMESH_P2P__CONNECTION_MAX_BUFFERED_BYTES": str(8 << 20),
        "GRIDMESH_P2P__MAX_BUFFERED_BYTES": str(64 << 20),
    }
    limits = resolve(env=env).host_limits()
    assert limits.max_buffered_bytes_per_connection == 8 << 20
    assert limits.max_buffered_bytes == 64 << 20
    with pytest.raises(ConfigError, match="max_buffered_bytes"):
        resolve(env={"GRIDMESH_P2P__MAX_BUFFERED_BYTES": "1000"})


@pytest.mark.parametrize("key", ["MAX_CONNECTIONS", "PEER_MAX_CONNECTIONS"])
def test_a_cap_below_one_is_refused_at_load(key):
    with pytest.raises(ConfigError, match=key.lower()):
        resolve(env={f"GRIDMESH_P2P__{key}": "0"})


def test_a_cap_of_one_still_builds_a_host_config():
    config = caps.connection_config(HostLimits(max_connections=1, max_connections_per_peer=1))
    assert config.max_connections == 2 and config.low_watermark == 0
