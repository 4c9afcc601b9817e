"""Streams between daemons on one host over Unix sockets: no TCP, Noise or yamux on the way.

Shard activations between daemons that share a machine are the hot path of a split model
(several daemons sharing one GPU, or a laptop devnet); py-libp2p's encrypted, multiplexed
TCP costs about a millisecond per message there. A daemon listens on the abstract Unix
socket named after its peer id (Linux only; no file to leave behind, and the name is derived
from the peer id, never taken from the network, so a peer cannot point us at another local
socket).

Each stream is authenticated both ways, as libp2p's Noise handshake does: the dialer sends a
random nonce, the protocol and its own peer id; the listener signs them with its node key and
sends its own nonce; the dialer checks that signature against the peer id it meant to reach
(so a process squatting the name is refused) and signs the listener's nonce with its own node
key, which the listener checks against the peer id the dialer claimed. The listener's
handlers then see the dialer's real peer id, so per-peer limits hold for same-host peers as
for remote ones. The kernel's credentials of the dialing process (SO_PEERCRED: pid, uid, gid)
are recorded on the stream, and one local user may hold at most half the listener's
connections.

Limits: `max_connections` at once (`max_handshakes` of them still in their hello, each within
HELLO_TIMEOUT_S), frames over `max_frame_bytes` (a number, or a function asked per frame)
refused from their length prefix before they are read, and a frame begun must be finished
within FRAME_TIMEOUT_S (plus time for its bytes), or the stream ends.

`HOST_ID` says whether two daemons can try this: it is the kernel's boot id, shared by every
process on one host (and by containers on it, whose separate network namespaces then just
fail to connect, and the caller falls back to libp2p).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import socket
import struct
import sys
from collections.abc import Awaitable, Callable
from typing import Annotated

import msgspec
import trio

from p2p import identity
from p2p.network import FrameBound, NetworkError, Stream, StreamClosed

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 300 << 20  # what we send at most; what we take is the listener's choice
HELLO_TIMEOUT_S = 2.0
HELLO_BYTES = 4096
FRAME_TIMEOUT_S = 10.0  # a frame begun must end within this, plus its bytes at:
FRAME_BYTES_PER_S = 50e6


def frame_time_limit_s(
    length: int, deadline_s: float | None = None, min_bytes_per_s: float | None = None
) -> float:
    """How long a frame of `length` bytes may take from its first byte to its last (the rule
    for the Unix socket here and for libp2p streams in p2p.host); by default this module's
    FRAME_TIMEOUT_S and FRAME_BYTES_PER_S, read at each call."""
    deadline_s = FRAME_TIMEOUT_S if deadline_s is None else deadline_s
    rate = FRAME_BYTES_PER_S if min_bytes_per_s is None else min_bytes_per_s
    return deadline_s + length / rate


MAX_CONNECTIONS = 256
MAX_HANDSHAKES = 32
_LEN = struct.Struct(">I")
_PEERCRED = struct.Struct("3i")
_LISTENER_SIGNS = b"gridmesh/localsock/2/listener\x00"
_DIALER_SIGNS = b"gridmesh/localsock/2/dialer\x00"

Nonce = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]
Signature = Annotated[bytes, msgspec.Meta(min_length=1, max_length=128)]
PeerId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]


class Hello(msgspec.Struct, frozen=True):
    """The dialer's first message."""

    protocol: Annotated[str, msgspec.Meta(min_length=1, max_length=256)]
    nonce: Nonce
    peer: PeerId


class Challenge(msgspec.Struct, frozen=True):
    """The listener's answer: its signature, and a nonce for the dialer to sign."""

    signature: Signature
    nonce: Nonce


class Proof(msgspec.Struct, frozen=True):
    """The dialer's signature over the listener's nonce."""

    signature: Signature


