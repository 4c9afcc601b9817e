"""Real daemon processes, each in its own network namespace (iproute2; needs root), on one
bridge: five voters of one cluster. The coordinator and one other voter are cut off together
(their ports moved to a bridge of their own: they reach each other, nobody else). The three
elect a new coordinator; the two elect nobody (neither holds a lease, none names a coordinator
of a newer term) for several election timeouts. Healed, all five agree on exactly one
coordinator (whether it is the majority's, in the term it had, is printed). Skipped, with
the reason, where network namespaces cannot be made (not root, no `ip`)."""

from __future__ import annotations

import time

import pytest

from daemon.devnet import all_found, wait_for
from tests.daemon import netns
from tests.daemon.cluster_procs import agreed, form_cluster, views

pytestmark = pytest.mark.procs

C = "split"
SIZE = 5
WON = "gridmesh_cluster_elections_won_total"
WATCH_S = 6.5  # the minority is watched this long: over twice the longest election timeout
# (3.0 s in tests/daemon/conftest.py's FAST_CONFIG)


@pytest.fixture
def lan():
    why = netns.unavailable()
    if why is not None:
        pytest.skip(why)
    with netns.Lan(SIZE) as made:
        yield made


def test_a_cut_off_minority_elects_nobody_and_the_majority_keeps_a_coordinator(
    tmp_path, fast_config, lan
):
    daemons: list[netns.NetnsDaemon] = []
    try:
        for index in range(SIZE):
            daemon = netns.NetnsDaemon(
                tmp_path / f"node{index}",
                lan.nodes[index],
                lan.addr(index),
                config=fast_config,
                bootstrap=[daemons[-1].addr] if daemons else [],
            )
            daemons.append(daemon)
            daemon.start()
        wait_for(lambda: all_found(daemons), 60, "every daemon to find all", poll_s=0.2)
        form_cluster(daemons, C, voters=SIZE)
        leader_id, term = wait_for(lambda: agreed(daemons, C), 60, "one coordinator known to all")
        leader = next(i for i, d in enumerate(daemons) if d.peer_id == leader_id)
        minority = [leader, (leader + 1) % SIZE]
        majority = [d for i, d in enumerate(daemons) if i not in minority]
        cut_off = [daemons[i] for i in minority]
        won = {d.peer_id: d.metric(WON, cluster=C) for d in cut_off}
        lan.partition(minority)
        cut = time.monotonic()
        new_id, new_term = wait_for(
            lambda: agreed(majority, C), 30, "the majority to elect a coordinator", poll_s=0.1
        )
        elapsed_s = time.monotonic() - cut
        assert new_id in {d.peer_id for d in majority} and new_term > term
        # the minority, watched for several election timeouts: nobody holds a lease there
        # and nobody names a coordinator of a term newer than the one before the cut
        watch_until = time.monotonic() + WATCH_S
        samples = 0
        while time.monotonic() < watch_until:
            seen = views(cut_off, C)
            assert seen is not None
            for view in seen:
                assert not view["coordinating"], view
                assert view["coordinator"] is None or view["term"] <= term, view
            samples += 1
            # a look every 0.1 s: an observer that does not load the daemons it watches
            time.sleep(max(0.0, min(0.1, watch_until - time.monotonic())))
        for daemon in cut_off:
            assert daemon.metric("gridmesh_cluster_coordinating", cluster=C) == 0
            assert daemon.metric(WON, cluster=C) == won[daemon.peer_id], "won while cut off"
        # the majority still agrees on a coordinator of its own (waited for, not read once:
        # the three views are read one after another, and on a loaded machine a read can
        # fall in a moment where the coordinator's lease lapsed and is not yet renewed)
        kept = wait_for(
            lambda: agreed(majority, C), 15, "the majority to agree on its coordinator", poll_s=0.1
        )
        assert kept[0] in {d.peer_id for d in majority}, views(majority, C)
        won_before_heal = {d.peer_id: d.metric(WON, cluster=C) for d in daemons}
        lan.heal()
        healed = time.monotonic()
        final = wait_for(
            lambda: agreed(daemons, C), 60, "one coordinator known to all five", poll_s=0.1
        )
        converged_s = time.monotonic() - healed
        print(
            f"cut at term {term}: the majority elected {new_id[-6:]} at term {new_term} in "
            f"{elapsed_s:.2f} s; the minority watched {samples} times over {WATCH_S} s; the "
            f"majority had {kept[0][-6:]} at term {kept[1]} when healed; all five agreed on "
            f"{final[0][-6:]} at term {final[1]} {converged_s:.2f} s after"
        )
        won_after_heal = {d.peer_id: d.metric(WON, cluster=C) for d in daemons}
        if final != kept or won_after_heal != won_before_heal:  # deposed: show why
            for index, daemon in enumerate(daemons):
                print(f"--- node{index} {daemon.peer_id[-6:]} ---\n{daemon.log_tail(30)}")
        # Not asserted: that the majority's coordinator keeps its term across the heal. It
        # held in 5 of 5 runs on a lightly loaded 2-core machine, and failed in most runs
        # with a load average of 5-13, where heartbeats themselves arrived more than the
        # 0.6 s election timeout apart (README: Clusters at run time); the procs tests now
        # run with 1.5..3.0 s timeouts (tests/daemon/conftest.py).
        print(
            f"kept across the heal: {final == kept}; elections won after it: "
            f"{sum(won_after_heal.values()) - sum(won_before_heal.values()):.0f}"
        )
    finally:
        for daemon in daemons:
            daemon.stop()
