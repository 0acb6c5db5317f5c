"""The clock the periodic scheduler reads and sleeps on: the real one unless another is injected.

The scheduler only needs the wall-clock time and a way to wait, so a test (or a simulation) can pass
a clock of its own and fire ticks without waiting for real seconds to pass.
"""

from __future__ import annotations

import asyncio
import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    """Wall-clock time and sleeping, as `PeriodicScheduler` uses them."""

    def now_ns(self) -> int:
        """The current wall-clock time in Unix nanoseconds (the time `time.time_ns()` gives)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Return after `seconds` of this clock's time have passed (at once for 0 or less)."""
        ...


class SystemClock:
    """The real clock: `time.time_ns()` and `asyncio.sleep()`."""

    def now_ns(self) -> int:
        return time.time_ns()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


SYSTEM_CLOCK: Clock = SystemClock()  # stateless, so one instance serves every scheduler
