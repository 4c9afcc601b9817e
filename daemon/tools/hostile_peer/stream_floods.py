"""Flood families on streams: many streams held open on every protocol with churn and idle TCP
connections (`streams`); huge never-finished frames, garbage frames and shard sessions up
to the target's limits on every framed gridmesh protocol (`frames`)."""

from __future__ import annotations

import collections
import os
import re
import struct
from contextlib import suppress
from typing import Any

import multiaddr
import trio

from daemon.tools.hostile_peer.peer import Flood
from p2p import codec, records

SHARD_PROTOCOL = "/gridmesh/shard/1.0.0"  # daemon.shards.SHARD_PROTOCOL (that imports torch)
FRAME_LEN = struct.Struct(">I")


async def streams(attack: Flood) -> None:
    """Streams held open on every protocol the target advertises, with churn, and idle TCP
    connections that never finish the handshake."""
    protocols = await attack.protocols()
    held: collections.deque[Any] = collections.deque()

    async def one() -> None:
        protocol = attack.rng.choice(protocols)
        attack.stats.sent += 1
        try:
            with trio.fail_after(5):
                stream = await attack.net.host.new_stream(attack.target_id, [protocol])
                # a frame that never arrives: a length prefix, then nothing
                await stream.write(FRAME_LEN.pack(1000))
                attack.stats.bytes += FRAME_LEN.size
        except trio.TooSlowError:
            attack.stats.failed += 1
            return
        except Exception:
            attack.stats.refused += 1
            await attack.reconnect()
            return
        held.append(stream)
        while len(held) > attack.limits.max_held_streams:
            old = held.popleft()
            with suppress(Exception):
                await old.reset()

    async def idle_conns() -> None:
        host, port = tcp_of(attack.target_addr)
        # on loopback, from another address than the honest daemons' 127.0.0.1, as an
        # attacker on another host would (per-address limits must not hit honest peers)
        local = "127.0.0.2" if host == "127.0.0.1" else None
        sockets = []
        try:
            for _ in range(attack.limits.max_idle_conns):
                try:
                    with trio.fail_after(2):
                        sockets.append(await trio.open_tcp_stream(host, port, local_address=local))
                except (OSError, trio.TooSlowError):
                    attack.stats.refused += 1
            await trio.sleep_forever()
        finally:
            for sock in sockets:
                sock.socket.close()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(idle_conns)
            await attack.workers(one)
            nursery.cancel_scope.cancel()
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            for stream in held:
                with suppress(Exception):
                    await stream.reset()


async def frames(attack: Flood) -> None:
    """Never-finished huge frames and garbage frames on every framed gridmesh protocol, and
    shard sessions up to the target's limits."""
    framed = [p for p in await attack.protocols() if p.startswith("/gridmesh/")]

    async def never_finished(protocol: str, max_bytes: int) -> None:
        """Announce a frame of the protocol's largest size, send part of it, stall."""
        attack.stats.sent += 1
        try:
            stream = await attack.net.host.new_stream(attack.target_id, [protocol])
            await stream.write(FRAME_LEN.pack(max_bytes))
            chunk = os.urandom(256 * 1024)
            left = min(attack.limits.frame_mb << 20, max_bytes - 1)  # never the whole frame
            while left > 0:
                await stream.write(chunk[:left])
                attack.stats.bytes += min(left, len(chunk))
                left -= len(chunk)
            await trio.sleep_forever()
        except trio.Cancelled:
            raise
        except Exception:
            attack.stats.refused += 1

    async def never_finished_loop(protocol: str, max_bytes: int) -> None:
        while attack.budget():
            await never_finished(protocol, max_bytes)
            await trio.sleep(0.05)
            await attack.reconnect()

    async def garbage_frames(protocol: str) -> None:
        """Complete frames of garbage as fast as the target answers them."""
        try:
            with trio.fail_after(5):
                stream = await attack.net.host.new_stream(attack.target_id, [protocol])
        except Exception:
            attack.stats.refused += 1
            await trio.sleep(0.01)
            await attack.reconnect()
            return

        async def drain() -> None:
            # the target resets or closes the stream (or bans us): reading just ends; the
            # writes below see it too. Raised here, it could leave the nursery beside the
            # flood's own cancellation, as a BaseExceptionGroup nothing below catches
            with suppress(Exception):
                while await stream.read(65536):
                    pass

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(drain)
                while attack.budget():
                    frame = os.urandom(attack.rng.choice((16, 1024, 64 * 1024)))
                    await stream.write(FRAME_LEN.pack(len(frame)) + frame)
                    attack.stats.sent += 1
                    attack.stats.bytes += len(frame)
                nursery.cancel_scope.cancel()
        except trio.Cancelled:
            raise
        except Exception:
            attack.stats.refused += 1  # the target reset the stream: a new one
            await trio.sleep(0.01)
            await attack.reconnect()

    async def garbage_loop(protocol: str) -> None:
        while attack.budget():
            await garbage_frames(protocol)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sessions, attack)
        for protocol in framed:
            big = (256 << 20) - 1 if protocol == SHARD_PROTOCOL else (4 << 20)
            for _ in range(4 if protocol == SHARD_PROTOCOL else 1):
                nursery.start_soon(never_finished_loop, protocol, big)
            nursery.start_soon(garbage_loop, protocol)


