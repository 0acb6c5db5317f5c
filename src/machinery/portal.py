"""A private event-loop thread: how the sync facade runs the asyncio core.

Every blocking method of the library submits its coroutine here and waits for the result, so
there is one implementation (async) and two faces (sync and async).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from machinery.errors import ServerClosedError, TimeoutError, UsageError
from machinery.loops import loop_factory

T = TypeVar("T")


class Portal:
    """Owns one event loop running in a daemon thread, started on first use, until close()."""

    def __init__(self, name: str = "machinery-portal", event_loop: str = "auto") -> None:
        self._name = name
        self._factory = loop_factory(event_loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def started(self) -> bool:
        """True while the loop thread runs (started by a blocking call, not yet closed)."""
        return self._loop is not None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._closed:
                raise ServerClosedError("this machinery Server is closed")
            if self._loop is None or self._loop.is_closed():
                ready = threading.Event()
                loop = self._factory()

                def run() -> None:
                    asyncio.set_event_loop(loop)
                    loop.call_soon(ready.set)
                    loop.run_forever()

                self._thread = threading.Thread(target=run, name=self._name, daemon=True)
                self._thread.start()
                ready.wait()
                self._loop = loop
            return self._loop

    def in_portal(self) -> bool:
        return self._thread is not None and threading.current_thread() is self._thread

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run a coroutine on the portal loop and block until it finishes."""
        if self.in_portal():
            coro.close()
            raise UsageError("a blocking machinery call was made on its own event-loop thread; use the a* twin")
        # Blocking inside another event loop stalls it; still allowed (e.g. sync code in async tasks
        # run on threads), but the caller should prefer the awaitable twin.
        # A bare lock instead of run_coroutine_threadsafe's concurrent Future and its Condition:
        # the caller sleeps on one futex and the loop wakes it with one release.
        try:
            loop = self.loop
        except ServerClosedError:
            coro.close()
            raise
        done = threading.Lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:  # the loop was closed meanwhile
            coro.close()
            raise ServerClosedError("this machinery Server is closed") from None
        if not done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            loop.call_soon_threadsafe(lambda: box[0].cancel() if box else coro.close())
            raise TimeoutError(f"a blocking machinery call did not finish within {timeout} s")
        task = box[0]
        if task.cancelled() and self._closed:
            raise ServerClosedError("this machinery Server was closed while the call waited")
        return task.result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        try:
            loop = self.loop
        except ServerClosedError:
            coro.close()
            raise
        return asyncio.run_coroutine_threadsafe(coro, loop)

    def close(self, timeout: float = 5.0) -> None:
        """Cancel what still runs on the loop (a driver's reader, a waiting call), stop the loop
        and close it: a loop dropped with pending tasks has asyncio print "Task was destroyed
        but it is pending!" when they are collected. For good: later calls raise
        ServerClosedError."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
            self._closed = True
        if loop is None or loop.is_closed():
            return
        if thread is None or thread is threading.current_thread():
            loop.call_soon(_cancel_all, loop)  # cannot wait here: the loop finishes after we return
            loop.call_soon(loop.stop)
            return
        finished = threading.Event()

        async def finish() -> None:
            try:
                await _cancel_and_wait(timeout)
            finally:
                loop.stop()
                finished.set()

        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(finish()))
        except RuntimeError:  # stopped and closed by someone else meanwhile
            return
        finished.wait(timeout + 1)
        thread.join(timeout)
        if not loop.is_running():
            loop.close()


def _cancel_all(loop: asyncio.AbstractEventLoop) -> None:
    for task in asyncio.all_tasks(loop):
        task.cancel()


async def _cancel_and_wait(timeout: float) -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks, timeout=timeout)
    loop = asyncio.get_running_loop()
    await asyncio.wait_for(loop.shutdown_asyncgens(), timeout)


class PortalUser:
    """Mixin for objects with blocking methods: they run on the Server's portal once attached."""

    _portal: Portal | None = None

    def attach(self, portal: Portal) -> None:
        self._portal = portal

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._portal is None:
            self._portal = Portal(f"machinery-{type(self).__name__}")
        return self._portal.run(coro)
