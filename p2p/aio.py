"""The one trio/asyncio boundary: a dedicated asyncio loop in its own thread.

Libraries that only speak asyncio (aiosqlite now; grpc.aio and web3's async API later) run
their coroutines on this loop; trio code awaits them with `bridge.run(...)`. Cancelling the
trio side cancels the asyncio task. Keep every asyncio-only call behind this class.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import trio

T = TypeVar("T")


class AsyncioBridge:
    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="gridmesh-asyncio", daemon=True
        )
        self._thread.start()

    async def run(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run `fn(*args)` on the asyncio loop and wait for it from trio."""
        token = trio.lowlevel.current_trio_token()
        done = trio.Event()
        future = asyncio.run_coroutine_threadsafe(_call(fn, args), self._loop)
        future.add_done_callback(lambda _: token.run_sync_soon(done.set))
        try:
            await done.wait()
        except trio.Cancelled:
            future.cancel()
            raise
        return future.result()

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if not self._thread.is_alive():
            self._loop.close()


async def _call(fn: Callable[..., Awaitable[T]], args: tuple[Any, ...]) -> T:
    return await fn(*args)


@asynccontextmanager
async def open_bridge() -> AsyncIterator[AsyncioBridge]:
    bridge = AsyncioBridge()
    try:
        yield bridge
    finally:
        bridge.close()
