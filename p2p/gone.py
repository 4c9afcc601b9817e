"""Gone notices: a node that saw a peer go (or suspects it) tells the others, who check.

At scale a node pings at most `liveness_max_pings` of its connected peers a round
(p2p.liveness), so a node cut off from the network (its connections open but silent) is
noticed first by the few that ping it, not by all. A node that takes a peer for gone from
its own observation (a closed connection whose redial failed, pings unanswered), or that
suspects it (a ping unanswered and counted, where it pings only some peers a round:
p2p.liveness spares a round in which most peers missed, this node's own trouble) and then
finds it silent when it asks it for its record (one round trip, bounded by `check_s`),
publishes a notice on the network's `GONE_TOPIC` after a random delay of up to
`NOTICE_DELAY_S` (twice, `REPEAT_S` apart), unless a notice of that peer reached it
meanwhile: a death seen by many is announced by a few. A node that receives one, and lists
that peer, asks the peer for its record itself, as the suspecting node did: no valid answer,
and it takes the peer for gone too; an answer, and it keeps listing it. So a hostile node
cannot hide honest ones (its word costs each node one request), and a slow but live node
that answers within `check_s` does not flap.

Notices are bounded and typed (msgspec), refused before they are forwarded when malformed.
A node checks at most `MAX_CHECKS` peers at once on others' word (its own suspicions,
at most one per ping, are always checked), each at most once per `recheck_s`; an origin
whose notices were refuted `MAX_FALSE` times within `_FORGET_S` is not heard (its notices
are refused, so not forwarded either) until those age out. Each of these is counted:
`refused` (malformed), `muted` (from such an origin), `over_limit` (no check free),
`refuted` (the peer answered), each also reported to `on_reject` (the daemon's metrics).
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
import trio

from p2p.liveness import Liveness
from p2p.network import Network

log = logging.getLogger(__name__)

GONE_TOPIC = "/gridmesh/discovery/gone/1.0.0"
MAX_NOTICE_BYTES = 256
NOTICE_DELAY_S = 0.5
# a notice is announced this many times, `REPEAT_S` apart, while the peer stays gone:
# gossip is best effort (the in-memory network's epidemic misses a node in ~e**-6)
ANNOUNCEMENTS = 2
REPEAT_S = 1.0
MAX_CHECKS = 32
MAX_FALSE = 8  # refuted notices of one origin within _FORGET_S before it is not heard
MAX_ORIGINS = 4096  # origins whose refuted notices are counted (beyond: not counted)
_FORGET_S = 60.0  # what was heard or checked of a peer, or refuted of an origin, is kept this long


class GoneNotice(msgspec.Struct, frozen=True):
    """`peer` was seen to go by the notice's origin (the gossip's signed sender)."""

    peer: Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
    # which of its origin's announcements of `peer` this is (gossip drops a repeat of the
    # same bytes as already seen: the second announcement differs in this)
    seq: Annotated[int, msgspec.Meta(ge=0, le=255)] = 0


_decode = msgspec.msgpack.Decoder(GoneNotice).decode
_encode = msgspec.msgpack.Encoder().encode


def parse_notice(data: bytes) -> GoneNotice:
    """The notice in `data`; ValueError when it is not one."""
    if len(data) > MAX_NOTICE_BYTES:
        raise ValueError(f"a gone notice of {len(data)} bytes (at most {MAX_NOTICE_BYTES})")
    try:
        return _decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a gone notice: {str(exc)[:120]}") from None


class GoneNotices:
    """Publishes what `liveness` saw go (`saw_gone`, its `on_lost`), checks what others saw.

    `probe(peer)`: whether the peer answered with its valid record (the caller bounds
    nothing: `check_s` does); `lists(peer)`: whether this node lists it now.
    """

    def __init__(
        self,
        net: Network,
        liveness: Liveness,
        *,
        probe: Callable[[str], Awaitable[bool]],
        lists: Callable[[str], bool],
        check_s: float = 2.0,
        recheck_s: float = 5.0,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._net = net
        self._liveness = liveness
        self._probe = probe
        self._lists = lists
        self._check_s = check_s
        self._recheck_s = recheck_s
        self._on_reject = on_reject or (lambda reason: None)
        self._rng = random.Random()
        # peer -> when (trio clock) to announce it, and which announcement that is
        self._due: dict[str, tuple[float, int]] = {}
        self._heard: dict[str, float] = {}  # peer -> when a notice of it arrived
        self._checked: dict[str, float] = {}  # peer -> when it was last checked
        self._checking: set[str] = set()
        # origin -> (when its first counted refuted notice was, how many since)
        self._false: dict[str, tuple[float, int]] = {}
        self._nursery: trio.Nursery | None = None
        self._wake = trio.Event()
        self.published = 0
        self.received = 0
        self.refused = 0  # malformed notices (refused by the gossip validator)
        self.muted = 0  # notices of an origin with too many refuted ones (refused too)
        self.over_limit = 0  # notices of a listed peer left unchecked: MAX_CHECKS busy
        self.checks = 0  # checks started (own suspicions and others' notices)
        self.checks_peak = 0  # the most checks that ran at once
        self.confirmed = 0  # checked peers that did not answer us either
        self.refuted = 0  # checked peers that answered

    def saw_gone(self, peer_id: str) -> None:
        """This node saw `peer_id` go (no longer listed), or suspects it (still listed: it is
        checked first, and announced only if it does not answer)."""
        if self._lists(peer_id):
            self._start_check(peer_id, "a ping unanswered", None)
        else:
            self._announce_soon(peer_id)

    def _announce_soon(self, peer_id: str) -> None:
        """Announce `peer_id` after a random delay, unless a notice of it came lately."""
        if trio.current_time() - self._heard.get(peer_id, -math.inf) < self._recheck_s:
            return  # announced by another: every node told checks for itself
        delay = self._rng.uniform(0, NOTICE_DELAY_S)
        self._due.setdefault(peer_id, (trio.current_time() + delay, 0))
        self._wake.set()

    def validate(self, origin: str, data: bytes) -> bool:
        """The gossip validator: well-formed notices of origins still heard go further."""
        try:
            parse_notice(data)
        except ValueError:
            self.refused += 1
            self._on_reject("gone_notice")
            return False
        if self._is_muted(origin):
            self.muted += 1
            self._on_reject("gone_notice_muted")
            return False
        return True

    def _is_muted(self, origin: str) -> bool:
        since, count = self._false.get(origin, (0.0, 0))
        return count >= MAX_FALSE and trio.current_time() - since < _FORGET_S

    def _count_false(self, origin: str) -> None:
        """A notice of `origin` was refuted: its `MAX_FALSE`th within `_FORGET_S` mutes it."""
        now = trio.current_time()
        since, count = self._false.get(origin, (now, 0))
        if now - since >= _FORGET_S:
            since, count = now, 0
        if origin in self._false or len(self._false) < MAX_ORIGINS:
            self._false[origin] = (since, count + 1)

    async def on_notice(self, origin: str, data: bytes) -> None:
        try:
            peer_id = parse_notice(data).peer
        except ValueError:
            return
        if self._is_muted(origin):  # (muted after the validator passed it)
            return
        self.received += 1
        if peer_id == self._net.peer_id:  # false on its face: no need to ask
            self.refuted += 1
            self._on_reject("gone_notice_refuted")
            self._count_false(origin)
            return
        if not self._lists(peer_id):
            return
        self._heard[peer_id] = trio.current_time()
        due = self._due.get(peer_id)
        if due is not None and due[1] == 0:  # announced by another: ours would add little
            del self._due[peer_id]  # (a repeat stays: gossip may have missed some nodes)
        self._start_check(peer_id, f"reported by {origin}", origin)

    def _start_check(self, peer_id: str, why: str, origin: str | None) -> None:
        """Ask `peer_id` for its record, unless it is being or was lately asked. `origin`:
        whose notice this checks (None: our own suspicion, not bounded by MAX_CHECKS nor by
        `recheck_s`, since pings bound those)."""
        now = trio.current_time()
        if peer_id in self._checking or self._nursery is None:
            return
        if origin is not None:
            if now - self._checked.get(peer_id, -math.inf) < self._recheck_s:
                return  # asked lately: it answered, or is taken for gone already
            if len(self._checking) >= MAX_CHECKS:
                self.over_limit += 1
                self._on_reject("gone_notice_over_limit")
                return
        self._checking.add(peer_id)
        self.checks += 1
        self.checks_peak = max(self.checks_peak, len(self._checking))
        self._nursery.start_soon(self._check, peer_id, why, origin)

    async def _check(self, peer_id: str, why: str, origin: str | None) -> None:
        answered = False
        try:
            with trio.move_on_after(self._check_s):
                try:
                    answered = await self._probe(peer_id)
                except Exception as exc:
                    log.debug("checking %s failed: %r", peer_id, exc)
            if answered:
                self.refuted += 1
                if origin is not None:
                    self._on_reject("gone_notice_refuted")
                    self._count_false(origin)
            else:
                self.confirmed += 1
                self._liveness.mark_gone(peer_id, f"{why}, and it did not answer us")
                if origin is None:  # our own suspicion, confirmed: tell the others
                    self._announce_soon(peer_id)
        finally:
            self._checking.discard(peer_id)
            self._checked[peer_id] = trio.current_time()

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Subscribe, then announce what is due, until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            try:
                await self._net.subscribe(GONE_TOPIC, self.on_notice, self.validate)
            except Exception as exc:  # no gossip: liveness still works, notices do not
                log.warning("gone notices are off: cannot subscribe: %r", exc)
                task_status.started()
                return
            task_status.started()
            while True:
                now = trio.current_time()
                for peer_id, (_, seq) in [(p, d) for p, d in self._due.items() if d[0] <= now]:
                    del self._due[peer_id]
                    await self._announce(peer_id, seq)
                    if seq + 1 < ANNOUNCEMENTS:
                        self._due[peer_id] = (now + REPEAT_S, seq + 1)
                horizon = now - _FORGET_S
                self._heard = {p: t for p, t in self._heard.items() if t >= horizon}
                self._checked = {p: t for p, t in self._checked.items() if t >= horizon}
                self._false = {o: f for o, f in self._false.items() if f[0] >= horizon}
                wake_at = min((t for t, _ in self._due.values()), default=now + 60)
                with trio.move_on_after(wake_at - now):
                    await self._wake.wait()
                self._wake = trio.Event()

    async def _announce(self, peer_id: str, seq: int) -> None:
        try:
            await self._net.publish(GONE_TOPIC, _encode(GoneNotice(peer_id, seq)))
            self.published += 1
            log.debug("announced that %s is gone", peer_id)
            self._heard[peer_id] = trio.current_time()
        except Exception as exc:
            log.debug("announcing that %s is gone failed: %r", peer_id, exc)
