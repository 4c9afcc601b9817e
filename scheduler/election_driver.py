"""Runs `scheduler.election.ElectionCore` on the `p2p.network.Network` seam.

One `ElectionRouter` per node owns the two protocols: `ELECTION_PROTOCOL` (vote requests,
votes, heartbeats and their answers, each one request whose answer is empty: the election is
made of one-way messages, so a lost answer costs nothing) and `COMMAND_PROTOCOL` (the
coordinator's signed commands). It decodes each message (bad ones are dropped and counted by
reason), and hands it to the `ElectionDriver` of its cluster, or to the node's `FenceKeeper`.

An `ElectionDriver` runs one cluster's core in one task: it feeds the core the messages of its
inbox and the timer, and carries out the core's effects in order: a `Persist` is awaited
(through the injected `ElectionStore`) before any later message leaves, so a vote is on disk
before it is sent. Time comes from an injected `Clock`, this node's monotonic clock
(`trio.current_time` by default; a `p2p.testing.faults.SkewedClock` in simulations); the
driver never reads wall-clock time and never sends a time.

Term proofs (`scheduler.fencing`): the driver signs each vote it grants (not pre-votes) with
the node key, refuses (drops, counted) a granted vote whose signature is missing or wrong, and
as coordinator sends its commands with the term's proof, made from the signed votes its core
kept; to a member that already accepted a command of the term it sends none (the member's
fence remembers the term's coordinator), and sends it again if the member asks
(`no_term_proof`). A coordinator whose proof is no longer a majority of its voters after a
voter change steps down, so that the next term is proven under the new set.

`freeze`/`thaw` are for fault tests: a frozen driver does nothing, as a SIGSTOPped process,
while messages pile up in its inbox (bounded; the overflow is dropped and counted); thawed, it
first lets the core look at its clock (a coordinator past its lease steps down) and then
works through the backlog.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated, Any, Protocol

import msgspec
import trio

from p2p import codec, files, identity
from p2p.network import NetworkError, Requests
from scheduler import election_wire as wire
from scheduler.election import (
    Effect,
    ElectionCore,
    ElectionSettings,
    LeaderChanged,
    Persist,
    PersistentState,
    Role,
    Send,
    majority,
)
from scheduler.fencing import (
    FenceError,
    FenceKeeper,
    NoTermProof,
    make_proof,
    sign_command,
    sign_vote,
    vote_ok,
)

log = logging.getLogger(__name__)

INBOX_SIZE = 256  # messages waiting for a driver; more are dropped (a peer cannot flood memory)
SEND_TIMEOUT_S = 1.0  # one message's delivery; a later heartbeat or vote supersedes it
SLOW_SEND_S = 0.1  # a delivery slower than this is logged (debug)
# the core's counters whose growth is logged with its reason (`ElectionDriver._explain`)
_EXPLAINED = frozenset(
    {
        "pre_votes_started",
        "elections_started",
        "elections_won",
        "lease_lost",
        "lease_lapsed",
        "pre_votes_granted",
        "votes_granted",
    }
)


class Clock(Protocol):
    def now(self) -> float:
        """This node's monotonic clock, in seconds."""
        ...

    def trio_time(self, local: float) -> float:
        """The `trio.current_time()` at which `now()` shows `local`."""
        ...


class TrioClock:
    """trio's clock (monotonic; virtual under a MockClock)."""

    def now(self) -> float:
        return trio.current_time()

    def trio_time(self, local: float) -> float:
        return local


class ElectionStore(Protocol):
    def load(self, cluster: str) -> PersistentState | None: ...

    async def save(self, cluster: str, state: PersistentState) -> None:
        """Returns once `state` is durable."""
        ...


class MemoryElectionStore:
    """Keeps state across simulated restarts (keep the object), not real ones."""

    def __init__(self) -> None:
        self.states: dict[str, PersistentState] = {}
        self.writes = 0

    def load(self, cluster: str) -> PersistentState | None:
        return self.states.get(cluster)

    async def save(self, cluster: str, state: PersistentState) -> None:
        self.states[cluster] = state
        self.writes += 1
        await trio.lowlevel.checkpoint()


