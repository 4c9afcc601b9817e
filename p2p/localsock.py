"""Streams between daemons on one host over Unix sockets: no TCP, Noise or yamux on the way.

Shard activations between daemons that share a machine are the hot path of a split model
(several daemons sharing one GPU, or a laptop devnet); py-libp2p's encrypted, multiplexed
TCP costs about a millisecond per message there. A daemon listens on the abstract Unix
socket named after its peer id (Linux only; no file to leave behind, and the name is derived
from the peer id, never taken from the network, so a peer cannot point us at another local
socket). Each stream proves who answers: the dialer sends a random nonce and the protocol,
the listener signs both with its node key, and the dialer checks the signature against the
peer id it meant to reach, so a process squatting the name is refused. The dialer is not
authenticated, as on the libp2p side, where anyone may open a stream too.

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

import trio

from p2p import codec, identity
from p2p.network import NetworkError, Stream

log = logging.getLogger(__name__)

MAX_FRAME_BYTES = 300 << 20  # a shard step carries at most 256 MiB of tensor
HELLO_TIMEOUT_S = 2.0
_LEN = struct.Struct(">I")
_CONTEXT = b"gridmesh/localsock/1\x00"


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


def _signed_message(nonce: bytes, protocol: str) -> bytes:
    return _CONTEXT + nonce + protocol.encode()


class SocketStream:
    """A framed `p2p.network.Stream` over a connected Unix socket."""

    def __init__(self, stream: trio.SocketStream, peer_id: str) -> None:
        self._stream = stream
        self.peer_id = peer_id
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

    async def _read_exactly(self, n: int) -> bytes:
        while len(self._buffer) < n:
            try:
                chunk = await self._stream.receive_some(max(65536, n - len(self._buffer)))
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise NetworkError(f"local stream from {self.peer_id} broke: {exc!r}") from None
            if not chunk:
                raise NetworkError(f"local stream from {self.peer_id} ended")
            self._buffer += chunk
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        return data

    async def receive(self, max_bytes: int = MAX_FRAME_BYTES) -> bytes:
        (length,) = _LEN.unpack(await self._read_exactly(_LEN.size))
        if length > max_bytes:
            raise NetworkError(f"frame of {length} bytes exceeds {max_bytes}")
        return await self._read_exactly(length)

    async def close(self) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            await self._stream.aclose()


async def dial(peer_id: str, protocol: str) -> Stream:
    """A stream to the daemon `peer_id` on this host; NetworkError if it is not here, or
    if whatever answers cannot sign for that peer id."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        with trio.fail_after(HELLO_TIMEOUT_S):
            await sock.connect(socket_name(peer_id))
            stream = SocketStream(trio.SocketStream(sock), peer_id)
            nonce = secrets.token_bytes(32)
            await stream.send(codec.encode({"protocol": protocol, "nonce": nonce}))
            reply = codec.decode(await stream.receive(4096), max_bytes=4096)
    except (OSError, trio.TooSlowError, codec.CodecError) as exc:
        sock.close()
        raise NetworkError(f"no local daemon {peer_id[-12:]}: {exc!r}") from None
    except NetworkError:
        sock.close()
        raise
    signature = reply.get("signature") if isinstance(reply, dict) else None
    if not (
        isinstance(signature, bytes)
        and identity.verify(peer_id, _signed_message(nonce, protocol), signature)
    ):
        await stream.close()
        raise NetworkError(f"the local socket of {peer_id[-12:]} is not that peer")
    return stream


StreamHandler = Callable[[Stream], Awaitable[None]]


class Listener:
    """Accepts local streams for this daemon and hands them to per-protocol handlers."""

    def __init__(
        self,
        ident: identity.NodeIdentity,
        handlers: dict[str, StreamHandler],
        *,
        on_reject: Callable[[str], None] | None = None,
    ) -> None:
        self._ident = ident
        self._handlers = handlers
        self._on_reject = on_reject or (lambda reason: None)

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

    async def _accept(self, raw: trio.SocketStream) -> None:
        stream = SocketStream(raw, peer_id="local")
        try:
            handler = await self._hello(stream)
            if handler is not None:
                await handler(stream)
        except Exception:  # as the libp2p guard: count it, end this stream, keep serving
            log.exception("local stream handler failed")
            self._on_reject("handler_error")
        finally:
            await stream.close()

    async def _hello(self, stream: SocketStream) -> StreamHandler | None:
        """Answer the dialer's hello with our signature; the handler of its protocol."""
        try:
            with trio.fail_after(HELLO_TIMEOUT_S):
                hello = codec.decode(await stream.receive(4096), max_bytes=4096)
                protocol = hello.get("protocol") if isinstance(hello, dict) else None
                nonce = hello.get("nonce") if isinstance(hello, dict) else None
                handler = self._handlers.get(protocol) if isinstance(protocol, str) else None
                if handler is None or not (isinstance(nonce, bytes) and len(nonce) == 32):
                    self._on_reject("local_hello")
                    return None
                signature = self._ident.sign(_signed_message(nonce, protocol))
                await stream.send(codec.encode({"signature": signature}))
        except (NetworkError, codec.CodecError, trio.TooSlowError):
            self._on_reject("local_hello")
            return None
        return handler
