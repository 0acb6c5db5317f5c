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

from machinery.loops import loop_factory

T = TypeVar("T")


class Portal:
    """Owns one event loop running in a daemon thread, started on first use."""

    def __init__(self, name: str = "machinery-portal", event_loop: str = "auto") -> None:
        self._name = name
        self._factory = loop_factory(event_loop)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
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
            raise RuntimeError("a blocking machinery call was made on its own event-loop thread; use the a* twin")
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is not None and running is not self._loop:
            # Blocking inside another event loop stalls it; still allowed (e.g. sync code in async tasks
            # run on threads), but the caller should prefer the awaitable twin.
            pass
        # A bare lock instead of run_coroutine_threadsafe's concurrent Future and its Condition:
        # the caller sleeps on one futex and the loop wakes it with one release.
        loop = self.loop
        done = threading.Lock()
        done.acquire()
        box: list[asyncio.Task[T]] = []

        def start() -> None:
            task = loop.create_task(coro)
            box.append(task)
            task.add_done_callback(lambda _: done.release())

        try:
            loop.call_soon_threadsafe(start)
        except RuntimeError:
            coro.close()
            raise
        if not done.acquire(timeout=-1 if timeout is None else max(timeout, 0.0)):
            loop.call_soon_threadsafe(lambda: box[0].cancel() if box else coro.close())
            raise concurrent.futures.TimeoutError()
        return box[0].result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(loop.stop)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=5)
            if not loop.is_running():
                loop.close()


class PortalUser:
    """Mixin for objects with blocking methods: they run on the Server's portal once attached."""

    _portal: Portal | None = None

    def attach(self, portal: Portal) -> None:
        self._portal = portal

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._portal is None:
            self._portal = Portal(f"machinery-{type(self).__name__}")
        return self._portal.run(coro)
