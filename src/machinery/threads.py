"""A thread pool for plain (non-async) task functions, built for many short tasks.

concurrent.futures costs a loop wake-up (a pipe write) and two future objects per call; here
finished calls are handed back in batches with one wake-up per batch, and threads start only
when every existing one is busy. A call runs in a copy of the caller's context (as
asyncio.to_thread does), so a task's current span and other context variables reach its function.
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

_STOP = None
_Job = tuple[contextvars.Context, Callable[..., Any], list[Any], asyncio.Future[Any]]


class SyncRunner:
    """Runs functions on up to `max_threads` threads; results arrive as asyncio futures."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_threads: int, name: str = "machinery") -> None:
        self._loop = loop
        self._max = max(1, max_threads)
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._finished: deque[tuple[asyncio.Future[Any], bool, Any]] = deque()
        self._lock = threading.Lock()
        self._wake_pending = False
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._closed = False

    def run(self, fn: Callable[..., Any], args: list[Any]) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = self._loop.create_future()
        with self._lock:
            need_thread = self._idle == 0 and len(self._threads) < self._max
            if not need_thread:
                self._idle -= 1  # reserve an idle thread for this job
        if need_thread:
            self._start_thread()
        self._jobs.put((contextvars.copy_context(), fn, args, fut))
        return fut

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self._name}-{len(self._threads)}", daemon=True)
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        jobs, finished = self._jobs, self._finished
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            context, fn, args, fut = job
            try:
                outcome: tuple[asyncio.Future[Any], bool, Any] = (fut, True, context.run(fn, *args))
            except BaseException as exc:  # handed to the awaiting task, which decides
                outcome = (fut, False, exc)
            with self._lock:
                finished.append(outcome)
                self._idle += 1
                wake = not self._wake_pending
                self._wake_pending = True
            if wake:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:  # the loop is closed: nobody waits any more
                    return

    def _deliver(self) -> None:
        with self._lock:
            self._wake_pending = False
            batch = list(self._finished)
            self._finished.clear()
        for fut, ok, value in batch:
            if fut.done():
                continue
            if ok:
                fut.set_result(value)
            else:
                fut.set_exception(value)

    def shutdown(self) -> None:
        """Stop idle threads; a thread still running a task finishes it and then exits (daemon)."""
        if self._closed:
            return
        self._closed = True
        for _ in self._threads:
            self._jobs.put(_STOP)