class ElectionFileError(ValueError):
    """An election file this version cannot read."""


class _StoredVote(msgspec.Struct, forbid_unknown_fields=True):
    term: Annotated[int, msgspec.Meta(ge=0)]
    voted_for: str | None = None


class FileElectionStore:
    """Every cluster's term and vote in one JSON file, replaced atomically (fsynced).

    The format ({cluster: {term, voted_for}}) is the same since the first version; anything
    else is an ElectionFileError (one line): a node must not start with its votes forgotten,
    or it could vote twice in a term."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raw = {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ElectionFileError(f"{path}: not an election file ({exc})") from None
        if not isinstance(raw, dict):
            raise ElectionFileError(f"{path}: not an election file (not a JSON object)")
        self._states = {}
        for name, fields in raw.items():
            try:
                stored = msgspec.convert(fields, _StoredVote, strict=True)
            except msgspec.ValidationError as exc:
                raise ElectionFileError(f"{path}: cluster {name[:64]!r}: {exc}") from None
            self._states[name] = PersistentState(stored.term, stored.voted_for)

    def load(self, cluster: str) -> PersistentState | None:
        return self._states.get(cluster)

    async def save(self, cluster: str, state: PersistentState) -> None:
        self._states[cluster] = state
        data = json.dumps(
            {n: {"term": s.term, "voted_for": s.voted_for} for n, s in sorted(self._states.items())}
        ).encode()
        await trio.to_thread.run_sync(files.replace_private, self.path, data)


class NotCoordinatorError(Exception):
    """This node does not hold the cluster's coordinator lease: it may not issue commands."""


CommandHandler = Callable[[wire.Command], None]


class ElectionRouter:
    """One node's election and command protocols, dispatching to its clusters' drivers."""

    def __init__(
        self,
        net: Requests,
        fence: FenceKeeper,
        *,
        on_command: CommandHandler | None = None,
    ) -> None:
        self.net = net
        self.fence = fence
        self.on_command = on_command or (lambda cmd: None)
        self.drivers: dict[str, ElectionDriver] = {}
        self.stats: Counter[str] = Counter()  # refusals by reason, for /metrics
        net.set_request_handler(wire.ELECTION_PROTOCOL, self._on_election)
        net.set_request_handler(wire.COMMAND_PROTOCOL, self._on_command)

    def voters(self, cluster: str) -> frozenset[str]:
        driver = self.drivers.get(cluster)
        return driver.core.voters if driver is not None and driver.ready else frozenset()

    async def _on_election(self, sender: str, payload: bytes) -> bytes:
        try:
            message = wire.decode_election(payload)
        except wire.ElectionWireError as exc:
            self.stats[f"election_{exc.reason}"] += 1
            return b""
        driver = self.drivers.get(message.cluster)
        if driver is None:
            self.stats["election_unknown_cluster"] += 1
            return b""
        if isinstance(message, wire.VoteReply) and message.granted and not message.pre:
            # a vote counts only signed: it is a piece of the term's proof
            if message.proof is None:
                self.stats["election_unsigned_vote"] += 1
                return b""
            if not vote_ok(sender, message.cluster, message.term, self.net.peer_id, message.proof):
                self.stats["election_bad_vote_signature"] += 1
                return b""
        driver.deliver(sender, message)
        return b""

    async def _on_command(self, sender: str, payload: bytes) -> bytes:
        try:
            command = wire.decode_command(payload)
        except wire.ElectionWireError as exc:
            self.stats[f"command_{exc.reason}"] += 1
            return codec.encode({"v": wire.WIRE_VERSION, "refused": exc.reason})
        driver = self.drivers.get(command.cluster)
        if driver is not None and driver.frozen:  # a stopped process answers nothing
            await driver.thawed()
        try:
            self.fence.check(command)
        except FenceError as exc:
            self.stats[f"command_{exc.reason}"] += 1
            return codec.encode({"v": wire.WIRE_VERSION, "refused": exc.reason})
        self.stats["command_accepted"] += 1
        self.on_command(command)
        return codec.encode({"v": wire.WIRE_VERSION, "refused": None})


