"""Fencing of coordinator commands: a deposed, paused or partitioned coordinator's command is
refused by every member that has seen a newer term, and nobody's command is taken for a term
it cannot prove it won.

A command carries its cluster, the coordinator's term and a sequence number that rises within
the term, and is signed by the coordinator's node key (`p2p.identity`). Each member keeps a
`FenceKeeper`: per cluster the highest term it has seen (from the election and from
commands), the last sequence number accepted in that term and the term's coordinator once
proven, persisted through a `FenceStore` before a command is accepted.

Term proofs. A voter that grants its vote (not a pre-vote) signs (cluster, term, candidate)
with its node key (`sign_vote`); it grants one vote per term, written to disk first, so an
honest voter never signs two candidates for one term. The winner assembles a `TermProof` from
the signed votes it collected (its own included) and sends it with its commands. A member
takes a command of a term whose coordinator it does not know yet only with a proof:
signatures by distinct voters of the cluster as this member knows them (the membership
registry), a majority of them, all for the command's cluster, term and signer. Once a
proof is accepted the term's coordinator is recorded in the fence, so later commands of the
term need none and no proof is checked twice (a proof costs one signature check per vote).
The election's own view of the coordinator (a heartbeat's sender) is never recorded here: a
heartbeat is unsigned and any voter could send one for any term.

Voter sets that differ by one. Voters change one at a time from the registry, which reaches
members at different moments, so a proof made under one voter set may be checked against the
next. The rule is a strict majority of the checking member's set; the coordinator keeps
adding the votes that come in after it won (usually every voter's), so an added voter rarely
leaves its proof short, and a coordinator whose proof is not a majority of its own new set
steps down (`scheduler.election_driver`): the next term is proven under the new set. A member
whose registry lags may refuse a term for a moment (`no_term_proof`, retried). Majorities of
two sets that differ by one voter always share a voter, so with honest voters two candidates
can never both prove a term, to any two members, across such a change.

Refusals, each with its own error and reason code (a metrics label):
- `not_voter`: the signer is not a voter of the cluster;
- `bad_signature`: the signature does not match the signer;
- `stale_term`: the term is lower than the highest term seen;
- `replayed_seq`: the sequence number is not above the last one accepted in the term;
- `not_coordinator`: the term's coordinator is known and is someone else;
- `no_term_proof`: a term whose coordinator is not known here, and no proof, or one with
  the votes of fewer than a majority of the voters this member knows;
- `bad_term_proof`: a proof for another cluster, term or candidate, a voter twice, or a vote
  signature that does not verify (a forgery: an honest coordinator never sends one).

`entry_wins` is the rule for registry entries written by a coordinator: an entry from a lower
term never overrides one from a higher term.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from p2p import files, identity
from scheduler.election import majority
from scheduler.election_wire import MAX_PROOF_VOTES, WIRE_VERSION, Command, TermProof, Vote


class FenceError(Exception):
    """A command refused; `reason` is the metrics label."""

    reason = "refused"

    def __init__(self, command: Command, detail: str) -> None:
        super().__init__(f"{self.reason}: {detail}")
        self.command = command
        self.detail = detail


class BadSignature(FenceError):
    reason = "bad_signature"


class NotVoter(FenceError):
    reason = "not_voter"


class StaleTerm(FenceError):
    reason = "stale_term"


class ReplayedSequence(FenceError):
    reason = "replayed_seq"


class NotCoordinator(FenceError):
    reason = "not_coordinator"


class NoTermProof(FenceError):
    reason = "no_term_proof"


class BadTermProof(FenceError):
    reason = "bad_term_proof"


REASONS = tuple(
    cls.reason
    for cls in (
        BadSignature,
        NotVoter,
        StaleTerm,
        ReplayedSequence,
        NotCoordinator,
        NoTermProof,
        BadTermProof,
    )
)


def signing_bytes(
    cluster: str, term: int, seq: int, action: str, body: bytes, signer: str
) -> bytes:
    """What the coordinator signs: every field but the signature, with a domain prefix."""
    return b"gridmesh coordinator command v1\n" + msgspec.msgpack.encode(
        [WIRE_VERSION, cluster, term, seq, action, body, signer]
    )


def sign_command(
    ident: identity.NodeIdentity, cluster: str, term: int, seq: int, action: str, body: bytes
) -> Command:
    signer = ident.peer_id
    sig = ident.sign(signing_bytes(cluster, term, seq, action, body, signer))
    return Command(cluster, term, seq, action, body, signer, sig)


def signature_ok(cmd: Command) -> bool:
    message = signing_bytes(cmd.cluster, cmd.term, cmd.seq, cmd.action, cmd.body, cmd.signer)
    return cmd.v == WIRE_VERSION and identity.verify(cmd.signer, message, cmd.sig)


def vote_signing_bytes(cluster: str, term: int, candidate: str) -> bytes:
    """What a voter signs when it grants its vote: the vote, with a domain prefix (no other
    signed message of ours starts with it)."""
    return b"gridmesh term vote v1\n" + msgspec.msgpack.encode([cluster, term, candidate])


def sign_vote(ident: identity.NodeIdentity, cluster: str, term: int, candidate: str) -> bytes:
    return ident.sign(vote_signing_bytes(cluster, term, candidate))


def vote_ok(voter: str, cluster: str, term: int, candidate: str, sig: bytes) -> bool:
    return identity.verify(voter, vote_signing_bytes(cluster, term, candidate), sig)


def make_proof(cluster: str, term: int, candidate: str, votes: dict[str, bytes]) -> TermProof:
    """A term's proof from its signed votes (voter -> signature), at most MAX_PROOF_VOTES of
    them, in a fixed order."""
    chosen = sorted(votes.items())[:MAX_PROOF_VOTES]
    return TermProof(cluster, term, candidate, tuple(Vote(v, sig) for v, sig in chosen))


def proof_problem(proof: TermProof | None, voters: frozenset[str]) -> str | None:
    """Why `proof` does not prove its term to a member whose voters are `voters`, or None.

    The reason comes first (`no_term_proof: ...` or `bad_term_proof: ...`). Cheap checks
    first: a proof with too few voters costs no signature check."""
    if proof is None:
        return "no_term_proof: the command carries no proof of its term"
    seen: set[str] = set()
    counted: list[Vote] = []
    for vote in proof.votes:
        if vote.voter in seen:
            return f"bad_term_proof: {vote.voter[:64]} signed twice"
        seen.add(vote.voter)
        if vote.voter in voters:  # a voter since removed: its vote does not count here
            counted.append(vote)
    if len(counted) < majority(voters):
        return (
            f"no_term_proof: {len(counted)} votes of this cluster's {len(voters)} voters, "
            f"{majority(voters)} needed"
        )
    for vote in counted:
        if not vote_ok(vote.voter, proof.cluster, proof.term, proof.candidate, vote.sig):
            return f"bad_term_proof: {vote.voter[:64]}'s vote does not verify"
    return None


@dataclass(frozen=True)
class FenceState:
    """One cluster's fence: the highest term seen, the last sequence accepted in it, and the
    term's coordinator when known."""

    term: int = 0
    seq: int = 0
    coordinator: str | None = None


