"""Time limits: which apply to a run, and running a task function under them.

A run's limits come from its message's Headers (a per-send override, which Go workers ignore),
else from its task's registration options, else from the worker's default; the soft and the hard
limit are looked up separately, and 0 at any level means "no limit" (a send or a task can lift a
worker's default). A task without limits runs as before, with nothing added to its path.

Soft: the task is told, once. An `async def` task is cancelled (it sees CancelledError; if that
comes out, the run fails with SoftTimeLimitExceeded); a plain function's thread gets
SoftTimeLimitExceeded raised asynchronously (machinery.threads). Hard: the run ends at once with
TimeLimitExceeded, its coroutine cancelled, or its thread given TimeLimitExceeded and abandoned; a
thread that is still alive STUCK_GRACE seconds later is reported to the worker, which may stop
so that its supervisor starts a fresh process.
"""

from __future__ import annotations

import asyncio
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from machinery.errors import SoftTimeLimitExceeded, TimeLimitExceeded
from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.tasks.signature import Signature
    from machinery.threads import SyncRunner

#: the Headers keys of a per-send override, in seconds (a JSON number)
HARD_HEADER = "machinery_time_limit"
SOFT_HEADER = "machinery_soft_time_limit"
#: option name -> the Headers key that carries it on one send
HEADERS = {"time_limit": HARD_HEADER, "soft_time_limit": SOFT_HEADER}
#: seconds an abandoned thread has to stop before it counts as stuck
STUCK_GRACE = 2.0


def seconds(value: object) -> float | None:
    """`value` (seconds as an int or float, or a timedelta) as finite seconds >= 0; None if it
    is not one."""
    if isinstance(value, timedelta):
        s = value.total_seconds()
    elif isinstance(value, int | float) and not isinstance(value, bool):
        s = float(value)
    else:
        return None
    return s if math.isfinite(s) and s >= 0 else None


def describe(s: float) -> str:
    return f"{s:g} s"


@dataclass(frozen=True, slots=True)
class TimeLimits:
    """A run's limits in seconds; 0 = none."""

    soft: float = 0.0
    hard: float = 0.0

    def __bool__(self) -> bool:
        return bool(self.soft or self.hard)


