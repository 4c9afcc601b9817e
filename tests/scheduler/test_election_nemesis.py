"""The election's nemesis (see tests/scheduler/nemesis.py): seeded random schedules of
partitions (one-way too), loss, delay, pauses past the lease, crashes with restarts and
skewed clocks, for clusters of 3, 5 and 7 voters.

`make test` runs SCHEDULES_PER_SIZE schedules per size (a few seconds); the full run of
1,000 and more is `python bench/election_nemesis.py`, or here with
GRIDMESH_NEMESIS_SCHEDULES=N (per size). A failure names its seed and size for replay.
"""

from __future__ import annotations

import os

import pytest

from tests.scheduler.nemesis import CONVERGE_S, describe, run_schedule

SCHEDULES_PER_SIZE = int(os.environ.get("GRIDMESH_NEMESIS_SCHEDULES", "6"))
FIRST_SEED = int(os.environ.get("GRIDMESH_NEMESIS_SEED", "1000"))


@pytest.mark.parametrize("size", [3, 5, 7])
def test_nemesis_schedules(size):
    failures = []
    for seed in range(FIRST_SEED, FIRST_SEED + SCHEDULES_PER_SIZE):
        result = run_schedule(seed, size)
        if not result.ok:
            failures.append(describe(result))
            continue
        assert result.converge_s is not None and result.converge_s <= CONVERGE_S
        assert result.failover_s is not None
    assert not failures, "\n".join(failures)


def test_the_nemesis_catches_two_coordinators_in_one_term(monkeypatch):
    """The per-step check is real: a core that grants every vote elects two in a term."""
    from scheduler import election

    def grant_everything(self, sender, msg, now, out):
        if not msg.pre and msg.term > self.term:
            self._adopt_term(msg.term, now, out)
        self.voted_for = sender
        term = msg.term
        out.append(election.Send(sender, election.VoteReply(self.cluster, term, True, msg.pre)))

    monkeypatch.setattr(election.ElectionCore, "_on_vote_request", grant_everything)
    caught = [run_schedule(seed, 5) for seed in range(FIRST_SEED, FIRST_SEED + 10)]
    assert any("two coordinators in term" in v for r in caught for v in r.violations)


def test_the_nemesis_catches_a_stale_command_accepted(monkeypatch):
    """The fencing check is real: a keeper that forgets terms lets a zombie's command in."""
    from scheduler import fencing

    real_check = fencing.FenceKeeper._check

    def no_stale_check(self, cmd):
        state = self.state(cmd.cluster)
        if cmd.term < state.term:
            self._states[cmd.cluster] = fencing.FenceState(cmd.term, 0, None)
        real_check(self, cmd)

    monkeypatch.setattr(fencing.FenceKeeper, "_check", no_stale_check)
    caught = [run_schedule(seed, 3) for seed in range(FIRST_SEED, FIRST_SEED + 20)]
    assert any("accepted a command of term" in v for r in caught for v in r.violations)


def test_the_nemesis_catches_a_forged_term_accepted(monkeypatch):
    """The term-proof check is real: a keeper that takes any proof lets a forger's command in
    (the members that are not the coordinator forge claims of the next term)."""
    from scheduler import fencing

    monkeypatch.setattr(fencing.FenceKeeper, "_prove", lambda self, cmd, voters: None)
    caught = [run_schedule(seed, 3) for seed in range(FIRST_SEED, FIRST_SEED + 5)]
    assert any("which did not win it" in v for r in caught for v in r.violations)
    assert all(r.forgeries_sent > 0 for r in caught)
