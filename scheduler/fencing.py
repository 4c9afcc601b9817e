"""Fencing of coordinator commands: a deposed, paused or partitioned coordinator's command is
refused by every member that has seen a newer term.

A command carries its cluster, the coordinator's term and a sequence number that rises within
the term, and is signed by the coordinator's node key (`p2p.identity`). Each member keeps a
`FenceKeeper`: per cluster the highest term it has seen (from the election and from
commands), the last sequence number accepted in that term and the term's coordinator when
known, persisted through a `FenceStore` before a command is accepted. It refuses, each with
its own error and reason code (a metrics label):
- `bad_signature`: the signature does not match the signer;
- `not_voter`: the signer is not a voter of the cluster;
- `stale_term`: the term is lower than the highest term seen;
- `replayed_seq`: the sequence number is not above the last one accepted in the term;
- `not_coordinator`: the term's coordinator is known and is someone else.
The term's coordinator is known from this node's own election, or else from the first valid
command of the term (there is at most one coordinator per term, and voters are trusted to
vote, so a second signer for the same term is refused).

`entry_wins` is the rule for registry entries written by a coordinator: an entry from a lower
term never overrides one from a higher term.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import msgspec

from p2p import identity
from scheduler.election_wire import WIRE_VERSION, Command


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


REASONS = tuple(
    cls.reason for cls in (BadSignature, NotVoter, StaleTerm, ReplayedSequence, NotCoordinator)
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


@dataclass(frozen=True)
class FenceState:
    """One cluster's fence: the highest term seen, the last sequence accepted in it, and the
    term's coordinator when known."""

    term: int = 0
    seq: int = 0
    coordinator: str | None = None


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
        try:
            raw = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        return {name: FenceState(**fields) for name, fields in raw.items()}

    def load(self) -> dict[str, FenceState]:
        return dict(self._states)

    def save(self, cluster: str, state: FenceState) -> None:
        self._states[cluster] = state
        tmp = self.path.with_name(self.path.name + ".tmp")
        data = json.dumps({name: asdict(s) for name, s in sorted(self._states.items())})
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.path)


class FenceKeeper:
    """One member's fences, for every cluster it belongs to.

    `voters(cluster)` names the cluster's voters now (from the membership registry)."""

    def __init__(self, store: FenceStore, voters: Callable[[str], frozenset[str]]) -> None:
        self._store = store
        self._voters = voters
        self._states: dict[str, FenceState] = store.load()
        self.refused: Counter[str] = Counter()  # reason -> count, for /metrics
        self.accepted = 0

    def state(self, cluster: str) -> FenceState:
        return self._states.get(cluster, FenceState())

    def highest(self, cluster: str) -> int:
        return self.state(cluster).term

    def observe_term(self, cluster: str, term: int, coordinator: str | None = None) -> None:
        """The local election saw `term` (and, if known, its coordinator): persist a rise."""
        current = self.state(cluster)
        if term > current.term:
            self._save(cluster, FenceState(term, 0, coordinator))
        elif term == current.term and coordinator is not None and current.coordinator is None:
            self._save(cluster, FenceState(term, current.seq, coordinator))

    def check(self, cmd: Command) -> None:
        """Accept `cmd` (its term and sequence recorded durably first) or raise FenceError."""
        try:
            self._check(cmd)
        except FenceError as exc:
            self.refused[exc.reason] += 1
            raise
        self.accepted += 1

    def _check(self, cmd: Command) -> None:
        # the cheap check first: a flood from non-voters costs no signature checks
        if cmd.signer not in self._voters(cmd.cluster):
            raise NotVoter(cmd, f"{cmd.signer[:64]} is not a voter of {cmd.cluster}")
        if not signature_ok(cmd):
            raise BadSignature(cmd, f"the signature is not {cmd.signer[:64]}'s")
        current = self.state(cmd.cluster)
        if cmd.term < current.term:
            raise StaleTerm(cmd, f"term {cmd.term} is below {current.term}, already seen")
        if cmd.term == current.term:
            if current.coordinator is not None and current.coordinator != cmd.signer:
                raise NotCoordinator(
                    cmd, f"term {cmd.term}'s coordinator is {current.coordinator[:64]}"
                )
            if cmd.seq <= current.seq:
                raise ReplayedSequence(
                    cmd, f"sequence {cmd.seq} is not above {current.seq} in term {cmd.term}"
                )
        self._save(cmd.cluster, FenceState(cmd.term, cmd.seq, cmd.signer))

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
