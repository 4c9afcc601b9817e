"""Python-block calls over one long-lived, multiplexed stream per peer.

A new libp2p stream per call costs a stream negotiation each time (bench/vdag.py --procs
measured ~26 ms per remote node with one request per call). Streams kept idle, one call at
a time each, still opened a new stream for every call beyond the kept ones: a fan-out of 8
remote nodes to one peer opened and reset 4 streams per request (~10 ms per parallel node),
and a busy runner could reach the serving peer's limit on new streams per second.

So a caller keeps one stream per peer (`BlockStreams`, protocol `MUX_PROTOCOL`) and sends
each call as a `MuxCall {id, call}`; the server (`mux_handler`) runs the calls of a stream
side by side (at most `MAX_PENDING` at once: it stops reading beyond that) and answers each
with a `MuxReply {id, reply}` as soon as it is done, in any order. One reader task per link
hands each reply to the call waiting for its id. A frame is a batch (`_Sender`): what queued
while the frame before was being sent goes in one frame, so the calls of a fan-out to one
peer, and replies done together, share py-libp2p's cost per message (the most of a remote
call's time: bench/vdag.py --procs).

A link that breaks (the peer restarted or reset it, a reply that does not decode, a send
stuck past `SEND_TIMEOUT_S`) fails the calls waiting on it with NetworkError and is replaced
by a fresh one on the next call. A call whose frame could not be sent on a link that was
already open is tried once more on a fresh link; one already sent is not (the peer may have
run it: the executor's retries decide). A caller cancelled while waiting leaves the link
alone (its late reply is dropped); a send is never cut in the middle of a frame.

The one-call-per-stream protocol (`BLOCK_STREAM_PROTOCOL`, `stream_handler`) is still served
for daemons that speak only it.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from daemon.vdags.protocol import (
    MAX_BATCH,
    MAX_CALL_ID,
    MAX_MESSAGE_BYTES,
    BlockCall,
    BlockReply,
    MuxCall,
    MuxReply,
    ProtocolError,
    batch_frame,
    decode_call,
    decode_mux_calls,
    decode_mux_replies,
    encode,
)
from p2p.network import NetworkError, StreamClosed

log = logging.getLogger(__name__)

BLOCK_STREAM_PROTOCOL = "/gridmesh/vdag-block-stream/1.0.0"
MUX_PROTOCOL = "/gridmesh/vdag-block-mux/1.0.0"
MAX_PEERS = 1024  # links kept (beyond: an idle one is closed, or the call refused)
MAX_PENDING = 256  # calls waiting on one link; calls one server stream runs at once
OPEN_TIMEOUT_S = 5.0  # a peer that does not take a stream by then is tried no longer
SEND_TIMEOUT_S = 10.0  # a frame not sent by then (the peer stopped reading): link broken
MAX_ITEM_BYTES = MAX_MESSAGE_BYTES - 16  # one call or reply, encoded, in a frame of its own


class _Sender:
    """What one side queues for a stream, sent in batches: the task that sends takes all
    that queued meanwhile (up to MAX_BATCH items, MAX_ITEM_BYTES together), so calls (or
    replies) that come together share a frame, and py-libp2p's cost per message. With
    `shield`, a send is never cut in the middle of a frame (the stream outlives the task
    that sends); one not done within SEND_TIMEOUT_S breaks the stream."""

    def __init__(self, stream: Any, *, shield: bool) -> None:
        self.stream = stream
        self.shield = shield
        self.queue: deque[tuple[bytes, list[bool]]] = deque()
        self.lock = trio.Lock()
        self.broken: str | None = None
        self.frames = 0
        self.items = 0

    async def send(self, item: bytes) -> None:
        """Queue `item` and return once it is sent, by this task or by one sending before
        it; NetworkError if the stream broke first (or `item` is too large)."""
        if len(item) > MAX_ITEM_BYTES:
            raise NetworkError(f"a message of {len(item)} bytes exceeds {MAX_ITEM_BYTES}")
        box = [False]
        self.queue.append((item, box))
        async with self.lock:
            while not box[0]:
                if self.broken is not None:
                    raise NetworkError(self.broken)
                await self._send_batch()

    async def _send_batch(self) -> None:
        items: list[bytes] = []
        boxes: list[list[bool]] = []
        size = 0
        while self.queue and len(items) < MAX_BATCH:
            item, box = self.queue[0]
            if items and size + len(item) > MAX_ITEM_BYTES:
                break
            self.queue.popleft()
            items.append(item)
            boxes.append(box)
            size += len(item)
        frame = batch_frame(items)
        with trio.CancelScope(shield=self.shield):
            with trio.move_on_after(SEND_TIMEOUT_S) as scope:
                try:
                    await self.stream.send(frame)
                except NetworkError as exc:
                    self.broken = str(exc)
                    raise
        if scope.cancelled_caught:
            self.broken = f"a frame was not sent within {SEND_TIMEOUT_S:g} s"
            raise NetworkError(self.broken)
        self.frames += 1
        self.items += len(items)
        for box in boxes:
            box[0] = True


class _NotSent(NetworkError):
    """The call's frame did not reach the stream (the peer cannot have run it)."""


