"""Fencing of coordinator commands: each refusal with its own error and reason, term proofs
(forged, short, duplicated, foreign, misdirected), persistence, and the registry rule for
entries written by coordinators."""

from __future__ import annotations

import json

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from p2p.identity import NodeIdentity
from scheduler.election_wire import TermProof, Vote
from scheduler.fencing import (
    REASONS,
    BadSignature,
    BadTermProof,
    FenceFileError,
    FenceKeeper,
    FenceState,
    FileFenceStore,
    MemoryFenceStore,
    NotCoordinator,
    NoTermProof,
    NotVoter,
    ReplayedSequence,
    StaleTerm,
    entry_wins,
    make_proof,
    sign_command,
    sign_vote,
)

A, B, C = NodeIdentity.generate(), NodeIdentity.generate(), NodeIdentity.generate()
D, OUTSIDER = NodeIdentity.generate(), NodeIdentity.generate()
VOTERS = frozenset({A.peer_id, B.peer_id, C.peer_id})


def keeper(store=None, voters=VOTERS) -> FenceKeeper:
    return FenceKeeper(store or MemoryFenceStore(), lambda cluster: voters)


def proof(candidate: NodeIdentity, term: int, by=(A, B, C), cluster: str = "c1") -> TermProof:
    """Votes by `by` for `candidate` in `term`, as the winner assembles them."""
    votes = {v.peer_id: sign_vote(v, cluster, term, candidate.peer_id) for v in by}
    return make_proof(cluster, term, candidate.peer_id, votes)


def cmd(
    ident: NodeIdentity,
    term: int,
    seq: int,
    cluster: str = "c1",
    body: bytes = b"x",
    with_proof: TermProof | None | bool = True,
):
    """A signed command; by default with a proof of its term signed by every voter."""
    command = sign_command(ident, cluster, term, seq, "assign", body)
    if with_proof is True:
        with_proof = proof(ident, term, cluster=cluster)
    return msgspec.structs.replace(command, proof=with_proof or None)


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
    assert k.state("c1") == FenceState(4, 0, None)  # the election names no coordinator here
    with pytest.raises(NoTermProof):
        k.check(cmd(A, 4, 1, with_proof=False))
    k.check(cmd(B, 4, 1))  # B proves term 4
    with pytest.raises(NotCoordinator):
        k.check(cmd(A, 4, 2))  # even with a (forged-looking but valid) proof of its own


def test_a_proven_term_needs_no_proof_again_and_is_checked_once():
    k = keeper()
    k.check(cmd(A, 2, 1))
    for seq in range(2, 20):
        k.check(cmd(A, 2, seq, with_proof=seq % 2 == 0))
    assert k.proofs_checked == 1 and k.accepted == 19


def test_a_voter_cannot_command_a_term_it_did_not_win():
    """What a buggy or hostile voter could send for a term above the highest seen; each
    refused with its reason and counted, and none moves the fence."""
    k = keeper()
    k.check(cmd(B, 3, 1))
    t = 4
    forged_vote = Vote(B.peer_id, sign_vote(A, "c1", t, A.peer_id))  # B's name, A's key
    cases = [
        (cmd(A, t, 1, with_proof=False), NoTermProof),  # no proof at all
        (cmd(A, t, 1, with_proof=proof(A, t, by=(A,))), NoTermProof),  # its own vote only
        (cmd(A, t, 1, with_proof=proof(A, t, by=(A, OUTSIDER, D))), NoTermProof),  # foreign
        (  # the same voter twice
            cmd(A, t, 1, with_proof=TermProof("c1", t, A.peer_id, proof(A, t, by=(A,)).votes * 2)),
            BadTermProof,
        ),
        (  # a vote whose signature is not its voter's
            cmd(
                A,
                t,
                1,
                with_proof=TermProof("c1", t, A.peer_id, (*proof(A, t, (A,)).votes, forged_vote)),
            ),
            BadTermProof,
        ),
        (cmd(A, t, 1, with_proof=proof(B, t)), BadTermProof),  # another candidate's proof
        (cmd(A, t, 1, with_proof=proof(A, t - 1)), BadTermProof),  # another term's
        (cmd(A, t, 1, with_proof=proof(A, t, cluster="c2")), BadTermProof),  # another cluster's
        (  # the fields say term t, the votes were signed for term t - 1
            cmd(A, t, 1, with_proof=TermProof("c1", t, A.peer_id, proof(A, t - 1).votes)),
            BadTermProof,
        ),
    ]
    for command, error in cases:
        with pytest.raises(error):
            k.check(command)
    assert k.refused == {"no_term_proof": 3, "bad_term_proof": 6}
    assert k.state("c1") == FenceState(3, 1, B.peer_id)
    k.check(cmd(B, 3, 2))  # the real coordinator goes on


