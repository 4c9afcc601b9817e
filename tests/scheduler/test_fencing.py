"""Fencing of coordinator commands: each refusal with its own error and reason, persistence,
and the registry rule for entries written by coordinators."""

from __future__ import annotations

import msgspec
import pytest

from p2p.identity import NodeIdentity
from scheduler.fencing import (
    REASONS,
    BadSignature,
    FenceKeeper,
    FenceState,
    FileFenceStore,
    MemoryFenceStore,
    NotCoordinator,
    NotVoter,
    ReplayedSequence,
    StaleTerm,
    entry_wins,
    sign_command,
)

A, B, OUTSIDER = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
VOTERS = frozenset({A.peer_id, B.peer_id})


def keeper(store=None) -> FenceKeeper:
    return FenceKeeper(store or MemoryFenceStore(), lambda cluster: VOTERS)


def cmd(ident: NodeIdentity, term: int, seq: int, cluster: str = "c1", body: bytes = b"x"):
    return sign_command(ident, cluster, term, seq, "assign", body)


def test_accepts_rising_sequences_and_newer_terms():
    k = keeper()
    k.check(cmd(A, 1, 1))
    k.check(cmd(A, 1, 3))  # gaps are fine (lost messages)
    k.check(cmd(B, 2, 1))  # a new term: sequences start over
    assert k.state("c1") == FenceState(2, 1, B.peer_id) and k.accepted == 3


@pytest.mark.parametrize(
    ("first", "second", "error"),
    [
        ((A, 2, 5), (A, 1, 9), StaleTerm),
        ((A, 2, 5), (A, 2, 5), ReplayedSequence),
        ((A, 2, 5), (A, 2, 4), ReplayedSequence),
        ((A, 2, 5), (B, 2, 6), NotCoordinator),
        ((A, 2, 5), (OUTSIDER, 3, 1), NotVoter),
    ],
)
def test_refusals_are_typed_and_counted(first, second, error):
    k = keeper()
    k.check(cmd(*first))
    with pytest.raises(error) as info:
        k.check(cmd(*second))
    assert info.value.reason in REASONS
    assert k.refused == {error.reason: 1}
    assert k.state("c1") == FenceState(2, 5, A.peer_id)  # a refusal changes nothing


def test_forged_and_altered_commands_are_refused_as_bad_signatures():
    k = keeper()
    forged = msgspec.structs.replace(cmd(OUTSIDER, 1, 1), signer=A.peer_id)
    altered = msgspec.structs.replace(cmd(A, 1, 1), body=b"y")
    newer_term = msgspec.structs.replace(cmd(A, 1, 1), term=9)
    for bad in (forged, altered, newer_term):
        with pytest.raises(BadSignature):
            k.check(bad)
    assert k.refused["bad_signature"] == 3 and k.highest("c1") == 0


def test_a_term_seen_in_the_election_fences_the_deposed_coordinator():
    k = keeper()
    k.check(cmd(A, 3, 1))
    k.observe_term("c1", 4)  # B won term 4; A was paused and sends on
    with pytest.raises(StaleTerm):
        k.check(cmd(A, 3, 2))
    k.observe_term("c1", 4, B.peer_id)
    with pytest.raises(NotCoordinator):
        k.check(cmd(A, 4, 1))
    k.check(cmd(B, 4, 1))


def test_clusters_are_fenced_apart():
    k = keeper()
    k.check(cmd(A, 5, 1, cluster="c1"))
    k.check(cmd(A, 1, 1, cluster="c2"))
    assert (k.highest("c1"), k.highest("c2")) == (5, 1)


def test_the_fence_survives_a_restart_in_a_file(tmp_path):
    path = tmp_path / "fences.json"
    k = keeper(FileFenceStore(path))
    k.check(cmd(A, 7, 3))
    k.observe_term("c2", 2)
    restarted = keeper(FileFenceStore(path))
    assert restarted.state("c1") == FenceState(7, 3, A.peer_id)
    assert restarted.highest("c2") == 2
    with pytest.raises(ReplayedSequence):
        restarted.check(cmd(A, 7, 3))
    with pytest.raises(StaleTerm):
        restarted.check(cmd(A, 6, 9))
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_the_state_is_saved_before_a_command_counts_as_accepted():
    class Failing(MemoryFenceStore):
        def save(self, cluster, state):
            raise OSError("disk full")

    k = keeper(Failing())
    with pytest.raises(OSError):
        k.check(cmd(A, 1, 1))
    assert k.accepted == 0 and k.highest("c1") == 0


def test_entries_from_a_lower_term_never_override_a_higher_one():
    assert entry_wins(5, 4, otherwise=False) is True
    assert entry_wins(4, 5, otherwise=True) is False
    assert entry_wins(5, 5, otherwise=True) is True
    assert entry_wins(5, 5, otherwise=False) is False
    assert entry_wins(None, 5, otherwise=True) is True
    assert entry_wins(3, None, otherwise=False) is False