class _Slot:
    """Where a call's reply (or its link's failure) is put."""

    __slots__ = ("error", "event", "reply")

    def __init__(self) -> None:
        self.event = trio.Event()
        self.reply: BlockReply | None = None
        self.error: str | None = None


class _Link:
    """One multiplexed stream to a peer, and the calls waiting on it."""

    def __init__(self, peer_id: str, stream: Any) -> None:
        self.peer_id = peer_id
        self.stream = stream
        self.waiting: dict[int, _Slot] = {}
        self.next_id = 0
        self.sender = _Sender(stream, shield=True)
        self.broken: str | None = None

    def new_id(self) -> int:
        while True:
            self.next_id = (self.next_id + 1) & MAX_CALL_ID
            if self.next_id not in self.waiting:
                return self.next_id

    def fail(self, why: str) -> None:
        """Mark broken; every waiting call gets `why`."""
        if self.broken is None:
            self.broken = why
        for slot in self.waiting.values():
            slot.error = self.broken
            slot.event.set()
        self.waiting.clear()


class BlockStreams:
    """The caller's side: calls to each peer over its one link. `run` must be running (in
    the daemon's nursery): it holds the links' reader tasks. A malformed reply breaks its
    link and is passed to `reject` (the daemon counts it)."""

    def __init__(self, net: Any, reject: Callable[[str], None] | None = None) -> None:
        self.net = net
        self.reject = reject or (lambda reason: None)  # a malformed reply, counted
        self.links: dict[str, _Link] = {}
        self._opening: dict[str, trio.Lock] = {}
        self._nursery: trio.Nursery | None = None
        self.opened = 0  # links opened (tests and the bench read it)

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the links until cancelled; then close them."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            links = list(self.links.values())
            self.links.clear()
            with trio.CancelScope(shield=True):
                for link in links:
                    link.fail("the daemon is stopping")
                    await link.stream.close()

    async def call(self, peer_id: str, call: BlockCall) -> BlockReply:
        """The peer's reply; NetworkError when it cannot be had."""
        link, fresh = await self._link(peer_id)
        try:
            return await self._exchange(link, call)
        except _NotSent:
            if fresh:
                raise
        # a kept link found broken as the call was sent (the peer restarted, the connection
        # dropped): once more on a fresh one. A call that broke after it was sent is not
        # sent again here (the peer may have run it): the executor decides.
        link, _ = await self._link(peer_id)
        return await self._exchange(link, call)

    async def _link(self, peer_id: str) -> tuple[_Link, bool]:
        """The open link to `peer_id`, or a new one (True: opened for this call)."""
        link = self.links.get(peer_id)
        if link is not None and link.broken is None:
            return link, False
        if self._nursery is None:
            raise NetworkError("block calls are not running (the daemon is not)")
        lock = self._opening.setdefault(peer_id, trio.Lock())
        try:
            async with lock:  # one opener per peer; the others take its link
                link = self.links.get(peer_id)
                if link is not None and link.broken is None:
                    return link, False
                self._make_room()
                stream = await self._open(peer_id)
                link = _Link(peer_id, stream)
                self.links[peer_id] = link
                self.opened += 1
                self._nursery.start_soon(self._read, link)
                return link, True
        finally:
            if not lock.statistics().tasks_waiting and not lock.locked():
                self._opening.pop(peer_id, None)

    def _make_room(self) -> None:
        if len(self.links) < MAX_PEERS:
            return
        for peer, link in list(self.links.items()):
            if not link.waiting:
                del self.links[peer]
                link.fail("closed to make room")
                assert self._nursery is not None
                self._nursery.start_soon(link.stream.close)
                return
        raise NetworkError(f"block calls are waiting on {MAX_PEERS} peers already")

    async def _open(self, peer_id: str) -> Any:
        try:
            with trio.fail_after(OPEN_TIMEOUT_S):
                return await self.net.open_stream(peer_id, MUX_PROTOCOL, MAX_MESSAGE_BYTES)
        except trio.TooSlowError:
            raise NetworkError(f"no stream to {peer_id} within {OPEN_TIMEOUT_S:g} s") from None

    async def _exchange(self, link: _Link, call: BlockCall) -> BlockReply:
        if len(link.waiting) >= MAX_PENDING:
            raise NetworkError(f"{MAX_PENDING} block calls are waiting on {link.peer_id} already")
        if link.broken is not None:
            raise _NotSent(f"stream to {link.peer_id} broke: {link.broken}")
        call_id = link.new_id()
        slot = link.waiting[call_id] = _Slot()
        try:
            try:
                await link.sender.send(encode(MuxCall(call_id, call)))
            except NetworkError as exc:
                if link.sender.broken is None:  # this call alone: too large
                    raise
                await self._break(link, str(exc))
                raise _NotSent(f"stream to {link.peer_id} broke: {exc}") from None
            await slot.event.wait()
        finally:
            link.waiting.pop(call_id, None)
        if slot.reply is None:
            raise NetworkError(f"stream to {link.peer_id} broke: {slot.error}")
        return slot.reply

    async def _break(self, link: _Link, why: str) -> None:
        link.fail(why)
        if self.links.get(link.peer_id) is link:
            del self.links[link.peer_id]
        with trio.CancelScope(shield=True):
            await link.stream.reset()

    async def _read(self, link: _Link) -> None:
        """Hand each reply on `link` to the call waiting for its id (none: the caller gave
        up, and the reply is dropped)."""
        while True:
            try:
                frame = await link.stream.receive()
                messages = decode_mux_replies(frame)
            except StreamClosed:
                await self._break(link, "the peer closed it")
                return
            except (NetworkError, ProtocolError) as exc:
                if isinstance(exc, ProtocolError):
                    self.reject(exc.reason)
                if link.broken is None:
                    log.info("block stream to %s broke: %s", link.peer_id[-12:], exc)
                await self._break(link, str(exc))
                return
            for message in messages:
                slot = link.waiting.pop(message.id, None)
                if slot is not None:
                    slot.reply = message.reply
                    slot.event.set()