def test_a_majority_of_the_members_own_voters_is_needed():
    """Proofs are counted against the checking member's voters, which may differ by one from
    the coordinator's during a change (see scheduler/fencing.py)."""
    grown = VOTERS | {D.peer_id}  # majority 3
    k = keeper(voters=grown)
    with pytest.raises(NoTermProof):
        k.check(cmd(A, 1, 1, with_proof=proof(A, 1, by=(A, B))))  # a majority of the old 3
    k.check(cmd(A, 1, 2, with_proof=proof(A, 1, by=(A, B, C))))  # every old voter's vote
    shrunk = frozenset({A.peer_id, B.peer_id})  # C removed: its vote no longer counts
    k = keeper(voters=shrunk)
    with pytest.raises(NoTermProof):
        k.check(cmd(A, 1, 1, with_proof=proof(A, 1, by=(A, C))))
    k.check(cmd(A, 1, 2, with_proof=proof(A, 1, by=(A, B, C))))


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
    assert json.loads(path.read_text())["c1"] == {"term": 7, "seq": 3, "coordinator": A.peer_id}
    restarted = keeper(FileFenceStore(path))
    assert restarted.state("c1") == FenceState(7, 3, A.peer_id)
    assert restarted.highest("c2") == 2
    with pytest.raises(ReplayedSequence):
        restarted.check(cmd(A, 7, 3))
    with pytest.raises(StaleTerm):
        restarted.check(cmd(A, 6, 9))
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_a_fence_file_written_before_term_proofs_is_read_and_a_damaged_one_refused(tmp_path):
    path = tmp_path / "fences.json"
    path.write_text(json.dumps({"c1": {"term": 5, "seq": 2, "coordinator": B.peer_id}}))
    assert FileFenceStore(path).load() == {"c1": FenceState(5, 2, B.peer_id)}
    for damaged in (
        "{",
        "[]",
        '{"c1": {"term": "5", "seq": 2}}',
        '{"c1": {"term": 5, "seq": 2, "proof": 1}}',
        '{"c1": {"term": -1, "seq": 0}}',
        '{"c1": 7}',
    ):
        path.write_text(damaged)
        with pytest.raises(FenceFileError) as info:
            FileFenceStore(path)
        assert isinstance(info.value, ValueError)  # the daemon's one-line refusal to start
        assert str(path) in str(info.value) and "\n" not in str(info.value)


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


_SIGS: dict[tuple[str, str, int, str, str], bytes] = {}


def _sig(key: NodeIdentity, cluster: str, term: int, candidate: str) -> bytes:
    at = (key.peer_id, cluster, term, candidate, "")
    if at not in _SIGS:
        _SIGS[at] = sign_vote(key, cluster, term, candidate)
    return _SIGS[at]


KINDS = ("valid", "other_term", "other_candidate", "other_key", "garbage")
vote_specs = st.lists(
    st.tuples(st.sampled_from([A, B, C, D]), st.sampled_from(KINDS)), min_size=0, max_size=6
)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    candidate=st.sampled_from([A, B, C]),
    fields=st.tuples(st.sampled_from(["c1", "c2"]), st.sampled_from([5, 4]), st.booleans()),
    specs=vote_specs,
)
def test_a_proof_is_taken_exactly_when_a_majority_of_distinct_voters_signed_it(
    candidate, fields, specs
):
    """Random proofs (votes by voters and an outsider, valid or signed for another term,
    candidate or by another key, duplicates, misdirected fields) against an oracle."""
    cluster, term, for_candidate = fields
    named = candidate if for_candidate else (B if candidate is not B else C)
    votes = []
    for voter, kind in specs:
        signed_term, signed_for, key = 5, candidate.peer_id, voter
        if kind == "other_term":
            signed_term = 6
        elif kind == "other_candidate":
            signed_for = D.peer_id
        elif kind == "other_key":
            key = OUTSIDER
        sig = b"\x00" * 64 if kind == "garbage" else _sig(key, "c1", signed_term, signed_for)
        votes.append(Vote(voter.peer_id, sig))
    command = cmd(candidate, 5, 1, with_proof=False)
    command = msgspec.structs.replace(
        command, proof=TermProof(cluster, term, named.peer_id, tuple(votes))
    )
    counted = [(v, k) for v, k in specs if v is not D]
    misdirected = (cluster, term, for_candidate) != ("c1", 5, True)
    duplicated = len({v.peer_id for v, _ in specs}) < len(specs)
    if misdirected or duplicated:
        expected = "bad_term_proof"
    elif len(counted) < 2:
        expected = "no_term_proof"
    elif any(k != "valid" for _, k in counted):
        expected = "bad_term_proof"
    else:
        expected = None
    k = keeper()
    try:
        k.check(command)
        got = None
    except (NoTermProof, BadTermProof) as exc:
        got = exc.reason
        assert k.highest("c1") == 0
    assert got == expected, (specs, fields)
