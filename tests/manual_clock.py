"""A clock that moves only when a test moves it, and an in-process lock that reads it.

`PeriodicScheduler(lock, clock=ManualClock(...))` fires its ticks when the test advances the clock,
so the periodic tests run in milliseconds and count fires exactly instead of sampling wall-clock
seconds. The clock is thread-safe: a scheduler may sleep on a portal's loop while the test thread
advances time.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from dataclasses import dataclass, field

from machinery.config import Config
from machinery.drivers.memory.lock import MemoryLock

NS = 1_000_000_000
START_NS = 1_767_225_600 * NS + NS // 2  # 2026-01-01 00:00:00.5 UTC: whole-second ticks fall between steps


@dataclass(eq=False)
class _Sleeper:
    wake_ns: int
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[None] = field(repr=False)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class ManualClock:
    """Implements machinery.clock.Clock; time stands still between `advance()`/`jump()` calls."""

    def __init__(self, start_ns: int = START_NS) -> None:
        self._cond = threading.Condition()
        self._now = start_ns
        self._sleepers: list[_Sleeper] = []

    def now_ns(self) -> int:
        with self._cond:
            return self._now

    async def sleep(self, seconds: float) -> None:
        if seconds <= 0:
            await asyncio.sleep(0)
            return
        loop = asyncio.get_running_loop()
        with self._cond:
            sleeper = _Sleeper(self._now + max(1, round(seconds * NS)), loop, loop.create_future())
            self._sleepers.append(sleeper)
            self._cond.notify_all()
        try:
            await sleeper.future
        finally:
            with self._cond:
                if sleeper in self._sleepers:  # cancelled before it was woken
                    self._sleepers.remove(sleeper)
                self._cond.notify_all()

    def sleeping(self) -> int:
        """How many sleeps are waiting for the clock right now."""
        with self._cond:
            return len(self._sleepers)

    def wait_sleeping(self, count: int, timeout: float = 10.0) -> None:
        """Block until `count` sleeps wait on the clock, i.e. every schedule loop is idle until its next tick."""
        with self._cond:
            if not self._cond.wait_for(lambda: len(self._sleepers) >= count, timeout):
                raise AssertionError(f"{len(self._sleepers)} of {count} loops came to sleep within {timeout} s")

    def jump(self, seconds: float) -> None:
        """Move time on at once, as a machine finds it when it wakes from suspension: every due sleep ends."""
        with self._cond:
            self._now += round(seconds * NS)
            self._wake_due()

    def advance(self, seconds: float, sleeping: int, timeout: float = 10.0) -> None:
        """Let `seconds` pass in order: end each sleep at its own wake-up time, and before moving on wait
        (up to `timeout`) until the `sleeping` loops that use this clock all sleep again."""
        with self._cond:
            target = self._now + round(seconds * NS)
        while True:
            self.wait_sleeping(sleeping, timeout)
            with self._cond:
                due = min((s.wake_ns for s in self._sleepers), default=target + 1)
                if due > target:
                    self._now = target
                    return
                self._now = max(self._now, due)
                self._wake_due()

    async def aadvance(self, seconds: float, sleeping: int, timeout: float = 10.0) -> None:
        """`advance()` from a coroutine on the loop the schedulers run on (the waiting happens in a thread)."""
        await asyncio.to_thread(self.advance, seconds, sleeping, timeout)

    async def await_sleeping(self, count: int, timeout: float = 10.0) -> None:
        await asyncio.to_thread(self.wait_sleeping, count, timeout)

    def _wake_due(self) -> None:
        due = [s for s in self._sleepers if s.wake_ns <= self._now]
        for sleeper in due:
            self._sleepers.remove(sleeper)
            with contextlib.suppress(RuntimeError):  # that loop has closed: nothing waits any more
                sleeper.loop.call_soon_threadsafe(_resolve, sleeper.future)
        if due:
            self._cond.notify_all()


class ClockedLock(MemoryLock):
    """MemoryLock whose keys expire by the manual clock, as a lock store's would by real time."""

    def __init__(self, clock: ManualClock) -> None:
        super().__init__(Config(broker="memory", result_backend="memory"))
        self.clock = clock

    async def acquire(self, key: str, expires_at_ns: int) -> bool:
        now = self.clock.now_ns()
        with self._mutex:
            current = self._held.get(key)
            if current is not None and current > now:
                return False
            self._held[key] = expires_at_ns
            return True