async def sessions(attack: Flood) -> None:
    """Open shard sessions on the blocks the target announces, as many as it lets us."""
    try:
        raw = await attack.net.dht_get(records.record_key(attack.network_id, attack.target))
        body = codec.open_envelope(raw or b"").body
        blocks = body.get("resources", {}).get("blocks") or []
    except Exception:
        return
    failures = 0
    for block in blocks[:4]:
        header = {
            "op": "open",
            "model": block.get("model"),
            "start": block.get("start"),
            "end": block.get("end"),
            "max_length": 1 << 20,
        }
        for _ in range(256):  # bounded: the target's session limit should stop us first
            if not attack.budget():
                return
            attack.stats.sent += 1
            try:
                with trio.fail_after(5):
                    stream = await attack.net.host.new_stream(attack.target_id, [SHARD_PROTOCOL])
                    packed = codec.encode(header)
                    await stream.write(
                        FRAME_LEN.pack(FRAME_LEN.size + len(packed))
                        + FRAME_LEN.pack(len(packed))
                        + packed
                    )
                    reply = await read_shard_reply(stream)
            except Exception:
                attack.stats.failed += 1
                failures += 1
                if failures >= 20:  # the target keeps dropping us: the other attacks go on
                    return
                await attack.reconnect()
                continue
            failures = 0
            if reply.get("op") == "opened":
                attack.stats.accepted += 1  # kept open (the stream) until the flood ends
                continue
            attack.stats.refused += 1
            limit = re.search(r"max_length must be 1\.\.(\d+)", str(reply.get("message")))
            if limit:
                header["max_length"] = int(limit.group(1))
            elif "busy" in str(reply):
                break


async def read_shard_reply(stream: Any) -> dict[str, Any]:
    """The header of one shard frame (`u32 frame length | u32 header length | header`)."""
    buf = b""
    while len(buf) < 2 * FRAME_LEN.size:
        chunk = await stream.read(2 * FRAME_LEN.size - len(buf))
        if not chunk:
            raise EOFError("closed")
        buf += chunk
    (frame_len,) = FRAME_LEN.unpack_from(buf)
    rest = buf[FRAME_LEN.size :]
    while len(rest) < frame_len:
        chunk = await stream.read(min(frame_len - len(rest), 1 << 16))
        if not chunk:
            raise EOFError("closed")
        rest += chunk
    (header_len,) = FRAME_LEN.unpack_from(rest)
    header = codec.decode(rest[FRAME_LEN.size : FRAME_LEN.size + header_len])
    return header if isinstance(header, dict) else {}


def tcp_of(addr: str) -> tuple[str, int]:
    maddr = multiaddr.Multiaddr(addr)
    return maddr.value_for_protocol("ip4"), int(maddr.value_for_protocol("tcp"))
