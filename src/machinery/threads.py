"""A thread pool for plain (non-async) task functions, built for many short tasks.

concurrent.futures costs a loop wake-up (a pipe write) and two future objects per call; here
finished calls are handed back in batches with one wake-up per batch, and threads start only
when every existing one is busy. A call runs in a copy of the caller's context (as
asyncio.to_thread does), so a task's current span and other context variables reach its function.

A call made with `watched=True` (a task with a time limit) can be interrupted: an exception is
raised in its thread asynchronously (PyThreadState_SetAsyncExc), and the thread can be abandoned
to finish alone while a fresh thread takes its place. It arrives at the thread's next Python
instruction: a blocking C call (time.sleep, a socket read) is not interrupted, the exception
comes when it returns. It never reaches the pool's own loop: it is set, under the pool's lock,
only while the call is marked running, and the mark is set and cleared under that lock by a
frame around the function (`_run_marked`), in which the last exception set before the mark
was cleared is delivered at the latest (any still pending is cleared there too).
"""

from __future__ import annotations

import asyncio
import contextvars
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_STOP = None


@dataclass(slots=True, eq=False)
class _Watch:
    """A watched call: the thread running it (None until it starts), whether its function runs,
    and whether the call was given up (before it started, or with its thread)."""

    thread: threading.Thread | None = None
    running: bool = False
    abandoned: bool = False


_Job = tuple[contextvars.Context, Callable[..., Any], list[Any], asyncio.Future[Any], _Watch | None]


class _Dropped(Exception):
    """A watched call given up before it started."""


def _set_async_exc(ident: int, exc: type[BaseException] | None) -> None:
    """Raise `exc` in thread `ident` at its next Python instruction; None clears a pending one."""
    import ctypes  # only tasks with time limits pay for it

    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident),
                                               ctypes.py_object(exc) if exc is not None else None)


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
        self._started = 0
        self._idle = 0
        self._closed = False
        #: watched calls not finished yet, by their future
        self._watched: dict[asyncio.Future[Any], _Watch] = {}

    def run(self, fn: Callable[..., Any], args: list[Any], watched: bool = False) -> asyncio.Future[Any]:
        """Call fn(*args) on a pool thread; `watched` allows interrupt() and abandon() on it."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        with self._lock:
            need_thread = self._idle == 0 and len(self._threads) < self._max
            if not need_thread:
                self._idle -= 1  # reserve an idle thread for this job
        if need_thread:
            self._start_thread()
        watch = None
        if watched:
            watch = _Watch()
            with self._lock:
                self._watched[fut] = watch
        self._jobs.put((contextvars.copy_context(), fn, args, fut, watch))
        return fut

    def interrupt(self, fut: asyncio.Future[Any], exc: type[BaseException]) -> bool:
        """Raise `exc` in the thread running the watched call of `fut`, if its function still
        runs there; False when it does not (not started, returned, abandoned)."""
        with self._lock:
            watch = self._watched.get(fut)
            if watch is None or not watch.running or watch.abandoned or watch.thread is None:
                return False
            _set_async_exc(_ident(watch.thread), exc)
            return True

    def abandon(self, fut: asyncio.Future[Any], exc: type[BaseException]) -> tuple[bool, threading.Thread | None]:
        """Give up the watched call of `fut`: if its function runs, raise `exc` in its thread and
        give that thread up (it exits when the function returns; a fresh thread takes its place in
        the pool); if it has not started, it never will. The future is cancelled. Returns (False,
        None) when the function already returned (its outcome is on its way to the future), else
        (True, the abandoned thread or None). Call it on the loop's thread."""
        with self._lock:
            watch = self._watched.get(fut)
            if watch is None or watch.abandoned or (watch.thread is not None and not watch.running):
                return False, None
            watch.abandoned = True
            thread = watch.thread
            if thread is not None:
                _set_async_exc(_ident(thread), exc)
                self._threads.remove(thread)
                self._idle += 1  # the replacement, idle until it takes a job
        fut.cancel()
        if thread is not None and not self._closed:
            self._start_thread()
        return True, thread

    def _start_thread(self) -> None:
        thread = threading.Thread(target=self._work, name=f"{self._name}-{self._started}", daemon=True)
        self._started += 1
        self._threads.append(thread)
        thread.start()

    def _work(self) -> None:
        jobs, finished = self._jobs, self._finished
        while True:
            job = jobs.get()
            if job is _STOP:
                return
            context, fn, args, fut, watch = job
            if watch is not None:
                outcome = self._call_watched(context, fn, args, fut, watch)
                if watch.abandoned:
                    if watch.thread is threading.current_thread():
                        return  # a fresh thread has taken this one's place
                    with self._lock:  # dropped before it started: this thread takes the next job
                        self._idle += 1
                    continue
            else:
                try:
                    outcome = (fut, True, context.run(fn, *args))
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

    def _call_watched(self, context: contextvars.Context, fn: Callable[..., Any], args: list[Any],
                      fut: asyncio.Future[Any], watch: _Watch) -> tuple[asyncio.Future[Any], bool, Any]:
        try:
            outcome: tuple[asyncio.Future[Any], bool, Any] = (fut, True, context.run(self._run_marked, watch, fn, args))
        except BaseException as exc:  # an injected one too: the limit passed before the function returned
            outcome = (fut, False, exc)
        with self._lock:
            self._watched.pop(fut, None)
        return outcome

    def _run_marked(self, watch: _Watch, fn: Callable[..., Any], args: list[Any]) -> Any:
        """Call fn(*args) marked as running. The mark is set and cleared under the lock with no
        point between where a pending exception is raised (a `with` block's entry and a plain
        store do not check for one); one set before the mark was cleared is raised at this
        frame's end at the latest, so none is left for the pool's loop."""
        try:
            with self._lock:
                if watch.abandoned:
                    raise _Dropped
                watch.thread = threading.current_thread()
                watch.running = True
            return fn(*args)
        finally:
            with self._lock:
                watch.running = False
                if watch.thread is not None:
                    _set_async_exc(_ident(watch.thread), None)

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


def _ident(thread: threading.Thread | None) -> int:
    assert thread is not None and thread.ident is not None
    return thread.ident
