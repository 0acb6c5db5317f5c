"""Worker lifecycle: how much a worker holds, how it stops, and when it retires to be replaced.

A worker holds at most `prefetch` unfinished messages (running, or waiting for a slot). On a
stop, the messages it fetched but did not start go back to the broker at once, and running tasks
get `grace` seconds to finish before they are handed back too. Under a supervisor (`machinery
worker --processes`), a worker retires, stopping the same way, after `max_tasks` messages, when
its memory passes `max_memory_mb`, or when a thread ignores its hard time limit; its process then
exits with RECYCLE_EXIT (machinery.cli.supervisor) and a fresh one takes its place.
"""

from __future__ import annotations

import asyncio
import math
import os
import sys
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypedDict

from machinery.errors import MachineryError
from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.drivers.broker import Broker, Delivery

#: seconds a stopping worker waits for its running tasks before handing them back
DEFAULT_GRACE = 30.0


class WorkerOptions(TypedDict, total=False):
    """What `server.new_worker(...)` takes besides tag, concurrency and queue (see Worker)."""

    prefetch: int | None
    grace: float
    time_limit: float | timedelta | None
    soft_time_limit: float | timedelta | None
    max_tasks: int
    max_memory_mb: float
    supervised: bool


def whole(name: str, value: object) -> int:
    """An int >= 0, or MachineryError naming the option."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise MachineryError(f"worker option {name} must be an int >= 0, got {value!r}")
    return value


def amount(name: str, value: object) -> float:
    """A finite number >= 0, or MachineryError naming the option."""
    if (not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value)
            or value < 0):
        raise MachineryError(f"worker option {name} must be a number >= 0, got {value!r}")
    return float(value)


def rss_mb() -> float:
    """This process's resident memory in MB (2**20 bytes), shared pages included; where
    /proc is missing, the peak instead."""
    try:
        with open("/proc/self/statm", "rb") as f:
            pages = int(f.read().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024


class MemoryLimit:
    """Retires the worker when, after a task, its resident memory is past `limit_mb` (a read
    of /proc, about 5 microseconds per task). A worker already past it when it starts says so
    and is not retired for it: a fresh process would be as big."""

    def __init__(self, tag: str, limit_mb: float, retire: Callable[[str], None]) -> None:
        self.limit_mb = limit_mb
        self._retire = retire
        used = rss_mb()
        self.active = used <= limit_mb
        if not self.active:
            get_logger().warning("worker %s uses %.0f MB before running any task, more than its memory limit "
                                 "of %g MB: it is not replaced for that (raise the limit)", tag, used, limit_mb)

    def after_task(self) -> None:
        if not self.active:
            return
        used = rss_mb()
        if used > self.limit_mb:
            self.active = False
            self._retire(f"its memory ({used:.0f} MB) passed its limit of {self.limit_mb:g} MB")


async def wait_running(active: Mapping[asyncio.Task[None], Delivery], abort_wait: asyncio.Future[Any],
                       grace: float, tag: str) -> bool:
    """Wait until the tasks in `active` (which shrinks as they end) are done, or `abort_wait` is,
    at most `grace` seconds; True when tasks still run after the grace."""
    if not active:
        return False
    loop = asyncio.get_running_loop()
    get_logger().info("worker %s: waiting up to %g s for %d running tasks", tag, grace, len(active))
    deadline = loop.time() + grace
    while active and not abort_wait.done():
        left = deadline - loop.time()
        if left <= 0:
            get_logger().warning("worker %s: %d tasks still run after the %g s grace; handing them back",
                                 tag, len(active), grace)
            return True
        await asyncio.wait([abort_wait, *active], timeout=left, return_when=asyncio.FIRST_COMPLETED)
    return False


async def hand_back(broker: Broker, tasks: Mapping[asyncio.Task[None], Delivery], tag: str, why: str) -> None:
    """Cancel these messages' tasks and give the messages back to the broker, visible at once."""
    if not tasks:
        return
    for task in tasks:
        task.cancel()
    await asyncio.wait(list(tasks), timeout=5)
    try:
        await asyncio.wait_for(broker.requeue(list(tasks.values())), 5)
    except Exception as exc:  # the lease or connection loss returns them anyway
        get_logger().warning("worker %s: could not give %d messages back: %s", tag, len(tasks), exc)
    else:
        get_logger().info("worker %s: gave %d messages back (%s)", tag, len(tasks), why)
