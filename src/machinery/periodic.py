"""The periodic-task engine: fire each registered schedule once per tick across all processes.

Registering a schedule only records it; the processes that ask to run the schedules (`machinery
scheduler`, `machinery worker --scheduler`, `Server.start_scheduler()`) run a `PeriodicScheduler`. They
share a `Lock` (Redis, SQLite, or in-process for a single process) and at each tick the one process that
wins the lock fires.

**Ticks.** A tick is a time computed from the spec alone (cron specs: robfig's `Next`; `@every d`: the
multiples of `d` since the Unix epoch, where Go counts from each process's start), so every process
computes the same ticks and the same lock keys, whenever it started.

**Lock keys.** Two keys are taken, in this order, and the process fires only if it wins both:

1. the tick key `<base>:<tick Unix ns>`, held until `max_clock_skew` seconds after the following tick.
   Each tick has its own key, so no later attempt can win a tick that was already fired: a machine whose
   clock lags (or an event loop that woke late) finds the key still held and skips;
2. Go's key `<base>` itself, held until the following tick minus 1 ns, exactly as Go Machinery takes it
   (`"machinery_lock_" + program + name + spec`), so Go and Python schedulers of the same program and
   lock store still fire a tick once between them. With `go_compatible=False` only the tick key is used.

**Program.** Go puts `basename(os.Args[0])` in the key. For Python that is fragile (`python -m app`
gives `__main__.py`, the CLI gives `machinery`, a script its file name), and processes started
differently would each fire. So `program` defaults to `""`: the identity of a periodic task is its name
and spec in the lock store, and names must be unique among the programs that share one. Pass the Go
binary's name as `program` to dedupe with Go Machinery processes.

**Clock skew.** The tick key protects against clocks that differ by up to one period plus
`max_clock_skew` (default 60 s); beyond that a lagging machine can fire a tick again after the key
expired. Go's single key, held only until the next tick, gives no such margin.

**Missed ticks are skipped, not replayed.** A tick is only attempted before the tick after it is due; if
every process was down (or blocked) through some ticks, the schedule resumes at the next future tick.
A process that dies after winning a tick may lose that tick; the next tick is fired by another process.

**Slow fires.** `fire()` is awaited in the schedule's own loop, so a fire that outlasts the period makes
this process skip ticks (others, if any, take them) instead of piling up concurrent sends.

**Clock.** Every reading of the time and every wait goes through `clock` (a `machinery.clock.Clock`;
the real clock by default), so tests can move time by hand and fire ticks without real waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from machinery import cron
from machinery.clock import SYSTEM_CLOCK, Clock
from machinery.errors import ConfigError, UsageError
from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.drivers.lock import Lock
    from machinery.portal import Portal

__all__ = ["FireFn", "PeriodicScheduler"]

FireFn = Callable[[], Awaitable[None]]

_NS = 1_000_000_000
_MAX_SLEEP = 30.0  # re-read the wall clock at least this often, so clock steps are noticed


@dataclass(frozen=True, slots=True, eq=False)
class _Entry:
    name: str
    spec: str
    schedule: cron.Schedule
    fire: FireFn
    key: str


class PeriodicScheduler:
    """Runs periodic schedules in the background of any process; see the module docstring for the rules.

    `add()` may be called before or while `run()` runs, from any thread.
    """

    def __init__(self, lock: Lock, program: str | None = None, *, go_compatible: bool = True,
                 max_clock_skew: float = 60.0, clock: Clock = SYSTEM_CLOCK) -> None:
        if max_clock_skew < 0:
            raise ConfigError(f"max_clock_skew must be >= 0, got {max_clock_skew}")
        self.lock = lock
        self.clock = clock
        self.program = "" if program is None else program
        self.go_compatible = go_compatible
        self.max_clock_skew = max_clock_skew
        self._mutex = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changed: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._bg: tuple[asyncio.Task[None], threading.Event, Portal] | None = None

    # --- registration --------------------------------------------------------------------------

    def lock_key(self, name: str, spec: str) -> str:
        """Go Machinery's lock key for a schedule (the tick keys append `:<tick ns>`)."""
        return f"machinery_lock_{self.program}{name}{spec}"

    def add(self, spec: str, name: str, fire: FireFn) -> None:
        """Register (or replace: the name is the identity) a schedule; a bad spec raises CronError now."""
        if not name:
            raise cron.CronError(f"cron spec {spec!r}: a periodic task needs a non-empty name")
        schedule = cron.parse(spec)
        schedule.tick_after_ns(self.clock.now_ns())  # raises CronError for a spec that never fires
        entry = _Entry(name, spec, schedule, fire, self.lock_key(name, spec))
        with self._mutex:
            self._entries[name] = entry
        self._notify()

    def remove(self, name: str) -> bool:
        """Stop firing `name`; False if it was not registered."""
        with self._mutex:
            found = self._entries.pop(name, None) is not None
        if found:
            self._notify()
        return found

    def names(self) -> list[str]:
        with self._mutex:
            return list(self._entries)

    def _notify(self) -> None:
        with self._mutex:
            loop, changed = self._loop, self._changed
        if loop is not None and changed is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(changed.set)

    # --- running -------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        with self._mutex:
            return self._loop is not None

    async def run(self) -> None:
        """Fire the registered schedules until cancelled (one task per schedule, restarted on change)."""
        changed = asyncio.Event()
        with self._mutex:
            if self._loop is not None:
                raise UsageError("this PeriodicScheduler is already running")
            self._loop, self._changed = asyncio.get_running_loop(), changed
            self._task = asyncio.current_task()
        tasks: dict[str, tuple[_Entry, asyncio.Task[None]]] = {}
        try:
            while True:
                changed.clear()
                with self._mutex:
                    entries = dict(self._entries)
                for name, (entry, task) in list(tasks.items()):
                    if entries.get(name) is not entry:
                        task.cancel()
                        del tasks[name]
                for name, entry in entries.items():
                    if name not in tasks:
                        task = asyncio.create_task(self._run_entry(entry), name=f"machinery-periodic:{name}")
                        tasks[name] = (entry, task)
                await changed.wait()
        finally:
            # Cancel until they are really done: on Python 3.11 a cancellation racing a client's own
            # timeout (redis-py uses asyncio.wait_for) can be swallowed, and the task would run on.
            pending = {t for _, t in tasks.values()}
            while pending:
                for task in pending:
                    task.cancel()
                _, pending = await asyncio.wait(pending, timeout=0.5)
            with self._mutex:
                self._loop = self._changed = self._task = None

    def start(self, portal: Portal) -> None:
        """Run in the background on `portal`'s event-loop thread (no-op if already running there)."""
        with self._mutex:
            if self._bg is not None and not self._bg[0].done():
                if self._bg[2] is portal:
                    return  # already running there; schedules added later are picked up
                raise UsageError("this PeriodicScheduler is already started on another portal")

        async def spawn() -> asyncio.Task[None]:
            return asyncio.create_task(self.run(), name="machinery-periodic")

        task = portal.run(spawn()) if not portal.in_portal() else asyncio.create_task(self.run())
        done = threading.Event()
        task.add_done_callback(lambda _: done.set())
        with self._mutex:
            self._bg = (task, done, portal)

    def stop(self, timeout: float | None = 10.0) -> None:
        """Stop a `start()`ed scheduler and wait (up to `timeout`) until its loop has ended."""
        with self._mutex:
            bg, self._bg = self._bg, None
        if bg is None:
            return
        task, done, portal = bg
        if portal.in_portal():
            task.cancel()  # waiting here would block the loop that has to finish the cancellation
            return
        with contextlib.suppress(RuntimeError):  # the portal's loop is already closed
            task.get_loop().call_soon_threadsafe(task.cancel)
        done.wait(timeout)

    async def astop(self) -> None:
        """Stop from async code: cancel the running run() (started here or by start()) and wait for it."""
        with self._mutex:
            bg, self._bg = self._bg, None
            task = bg[0] if bg is not None else self._task
        if task is None:
            return
        if task.get_loop() is asyncio.get_running_loop():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return
        done = threading.Event()

        def cancel() -> None:
            task.add_done_callback(lambda _: done.set())
            task.cancel()

        with contextlib.suppress(RuntimeError):  # that loop is already closed
            task.get_loop().call_soon_threadsafe(cancel)
        await asyncio.to_thread(done.wait, 10.0)

    # --- one schedule --------------------------------------------------------------------------

    async def _run_entry(self, entry: _Entry) -> None:
        while True:
            try:
                await self._tick_loop(entry)
            except Exception:  # a bug, not a fire or lock error (those are handled per tick)
                get_logger().exception("periodic task %s (%s): scheduler loop failed; restarting",
                                       entry.name, entry.spec)
                await self.clock.sleep(1.0)

    async def _tick_loop(self, entry: _Entry) -> None:
        log = get_logger()
        held: deque[tuple[int, str]] = deque()  # tick keys this process won: (expiry ns, key)
        tick = entry.schedule.tick_after_ns(self.clock.now_ns())
        while True:
            await self._sleep_until(tick)
            following = entry.schedule.tick_after_ns(tick)
            now = self.clock.now_ns()
            if now >= following:
                log.warning("periodic task %s (%s): missed ticks while blocked or suspended; "
                            "skipping to the next one", entry.name, entry.spec)
                tick = entry.schedule.tick_after_ns(now)
                continue
            await self._fire_tick(entry, tick, following, held)
            await self._release_expired(held)
            tick = following

    async def _fire_tick(self, entry: _Entry, tick: int, following: int, held: deque[tuple[int, str]]) -> None:
        log = get_logger()
        tick_key, expires = f"{entry.key}:{tick}", following + int(self.max_clock_skew * _NS)
        try:
            won = await self.lock.acquire(tick_key, expires)
            if won:
                held.append((expires, tick_key))
            if won and self.go_compatible:
                won = await self.lock.acquire(entry.key, following - 1)
        except Exception:
            log.exception("periodic task %s (%s): taking the lock failed; tick skipped",
                          entry.name, entry.spec)
            return
        if not won:
            log.debug("periodic task %s: tick %d taken by another process", entry.name, tick)
            return
        log.debug("periodic task %s: firing tick %d", entry.name, tick)
        try:
            await entry.fire()
        except Exception:
            log.exception("periodic task %s (%s): firing failed", entry.name, entry.spec)

    async def _release_expired(self, held: deque[tuple[int, str]]) -> None:
        """Delete our expired tick keys: locks without a TTL of their own (SQLite, memory) would keep them."""
        now = self.clock.now_ns()
        while held and held[0][0] < now:
            _, key = held.popleft()
            try:
                await self.lock.release(key)
            except Exception as exc:  # harmless: the key has expired anyway
                get_logger().debug("periodic: releasing expired lock key %s failed: %s", key, exc)

    async def _sleep_until(self, when_ns: int) -> None:
        """Sleep until the clock reaches `when_ns`, in steps, so clock changes are followed."""
        while True:
            remaining = (when_ns - self.clock.now_ns()) / _NS
            if remaining <= 0:
                return
            await self.clock.sleep(min(remaining, _MAX_SLEEP))
