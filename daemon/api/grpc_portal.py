"""From asyncio into trio: how the gRPC servicer (on the daemon's asyncio loop) calls the
trio side without ever blocking that loop.

Every call becomes a task in a trio nursery, scheduled through the thread-safe trio token,
and its outcome comes back as an asyncio future. A caller that gives up (its client hung
up) cancels its trio task; once the portal is closed, or trio stops taking calls, calls fail
with `ShuttingDown` (UNAVAILABLE).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from daemon.errors import ShuttingDown

log = logging.getLogger(__name__)

T = TypeVar("T")


def _shutting_down() -> ShuttingDown:
    return ShuttingDown("the daemon is shutting down")


class TrioPortal:
    """Calls trio code from the asyncio loop without blocking it (see the module docstring)."""

    def __init__(
        self,
        token: trio.lowlevel.TrioToken,
        nursery: trio.Nursery,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        self._token = token
        self._nursery = nursery
        self._loop = loop
        self.closed = False  # set from trio when the server stops: new calls fail at once

    def close(self) -> None:
        self.closed = True

    def _settler(self, future: asyncio.Future[Any]) -> Callable[[Any, BaseException | None], None]:
        """A callback for the trio thread that completes `future` on the asyncio loop."""

        def apply(value: Any, exc: BaseException | None) -> None:
            if future.done():  # the asyncio side gave up already
                return
            if exc is None:
                future.set_result(value)
            else:
                future.set_exception(exc)

        def settle(value: Any, exc: BaseException | None) -> None:
            # RuntimeError: the loop is closed, and nobody is waiting any more
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(apply, value, exc)

        return settle

    def _schedule(self, fn: Callable[[], None], future: asyncio.Future[Any] | None) -> None:
        """Queue `fn` on the trio thread, or fail `future` if trio is no longer taking calls."""
        if self.closed and future is not None:
            future.set_exception(_shutting_down())
            return
        try:
            self._token.run_sync_soon(fn)
        except trio.RunFinishedError:
            if future is not None and not future.done():
                future.set_exception(_shutting_down())

    async def call(self, fn: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Await `fn(*args)` as a trio task."""
        future: asyncio.Future[T] = self._loop.create_future()
        settle = self._settler(future)
        scope = trio.CancelScope()

        async def task() -> None:
            try:
                with scope:
                    value = await fn(*args)
                    settle(value, None)
                    return
            except Exception as exc:
                settle(None, exc)
                return
            except BaseException:  # trio.Cancelled from the nursery: the server stops
                settle(None, _shutting_down())
                raise
            settle(None, _shutting_down())  # our own scope was cancelled

        def spawn() -> None:
            try:
                self._nursery.start_soon(task)
            except RuntimeError:  # the nursery has closed
                settle(None, _shutting_down())

        self._schedule(spawn, future)
        try:
            return await future
        except asyncio.CancelledError:
            self._schedule(scope.cancel, None)
            raise

    async def call_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run the quick, synchronous `fn(*args)` on the trio thread."""
        future: asyncio.Future[T] = self._loop.create_future()
        settle = self._settler(future)

        def run() -> None:
            try:
                value = fn(*args)
            except Exception as exc:
                settle(None, exc)
            else:
                settle(value, None)

        self._schedule(run, future)
        return await future

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run the synchronous `fn(*args)` on the trio thread; do not wait, log failures."""

        def run() -> None:
            try:
                fn(*args)
            except Exception:
                log.exception("%s failed", getattr(fn, "__name__", fn))

        self._schedule(run, None)