class FenceFileError(ValueError):
    """A fence file this version cannot read."""


class _StoredFence(msgspec.Struct, forbid_unknown_fields=True):
    term: int
    seq: int
    coordinator: str | None = None

    def state(self) -> FenceState:
        if self.term < 0 or self.seq < 0:
            raise msgspec.ValidationError("a term and a sequence are never negative")
        return FenceState(self.term, self.seq, self.coordinator)


class FenceStore(Protocol):
    def load(self) -> dict[str, FenceState]: ...

    def save(self, cluster: str, state: FenceState) -> None:
        """Durably record `state` (returns once it is on disk)."""
        ...


class MemoryFenceStore:
    """A store that survives a simulated restart (keep the object), not a real one."""

    def __init__(self) -> None:
        self.states: dict[str, FenceState] = {}
        self.writes = 0

    def load(self) -> dict[str, FenceState]:
        return dict(self.states)

    def save(self, cluster: str, state: FenceState) -> None:
        self.states[cluster] = state
        self.writes += 1


class FileFenceStore:
    """Every cluster's fence in one JSON file, replaced atomically (write, fsync, rename)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._states = self._read()

    def _read(self) -> dict[str, FenceState]:
        """The file as written by any version so far ({cluster: {term, seq, coordinator}});
        FenceFileError (a ValueError, one line) for anything else: a node must not start
        with its fences forgotten."""
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise FenceFileError(f"{self.path}: not a fence file ({exc})") from None
        if not isinstance(raw, dict):
            raise FenceFileError(f"{self.path}: not a fence file (not a JSON object)")
        states = {}
        for name, fields in raw.items():
            try:
                states[name] = msgspec.convert(fields, _StoredFence, strict=True).state()
            except msgspec.ValidationError as exc:
                raise FenceFileError(f"{self.path}: cluster {name[:64]!r}: {exc}") from None
        return states

    def load(self) -> dict[str, FenceState]:
        return dict(self._states)

    def save(self, cluster: str, state: FenceState) -> None:
        self._states[cluster] = state
        data = json.dumps({name: asdict(s) for name, s in sorted(self._states.items())})
        files.replace_private(self.path, data.encode())


class FenceKeeper:
    """One member's fences, for every cluster it belongs to.

    `voters(cluster)` names the cluster's voters now (from the membership registry)."""

    def __init__(self, store: FenceStore, voters: Callable[[str], frozenset[str]]) -> None:
        self._store = store
        self._voters = voters
        self._states: dict[str, FenceState] = store.load()
        self.refused: Counter[str] = Counter()  # reason -> count, for /metrics
        self.accepted = 0
        self.proofs_checked = 0  # proofs whose votes were verified (once per term)

    def state(self, cluster: str) -> FenceState:
        return self._states.get(cluster, FenceState())

    def highest(self, cluster: str) -> int:
        return self.state(cluster).term

    def observe_term(self, cluster: str, term: int) -> None:
        """The local election saw `term`: persist a rise. (Not its coordinator: the election
        learns it from unsigned heartbeats; the fence learns it from a proof.)"""
        if term > self.state(cluster).term:
            self._save(cluster, FenceState(term, 0, None))

    def check(self, cmd: Command) -> None:
        """Accept `cmd` (its term and sequence recorded durably first) or raise FenceError."""
        try:
            self._check(cmd)
        except FenceError as exc:
            self.refused[exc.reason] += 1
            raise
        self.accepted += 1

    def _check(self, cmd: Command) -> None:
        voters = self._voters(cmd.cluster)
        # the cheap check first: a flood from non-voters costs no signature checks
        if cmd.signer not in voters:
            raise NotVoter(cmd, f"{cmd.signer[:64]} is not a voter of {cmd.cluster}")
        current = self.state(cmd.cluster)
        if cmd.term < current.term:  # before the signature: a stale command costs nothing
            raise StaleTerm(cmd, f"term {cmd.term} is below {current.term}, already seen")
        if not signature_ok(cmd):
            raise BadSignature(cmd, f"the signature is not {cmd.signer[:64]}'s")
        known = cmd.term == current.term and current.coordinator is not None
        if known and current.coordinator != cmd.signer:
            raise NotCoordinator(
                cmd, f"term {cmd.term}'s coordinator is {str(current.coordinator)[:64]}"
            )
        if cmd.term == current.term and cmd.seq <= current.seq:
            raise ReplayedSequence(
                cmd, f"sequence {cmd.seq} is not above {current.seq} in term {cmd.term}"
            )
        if not known:
            self._prove(cmd, voters)
        self._save(cmd.cluster, FenceState(cmd.term, cmd.seq, cmd.signer))

    def _prove(self, cmd: Command, voters: frozenset[str]) -> None:
        """The command's term is proven to be its signer's, or NoTermProof / BadTermProof."""
        proof = cmd.proof
        if proof is not None and (proof.cluster, proof.term, proof.candidate) != (
            cmd.cluster,
            cmd.term,
            cmd.signer,
        ):
            raise BadTermProof(
                cmd,
                f"the proof is for {proof.candidate[:64]} in term {proof.term} of "
                f"{proof.cluster}, not for the command's signer, term and cluster",
            )
        if proof is not None:
            self.proofs_checked += 1
        problem = proof_problem(proof, voters)
        if problem is not None:
            reason, _, detail = problem.partition(": ")
            error = BadTermProof if reason == BadTermProof.reason else NoTermProof
            raise error(cmd, detail)

    def _save(self, cluster: str, state: FenceState) -> None:
        self._store.save(cluster, state)
        self._states[cluster] = state


def entry_wins(incoming_term: int | None, current_term: int | None, otherwise: bool) -> bool:
    """Whether a registry entry written by a coordinator in `incoming_term` replaces the
    stored one written in `current_term`: the higher term wins; when the terms are equal or
    either entry carries none, the registry's usual order decides (`otherwise`)."""
    if incoming_term is None or current_term is None or incoming_term == current_term:
        return otherwise
    return incoming_term > current_term
