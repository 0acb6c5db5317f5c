"""A watchdog for the worker's event loop: a blocking call inside an `async def` task (time.sleep,
a sync HTTP client, CPU-heavy work) stalls every task of that worker without a sound. The loop
stamps a heartbeat a few times per threshold; a thread notices when the stamp grows older than the
threshold and logs which task the loop is stuck in, read from the loop thread's Python stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from types import CodeType, FrameType
from typing import TYPE_CHECKING

from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.task import TaskSpec


class LoopWatch:
    """Warn once per stall longer than `threshold` seconds, naming the task it happens in.

    `tasks` maps the code objects of the async task functions to their task names; a stall whose
    stack holds none of them is reported by the innermost Python frame instead.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, threshold: float, tasks: Mapping[CodeType, str],
                 worker: str) -> None:
        self.loop = loop
        self.threshold = threshold
        self.tasks = dict(tasks)
        self.worker = worker
        self.stalls = 0  # stalls reported so far
        self._interval = max(threshold / 4, 0.01)
        self._beat = time.monotonic()
        self._handle: asyncio.TimerHandle | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop_thread = 0

    def start(self) -> None:
        """Start watching; call on the loop's own thread."""
        self._loop_thread = threading.get_ident()
        self._tick()
        self._thread = threading.Thread(target=self._watch, name=f"machinery-loopwatch-{self.worker}", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _tick(self) -> None:
        self._beat = time.monotonic()
        if not self._stop.is_set():
            with contextlib.suppress(RuntimeError):  # the loop is closing
                self._handle = self.loop.call_later(self._interval, self._tick)

    def _watch(self) -> None:
        log = get_logger()
        stalled_since: float | None = None
        while not self._stop.wait(self._interval):
            beat = self._beat
            late = time.monotonic() - beat
            if stalled_since is None and late > self.threshold:
                stalled_since = beat
                self.stalls += 1
                where = self._where(sys._current_frames().get(self._loop_thread))
                log.warning(
                    "worker %s: the event loop has been blocked for %.1f s by %s; every other task on this "
                    "worker waits meanwhile. Inside an async def task, await instead of blocking "
                    "(asyncio.sleep, an asyncio client, asyncio.to_thread(...)), or make it a plain def task, "
                    "which runs on the worker's threads.", self.worker, late, where)
            elif stalled_since is not None and beat > stalled_since:
                log.info("worker %s: the event loop turns again after %.1f s", self.worker, beat - stalled_since)
                stalled_since = None

    def _where(self, frame: FrameType | None) -> str:
        """`async task 'name' (file:line)` for the innermost task frame, else the innermost frame."""
        innermost = frame
        while frame is not None:
            name = self.tasks.get(frame.f_code)
            if name is not None:
                return f"async task {name!r} ({_place(frame)})"
            frame = frame.f_back
        if innermost is None:
            return "code outside Python (no stack to show)"
        return f"code outside any task ({_place(innermost)} in {innermost.f_code.co_name})"


def _place(frame: FrameType) -> str:
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


def task_codes(specs: Iterable[TaskSpec]) -> dict[CodeType, str]:
    """The code objects of the async task functions (an async callable object's __call__ too)."""
    out: dict[CodeType, str] = {}
    for spec in specs:
        if not spec.is_async:
            continue
        fn = inspect.unwrap(spec.fn)
        call = getattr(type(fn), "__call__", None)  # noqa: B004 - an async callable object's method
        code = getattr(fn, "__code__", None) or getattr(call, "__code__", None)
        if isinstance(code, CodeType):
            out[code] = spec.name
    return out