class TimeLimiter:
    """A worker's time limits: resolves them per run and runs limited task functions."""

    def __init__(self, default: TimeLimits, pool: SyncRunner, on_stuck: Callable[[str], None]) -> None:
        self.default = default
        self._pool = pool
        self._on_stuck = on_stuck
        #: coroutines cancelled at their hard limit that did not end yet (kept from the collector)
        self._abandoned: set[asyncio.Future[Any]] = set()

    def limits_for(self, sig: Signature, options: Mapping[str, Any]) -> TimeLimits | None:
        """The run's limits (its task registered with `options`), or None when it has none."""
        headers = sig.headers
        if not headers and "time_limit" not in options and "soft_time_limit" not in options:
            return self.default or None
        limits = TimeLimits(_pick(sig, headers, "soft_time_limit", options, self.default.soft),
                            _pick(sig, headers, "time_limit", options, self.default.hard))
        return limits or None

    async def run(self, fn: Callable[..., Any], is_async: bool, args: list[Any], sig: Signature,
                  limits: TimeLimits) -> Any:
        """Call the task function under `limits`; raises SoftTimeLimitExceeded or TimeLimitExceeded."""
        label = f"task {sig.name} ({sig.uuid})"
        if is_async:
            return await self._run_coroutine(fn, args, limits, label)
        return await self._run_thread(fn, args, limits, label)

    async def _run_coroutine(self, fn: Callable[..., Any], args: list[Any], limits: TimeLimits, label: str) -> Any:
        loop = asyncio.get_running_loop()
        task = asyncio.ensure_future(fn(*args))
        started = loop.time()
        soft_hit = False
        try:
            if _soft_first(limits):
                done, _ = await asyncio.wait({task}, timeout=limits.soft)
                if not done:
                    soft_hit = True
                    get_logger().warning("%s passed its soft time limit (%s): cancelling it", label,
                                         describe(limits.soft))
                    task.cancel(f"soft time limit ({describe(limits.soft)}) exceeded")
            if limits.hard:
                done, _ = await asyncio.wait({task}, timeout=max(0.0, started + limits.hard - loop.time()))
                if not done:
                    get_logger().error("%s passed its hard time limit (%s): cancelled, FAILURE", label,
                                       describe(limits.hard))
                    task.cancel(f"hard time limit ({describe(limits.hard)}) exceeded")
                    self._abandoned.add(task)
                    task.add_done_callback(self._forget)
                    raise TimeLimitExceeded(f"hard time limit ({describe(limits.hard)}) exceeded")
            else:
                await asyncio.wait({task})
        except asyncio.CancelledError:  # the worker gives this run up (abrupt stop, hand-back)
            task.cancel()
            raise
        try:
            return task.result()
        except asyncio.CancelledError as exc:
            if soft_hit:
                raise SoftTimeLimitExceeded(f"soft time limit ({describe(limits.soft)}) exceeded") from exc
            raise

    def _forget(self, task: asyncio.Future[Any]) -> None:
        self._abandoned.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: what it did after its hard limit is of no use

    async def _run_thread(self, fn: Callable[..., Any], args: list[Any], limits: TimeLimits, label: str) -> Any:
        pool = self._pool
        loop = asyncio.get_running_loop()
        fut = pool.run(fn, args, watched=True)
        started = loop.time()
        try:
            if _soft_first(limits):
                done, _ = await asyncio.wait({fut}, timeout=limits.soft)
                if not done and pool.interrupt(fut, SoftTimeLimitExceeded):
                    get_logger().warning("%s passed its soft time limit (%s): SoftTimeLimitExceeded raised in "
                                         "its thread", label, describe(limits.soft))
            if limits.hard:
                done, _ = await asyncio.wait({fut}, timeout=max(0.0, started + limits.hard - loop.time()))
                if not done:
                    stopped, thread = pool.abandon(fut, TimeLimitExceeded)
                    if stopped:  # else it has just returned: its outcome stands
                        get_logger().error("%s passed its hard time limit (%s): FAILURE, TimeLimitExceeded raised "
                                           "in its thread, which is abandoned", label, describe(limits.hard))
                        if thread is not None:
                            loop.call_later(STUCK_GRACE, self._check_stopped, thread, label)
                        raise TimeLimitExceeded(f"hard time limit ({describe(limits.hard)}) exceeded")
            return await fut
        except asyncio.CancelledError:
            fut.cancel()
            raise
        except SoftTimeLimitExceeded as exc:
            if exc.args == SoftTimeLimitExceeded().args:  # the one raised in its thread: name the limit
                exc.args = (f"soft time limit ({describe(limits.soft)}) exceeded",)
            raise
        except TimeLimitExceeded as exc:
            if exc.args == TimeLimitExceeded().args:  # raised in its thread as its function returned
                exc.args = (f"hard time limit ({describe(limits.hard)}) exceeded",)
            raise

    def _check_stopped(self, thread: threading.Thread, label: str) -> None:
        if thread.is_alive():
            self._on_stuck(f"the thread of {label} has not stopped {describe(STUCK_GRACE)} after its hard "
                           "time limit (a blocking call does not see the exception until it returns)")


def _soft_first(limits: TimeLimits) -> bool:
    return bool(limits.soft) and (not limits.hard or limits.soft < limits.hard)


def _pick(sig: Signature, headers: Mapping[str, Any] | None, name: str, options: Mapping[str, Any],
          default: float) -> float:
    """One limit: the message's header, else the task's option, else the worker's default."""
    if headers:
        key = HEADERS[name]
        raw = headers.get(key)
        if raw is not None:
            value = seconds(raw)
            if value is not None:
                return value
            get_logger().warning("task %s (%s): ignoring header %s=%r (not a number of seconds >= 0)",
                                 sig.name, sig.uuid, key, raw)
    option = options.get(name)
    if option is not None:
        value = seconds(option)
        if value is not None:
            return value
    return default