def mux_handler(
    run: Callable[[BlockCall], Awaitable[BlockReply]], reject: Callable[[str], None]
) -> Callable[[Any], Awaitable[None]]:
    """The server's side of MUX_PROTOCOL: run each call of a stream as it arrives (at most
    MAX_PENDING at once: reading waits beyond that), answer each when done. A malformed
    frame is refused and counted, and the stream reset."""

    async def serve(stream: Any) -> None:
        sender = _Sender(stream, shield=False)
        slots = trio.Semaphore(MAX_PENDING)

        async def answer(message: MuxCall, cancel: trio.CancelScope) -> None:
            try:
                reply = await run(message.call)
                await sender.send(encode(MuxReply(message.id, reply)))
            except NetworkError:  # the caller is gone: nothing more to answer on this stream
                cancel.cancel()
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            while True:
                try:
                    frame = await stream.receive()
                except (StreamClosed, NetworkError):  # the caller is done with it, or gone
                    break  # the calls still running are answered
                try:
                    messages = decode_mux_calls(frame)
                except ProtocolError as exc:
                    reject(exc.reason)
                    nursery.cancel_scope.cancel()
                    await stream.reset()
                    return
                for message in messages:
                    await slots.acquire()
                    nursery.start_soon(answer, message, nursery.cancel_scope)

    return serve


def stream_handler(
    run: Callable[[BlockCall], Awaitable[BlockReply]], reject: Callable[[str], None]
) -> Callable[[Any], Awaitable[None]]:
    """The server's side of BLOCK_STREAM_PROTOCOL: answer each call frame on a stream, in
    order (daemons before the multiplexed stream call this way)."""

    async def serve(stream: Any) -> None:
        while True:
            try:
                frame = await stream.receive()
            except (StreamClosed, NetworkError):  # the caller is done with it, or gone
                return
            try:
                call = decode_call(frame)
            except ProtocolError as exc:
                reject(exc.reason)
                await stream.reset()
                return
            await stream.send(encode(await run(call)))

    return serve
