"""A node without recorded contracts runs unpaid, and says so once at start."""

from __future__ import annotations

import logging

from daemon.payments.wiring import escrow_from_home
from daemon.settings import parse
from p2p.identity import NodeIdentity


def test_no_recorded_contracts_means_unpaid_said_once(tmp_path, caplog):
    config = parse({"chain": {"network": "base-sepolia"}})
    with caplog.at_level(logging.INFO, logger="daemon.payments.wiring"):
        assert escrow_from_home(tmp_path, config, NodeIdentity.generate()) is None
    said = [r.getMessage() for r in caplog.records if "unpaid" in r.getMessage()]
    assert len(said) == 1
    assert "no contracts recorded for chain network 'base-sepolia'" in said[0]
    assert "gridmesh chain deploy --network base-sepolia" in said[0]
    assert "gridmesh chain use --escrow ADDRESS" in said[0]