def _decode(data: bytes, kind: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        return msgspec.msgpack.decode(data, type=kind)
    except msgspec.MsgspecError as exc:
        raise NetworkError(f"bad local hello: {str(exc)[:200]}") from None


def _host_id() -> str | None:
    if not sys.platform.startswith("linux"):
        return None  # no abstract sockets
    try:
        with open("/proc/sys/kernel/random/boot_id") as boot_id:
            return boot_id.read().strip()[:64] or None
    except OSError:
        return None


HOST_ID = _host_id()


def socket_name(peer_id: str) -> bytes:
    """The abstract socket address of a daemon (a leading NUL: nothing on the filesystem)."""
    return b"\0gridmesh/" + peer_id.encode()[:90]


def _signed(context: bytes, nonce: bytes, protocol: str, peer_id: str) -> bytes:
    """What one side signs: the other's nonce, the protocol and the other's peer id."""
    return context + nonce + protocol.encode() + b"\x00" + peer_id.encode()


def peer_credentials(sock: trio.socket.SocketType) -> tuple[int, int, int] | None:
    """(pid, uid, gid) of the process at the other end of a Unix socket, from the kernel."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    except (OSError, AttributeError):
        return None
    pid, uid, gid = _PEERCRED.unpack(raw)
    return pid, uid, gid


class SocketStream:
    """A framed `p2p.network.Stream` over a connected Unix socket."""

    def __init__(
        self,
        stream: trio.SocketStream,
        peer_id: str,
        *,
        max_frame_bytes: int | Callable[[], int] = MAX_FRAME_BYTES,
        credentials: tuple[int, int, int] | None = None,
    ) -> None:
        self._stream = stream
        self.peer_id = peer_id
        self.max_frame_bytes = max_frame_bytes
        self.credentials = credentials  # (pid, uid, gid) of the other process
        self._buffer = bytearray()
        self._send_lock = trio.Lock()

    async def send(self, frame: bytes) -> None:
        if len(frame) > MAX_FRAME_BYTES:
            raise NetworkError(f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
        try:
            async with self._send_lock:
                await self._stream.send_all(_LEN.pack(len(frame)) + frame)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise NetworkError(f"local stream to {self.peer_id} broke: {exc!r}") from None

    async def _fill(self, n: int) -> None:
        while len(self._buffer) < n:
            try:
                chunk = await self._stream.receive_some(max(65536, n - len(self._buffer)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise NetworkError(f"local stream from {self.peer_id} broke: {exc!r}") from None
            if not chunk:
                if not self._buffer:  # at a frame's boundary: the peer ended in order
                    raise StreamClosed(f"local stream from {self.peer_id} ended")
                raise NetworkError(f"local stream from {self.peer_id} ended mid-frame")
            self._buffer += chunk

    def _take(self, n: int) -> bytes:
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def receive(self, max_bytes: int | None = None) -> bytes:
        """The next frame: at most `max_bytes` (default: the stream's `max_frame_bytes`),
        and finished within FRAME_TIMEOUT_S (plus its bytes) of its first byte."""
        await self._fill(1)  # waiting for a frame is not bounded; finishing one is
        if max_bytes is None:  # asked as the frame arrives: what we serve may have changed
            limit = self.max_frame_bytes
            max_bytes = limit() if callable(limit) else limit
        try:
            with trio.fail_after(FRAME_TIMEOUT_S):
                await self._fill(_LEN.size)
            (length,) = _LEN.unpack(self._take(_LEN.size))
            if length > max_bytes:
                raise NetworkError(f"frame of {length} bytes exceeds {max_bytes}")
            with trio.fail_after(frame_time_limit_s(length)):
                await self._fill(length)
        except trio.TooSlowError:
            raise NetworkError(f"a frame from {self.peer_id} was not finished in time") from None
        return self._take(length)

    async def close_write(self) -> None:
        """Half-close (shutdown(SHUT_WR)): the peer reads to the end; we may still receive."""
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            async with self._send_lock:
                await self._stream.send_eof()

    async def close(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._stream.aclose()

    async def reset(self) -> None:
        """Close at once, in both directions (a Unix socket has no reset: the peer sees the
        end of the stream, or a broken pipe when it sends)."""
        await self.close()


async def dial(ident: identity.NodeIdentity, peer_id: str, protocol: str) -> Stream:
    """A stream to the daemon `peer_id` on this host, as `ident`; NetworkError if it is not
    here, if whatever answers cannot sign for that peer id, or if it refuses us."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream: SocketStream | None = None
    try:
        with trio.fail_after(HELLO_TIMEOUT_S):
            await sock.connect(socket_name(peer_id))
            stream = SocketStream(
                trio.SocketStream(sock), peer_id, credentials=peer_credentials(sock)
            )
            nonce = secrets.token_bytes(32)
            hello = Hello(protocol=protocol, nonce=nonce, peer=ident.peer_id)
            await stream.send(msgspec.msgpack.encode(hello))
            challenge = _decode(await stream.receive(HELLO_BYTES), Challenge)
            assert isinstance(challenge, Challenge)
            if not identity.verify(
                peer_id,
                _signed(_LISTENER_SIGNS, nonce, protocol, ident.peer_id),
                challenge.signature,
            ):
                raise NetworkError(f"the local socket of {peer_id[-12:]} is not that peer")
            proof = ident.sign(_signed(_DIALER_SIGNS, challenge.nonce, protocol, peer_id))
            await stream.send(msgspec.msgpack.encode(Proof(signature=proof)))
    except (OSError, trio.TooSlowError) as exc:
        sock.close()
        raise NetworkError(f"no local daemon {peer_id[-12:]}: {exc!r}") from None
    except NetworkError:
        if stream is not None:
            await stream.close()
        sock.close()
        raise
    return stream


StreamHandler = Callable[[Stream], Awaitable[None]]


class LocalStreams:
    """The stream part of the `p2p.network` seam (`Streams`) over this host's Unix sockets:
    streams to daemons on this host, and a `Listener` serving the handlers set here (run
    `serve` in a nursery). Requests, gossip and the DHT are not carried here."""

    def __init__(
        self,
        ident: identity.NodeIdentity,
        *,
        on_reject: Callable[[str], None] | None = None,
        max_connections: int = MAX_CONNECTIONS,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        self._ident = ident
        self._handlers: dict[str, StreamHandler] = {}
        self.listener = Listener(
            ident,
            self._handlers,
            on_reject=on_reject,
            max_connections=max_connections,
            max_handshakes=max_handshakes,
        )

    @property
    def peer_id(self) -> str:
        return self._ident.peer_id

    async def open_stream(self, peer_id: str, protocol: str) -> Stream:
        return await dial(self._ident, peer_id, protocol)

    def set_stream_handler(
        self, protocol: str, handler: StreamHandler, max_frame_bytes: FrameBound = MAX_FRAME_BYTES
    ) -> None:
        """Serve `protocol`'s streams, each frame bounded by `max_frame_bytes` (asked per
        frame when it is a function); takes effect for streams opened from now on."""

        async def serve(stream: Stream) -> None:
            if isinstance(stream, SocketStream):
                stream.max_frame_bytes = max_frame_bytes
            await handler(stream)

        self._handlers[protocol] = serve

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled (see `Listener.serve`)."""
        await self.listener.serve(task_status=task_status)


class Listener:
    """Accepts local streams for this daemon and hands them to per-protocol handlers."""

    def __init__(
        self,
        ident: identity.NodeIdentity,
        handlers: dict[str, StreamHandler],
        *,
        on_reject: Callable[[str], None] | None = None,
        max_frame_bytes: int | Callable[[], int] = MAX_FRAME_BYTES,
        max_connections: int = MAX_CONNECTIONS,
        max_handshakes: int = MAX_HANDSHAKES,
    ) -> None:
        """`max_frame_bytes`: the longest frame a handler's stream takes (a function is
        asked at every frame, e.g. the shard server's bound from what it serves)."""
        self._ident = ident
        self._handlers = handlers
        self._on_reject = on_reject or (lambda reason: None)
        self.max_frame_bytes = max_frame_bytes
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.connections = 0
        self.handshakes = 0
        self._per_uid: dict[int, int] = {}

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Listen until cancelled. Raises OSError if the name is taken (another process
        squatting it, or this peer id already running on this host)."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            await sock.bind(socket_name(self._ident.peer_id))
            sock.listen(64)
        except OSError:
            sock.close()
            raise
        listener = trio.SocketListener(sock)
        task_status.started()
        await trio.serve_listeners(self._accept, [listener])

    def _admit(self, raw: trio.SocketStream, uid: int | None) -> str | None:
        """Why this connection is refused before its hello, or None."""
        if self.connections >= self.max_connections:
            return "too_many_connections"
        if self.handshakes >= self.max_handshakes:
            return "too_many_handshakes"
        if uid is not None and self._per_uid.get(uid, 0) >= max(1, self.max_connections // 2):
            return "too_many_connections_of_user"  # one local user cannot block the others
        return None

    async def _accept(self, raw: trio.SocketStream) -> None:
        credentials = peer_credentials(raw.socket)
        uid = credentials[1] if credentials else None
        refused = self._admit(raw, uid)
        if refused is not None:
            self._on_reject(refused)
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                await raw.aclose()
            return
        self.connections += 1
        if uid is not None:
            self._per_uid[uid] = self._per_uid.get(uid, 0) + 1
        stream = SocketStream(
            raw, peer_id="", max_frame_bytes=self.max_frame_bytes, credentials=credentials
        )
        try:
            self.handshakes += 1
            try:
                handler = await self._hello(stream)
            finally:
                self.handshakes -= 1
            if handler is not None:
                await handler(stream)
        except Exception:  # as the libp2p guard: count it, end this stream, keep serving
            log.exception("local stream handler failed")
            self._on_reject("handler_error")
        finally:
            self.connections -= 1
            if uid is not None:
                self._per_uid[uid] -= 1
                if not self._per_uid[uid]:
                    del self._per_uid[uid]
            await stream.close()

    async def _hello(self, stream: SocketStream) -> StreamHandler | None:
        """Authenticate both ends (see the module's docstring); the handler of the
        dialer's protocol, with `stream.peer_id` set to the dialer's proven peer id."""
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                hello = _decode(await stream.receive(HELLO_BYTES), Hello)
                assert isinstance(hello, Hello)
                handler = self._handlers.get(hello.protocol)
                if handler is None:
                    raise NetworkError(f"no handler for {hello.protocol[:40]!r}")
                nonce = secrets.token_bytes(32)
                signed = _signed(_LISTENER_SIGNS, hello.nonce, hello.protocol, hello.peer)
                challenge = Challenge(signature=self._ident.sign(signed), nonce=nonce)
                await stream.send(msgspec.msgpack.encode(challenge))
                proof = _decode(await stream.receive(HELLO_BYTES), Proof)
                assert isinstance(proof, Proof)
                expected = _signed(_DIALER_SIGNS, nonce, hello.protocol, self._ident.peer_id)
                if not identity.verify(hello.peer, expected, proof.signature):
                    self._on_reject("local_peer_unproven")
                    return None
        except (NetworkError, trio.TooSlowError):
            self._on_reject("local_hello")
            return None
        stream.peer_id = hello.peer
        return handler