class ElectionDriver:
    """One cluster's election on this node; `run()` until cancelled."""

    def __init__(
        self,
        router: ElectionRouter,
        cluster: str,
        voters: frozenset[str],
        store: ElectionStore,
        *,
        ident: identity.NodeIdentity | None = None,
        settings: ElectionSettings | None = None,
        clock: Clock | None = None,
        rng: random.Random | None = None,
        observer: Callable[[ElectionDriver], None] | None = None,
        send_timeout_s: float = SEND_TIMEOUT_S,
    ) -> None:
        self.router = router
        self.cluster = cluster
        self.peer_id = router.net.peer_id
        self._initial_voters = frozenset(voters)
        self.store = store
        self.ident = ident
        self.settings = settings or ElectionSettings()
        self.clock: Clock = clock or TrioClock()
        self._rng = rng or random.Random()
        self._observer = observer or (lambda driver: None)
        self.send_timeout_s = send_timeout_s
        self.stats: Counter[str] = Counter()
        self._core: ElectionCore | None = None
        self._inbox_send, self._inbox = trio.open_memory_channel[tuple[str, Any]](INBOX_SIZE)
        self._thawed = trio.Event()
        self._thawed.set()
        self._nursery: trio.Nursery | None = None
        self._seq = 0
        self._seq_term = -1
        self._proof: wire.TermProof | None = None  # this term's, while coordinating
        self._proof_votes = 0  # the votes it was made from
        self._own_vote: tuple[int, bytes] | None = None  # (term, this node's signed vote)
        self._proved: set[str] = set()  # members that accepted a command of _seq_term

    # -- state -------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._core is not None

    @property
    def core(self) -> ElectionCore:
        if self._core is None:
            raise RuntimeError("the driver has not started")
        return self._core

    def is_coordinator(self) -> bool:
        return self._core is not None and self._core.is_coordinator(self.clock.now())

    @property
    def frozen(self) -> bool:
        return not self._thawed.is_set()

    def freeze(self) -> None:
        if self._thawed.is_set():
            self._thawed = trio.Event()

    def thaw(self) -> None:
        self._thawed.set()

    async def thawed(self) -> None:
        """Returns once the driver is not frozen."""
        while not self._thawed.is_set():
            await self._thawed.wait()

    # -- commands ----------------------------------------------------------------------

    def sign_next_command(self, action: str, body: bytes) -> wire.Command:
        """The next command of this coordinator's term, signed; NotCoordinatorError unless
        this node holds the lease now."""
        if self.ident is None:
            raise NotCoordinatorError("this driver has no node key to sign commands")
        if not self.is_coordinator():
            raise NotCoordinatorError(f"not the coordinator of {self.cluster}")
        term = self.core.term
        if term != self._seq_term:
            self._seq_term, self._seq, self._proved = term, 0, set()
        self._seq += 1
        command = sign_command(self.ident, self.cluster, term, self._seq, action, body)
        return msgspec.structs.replace(command, proof=self.term_proof())

    def term_proof(self) -> wire.TermProof | None:
        """The proof that this node won its current term (its own signed vote and those it
        collected), while it leads; None otherwise or without a node key."""
        core = self.core
        if self.ident is None or core.role is not Role.LEADER:
            return None
        if self._own_vote is None or self._own_vote[0] != core.term:
            own = sign_vote(self.ident, self.cluster, core.term, self.peer_id)
            self._own_vote = (core.term, own)
        votes = core.vote_proofs
        votes[self.peer_id] = self._own_vote[1]
        proof = self._proof
        if proof is None or proof.term != core.term or self._proof_votes != len(votes):
            proof = self._proof = make_proof(self.cluster, core.term, self.peer_id, votes)
            self._proof_votes = len(votes)
        return proof

    def _proof_short(self) -> bool:
        """Whether, leading, this node's proof is short of a majority of its voters."""
        core = self.core
        if self.ident is None or core.role is not Role.LEADER:
            return False
        proven = set(core.vote_proofs) | {self.peer_id}
        return len(proven & core.voters) < majority(core.voters)

    async def send_command(
        self, command: wire.Command, to: Iterable[str] | None = None
    ) -> dict[str, str | None]:
        """Send `command` to the members `to` (by default every other voter; workers check
        it with a FenceKeeper whose voters come from the membership registry); per member,
        None if accepted, else the reason it was refused (`unreachable`: no answer)."""
        payload = wire.encode(command)
        bare = wire.encode(msgspec.structs.replace(command, proof=None))
        results: dict[str, str | None] = {}
        mine = command.term == self._seq_term  # else: a command of an earlier term of ours

        async def send(peer: str, data: bytes) -> str | None:
            try:
                answer = await self.router.net.request(
                    peer, wire.COMMAND_PROTOCOL, data, timeout_s=self.send_timeout_s
                )
                raw = codec.decode(answer, max_bytes=256)
                refused = raw.get("refused") if isinstance(raw, dict) else "malformed"
                return None if refused is None else str(refused)[:32]
            except (NetworkError, codec.CodecError):
                return "unreachable"

        async def one(peer: str) -> None:
            proved = mine and command.proof is not None and peer in self._proved
            refused = await send(peer, bare if proved else payload)
            if proved and refused == NoTermProof.reason:  # it forgot the term: prove it again
                self.stats["proof_resent"] += 1
                refused = await send(peer, payload)
            if mine and refused is None:
                self._proved.add(peer)
            results[peer] = refused

        async with trio.open_nursery() as nursery:
            targets = self.core.voters if to is None else frozenset(to)
            for peer in sorted(targets - {self.peer_id}):
                nursery.start_soon(one, peer)
        return results

    # -- running -----------------------------------------------------------------------

    def deliver(self, sender: str, message: wire.ElectionMessage) -> None:
        """A decoded message for this cluster (from the router)."""
        try:
            self._inbox_send.send_nowait((sender, message))
        except trio.WouldBlock:
            self.stats["inbox_full"] += 1

    def set_voters(self, voters: frozenset[str]) -> None:
        """One voter added or removed (from the membership registry)."""
        now = self.clock.now()
        effects = self.core.set_voters(frozenset(voters), now)
        if self._proof_short():
            self.stats["proof_short"] += 1
            log.info("%s: the term's proof is short of the new voters' majority", self.cluster)
            effects += self.core.step_down(now)
        if effects and self._nursery is not None:
            self._nursery.start_soon(self._apply, effects)
        with contextlib.suppress(trio.WouldBlock):  # wake the loop: a sooner deadline maybe
            self._inbox_send.send_nowait(("", None))

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        state = self.store.load(self.cluster)
        self._core = ElectionCore(
            self.cluster,
            self.peer_id,
            self._initial_voters,
            self.clock.now(),
            settings=self.settings,
            state=state,
            rng=self._rng,
        )
        self.router.drivers[self.cluster] = self
        self.router.fence.observe_term(self.cluster, self._core.term)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await self._loop()
        finally:
            if self.router.drivers.get(self.cluster) is self:
                del self.router.drivers[self.cluster]

    async def _loop(self) -> None:
        core = self.core
        while True:
            await self.thawed()
            await self._tick()
            item: tuple[str, Any] | None = None
            # never a wake-up at once: a clock's rounding must not spin this loop
            wake = max(self.clock.trio_time(core.next_deadline()), trio.current_time() + 1e-6)
            with trio.move_on_at(wake):
                item = await self._inbox.receive()
            if item is None:
                continue
            if self.frozen:  # arrived while frozen: handled after the thaw, clock first
                await self.thawed()
                await self._tick()
            sender, message = item
            if message is None:  # a wake-up (set_voters)
                continue
            self.stats["received"] += 1
            now = self.clock.now()
            before = Counter(core.stats)
            effects = core.receive(sender, message, now)
            self._explain(before, now, sender)
            await self._apply(effects)

    async def _tick(self) -> None:
        core = self.core
        now = self.clock.now()
        due = core.next_deadline()
        before = Counter(core.stats)
        effects = core.tick(now)
        self._explain(before, now, None, late=now - due)
        await self._apply(effects)

    def _explain(
        self, before: Counter[str], now: float, sender: str | None, late: float = 0.0
    ) -> None:
        """Log why the election moved (an operator's question after a new term: who started
        it, and how long since it had heard from the coordinator)."""
        core = self.core
        grew = {k for k, v in core.stats.items() if v > before[k]}
        if not grew & _EXPLAINED:
            return
        heard = now - core.last_leader_contact
        name = self.cluster
        if "pre_votes_started" in grew:
            log.info(
                "%s: pre-vote for term %d: nothing from a coordinator for %.2f s "
                "(timer %.2f s late)",
                name,
                core.term + 1,
                heard,
                late,
            )
        if "elections_started" in grew:
            log.info("%s: election for term %d: a majority granted the pre-vote", name, core.term)
        if "elections_won" in grew:
            log.info("%s: won term %d", name, core.term)
        acks = ", ".join(f"{p[-6:]} {now - t:.2f} s ago" for p, t in core.last_acks.items())
        if "lease_lapsed" in grew:
            log.info(
                "%s: lease ran out in term %d: commands stop, heartbeats go on; rounds "
                "last answered: %s",
                name,
                core.term,
                acks or "none",
            )
        if "lease_lost" in grew:
            log.info(
                "%s: stepped down in term %d: no majority answered for %.2f s (%.2f s "
                "late); rounds last answered: %s",
                name,
                core.term,
                self.settings.step_down_s,
                late,
                acks or "none",
            )
        for kind in ("pre_votes_granted", "votes_granted"):
            if kind in grew and sender is not None:
                log.info(
                    "%s: %s to %s (term %d): coordinator %s last heard %.2f s ago",
                    name,
                    kind.removesuffix("s_granted").replace("_", "-") + " granted",
                    sender[-6:],
                    core.term,
                    (core.leader or "none")[-6:],
                    heard,
                )

    async def _apply(self, effects: list[Effect]) -> None:
        core = self.core
        for effect in effects:
            if isinstance(effect, Persist):
                await self.store.save(self.cluster, effect.state)
            elif isinstance(effect, Send):
                self._send(effect.to, effect.message)
            elif isinstance(effect, LeaderChanged):
                self.stats["leader_changes"] += 1
        self.router.fence.observe_term(self.cluster, core.term)
        self._observer(self)

    def _send(self, to: str, message: wire.ElectionMessage) -> None:
        if self._nursery is None:
            return
        if isinstance(message, wire.VoteReply) and message.granted and not message.pre:
            if self.ident is None:  # a vote without a signature counts for no one
                self.stats["vote_unsigned"] += 1
            else:
                proof = sign_vote(self.ident, self.cluster, message.term, to)
                message = msgspec.structs.replace(message, proof=proof)
        self.stats["sent"] += 1
        self._nursery.start_soon(self._deliver, to, wire.encode(message))

    async def _deliver(self, to: str, payload: bytes) -> None:
        started = trio.current_time()
        try:
            await self.router.net.request(
                to, wire.ELECTION_PROTOCOL, payload, timeout_s=self.send_timeout_s
            )
            took = trio.current_time() - started
            if took > SLOW_SEND_S:
                log.debug("%s: election message to %s took %.2f s", self.cluster, to[-6:], took)
        except NetworkError as exc:
            self.stats["send_failed"] += 1
            log.debug(
                "%s: election message to %s failed after %.2f s: %s",
                self.cluster,
                to[-6:],
                trio.current_time() - started,
                exc,
            )
