"""The periodic-task engine: one fire per tick across processes sharing a lock, skew and failures.

The multi-process tests start three OS processes (tests/periodic_child.py) on the Redis lock (db 11 of
this run's own server, keys under a per-test program prefix) and on the SQLite lock. With CI=true a Redis
that cannot be started fails.
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter, deque
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery.config import Config
from machinery.cron import CronError
from machinery.drivers.memory.lock import MemoryLock
from machinery.errors import ConfigError
from machinery.periodic import FireFn, PeriodicScheduler
from machinery.portal import Portal
from manual_clock import START_NS, ClockedLock, ManualClock
from redis_servers import redis_url

CHILD = Path(__file__).with_name("periodic_child.py")
REDIS_DB = 11
NS = 1_000_000_000


def memory_lock() -> MemoryLock:
    return MemoryLock(Config(broker="memory", result_backend="memory"))


def recorder(sink: list[tuple[str, int]], who: str) -> object:
    async def fire() -> None:
        sink.append((who, time.time_ns()))

    return fire


# --- registration ------------------------------------------------------------------------------


async def _noop() -> None:
    return None


@pytest.mark.parametrize(("spec", "message"), [
    ("61 * * * *", "minute value 61 out of range 0-59"),
    ("* * * *", "expected 5 fields"),
    ("@every soon", "invalid @every duration"),
    ("CRON_TZ=Nowhere/Land * * * * *", "unknown time zone"),
    ("0 0 30 2 *", "no matching time within 5 years"),  # parses, but never fires: refused too
])
def test_bad_spec_rejected_at_add(spec: str, message: str) -> None:
    scheduler = PeriodicScheduler(memory_lock())
    with pytest.raises(CronError, match=message) as info:
        scheduler.add(spec, "job", _noop)
    assert isinstance(info.value, ConfigError)
    assert scheduler.names() == []


def test_empty_name_rejected() -> None:
    with pytest.raises(CronError, match="non-empty name"):
        PeriodicScheduler(memory_lock()).add("@hourly", "", _noop)


def test_same_name_replaces_and_remove() -> None:
    scheduler = PeriodicScheduler(memory_lock())
    scheduler.add("@hourly", "job", _noop)
    scheduler.add("@daily", "job", _noop)
    scheduler.add("@daily", "other", _noop)
    assert sorted(scheduler.names()) == ["job", "other"]
    assert scheduler.remove("job") is True
    assert scheduler.remove("job") is False
    assert scheduler.names() == ["other"]


def test_lock_key_is_gos_scheme() -> None:
    assert PeriodicScheduler(memory_lock()).lock_key("periodic-task", "0 6 * * ?") == (
        "machinery_lock_periodic-task0 6 * * ?"
    )
    # Go: "machinery_lock_" + basename(os.Args[0]) + name + spec, no separators
    assert PeriodicScheduler(memory_lock(), program="worker").lock_key("t", "@hourly") == (
        "machinery_lock_workert@hourly"
    )


# --- in-process behaviour (on a manual clock: ticks fire when the test moves time) ------------------


def clocked(fires: list[tuple[str, int]], clock: ManualClock, who: str) -> FireFn:
    """A fire function that records who fired at what time of the clock."""
    async def fire() -> None:
        fires.append((who, clock.now_ns()))

    return fire


def tick_seconds(fires: list[tuple[str, int]]) -> list[int]:
    """The second of each fire, relative to the clock's start (ticks of "@every 1s" fall on whole seconds)."""
    return sorted(ns // NS - START_NS // NS for _, ns in fires)


async def running(*schedulers: PeriodicScheduler) -> list[asyncio.Task[None]]:
    tasks = [asyncio.create_task(s.run()) for s in schedulers]
    await asyncio.sleep(0)  # each run() has started its schedule loops
    return tasks


async def cancel(tasks: list[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_two_schedulers_sharing_a_lock_fire_each_tick_once() -> None:
    clock = ManualClock()
    lock = ClockedLock(clock)
    fires: list[tuple[str, int]] = []
    a, b = PeriodicScheduler(lock, clock=clock), PeriodicScheduler(lock, clock=clock)
    a.add("@every 1s", "tick", clocked(fires, clock, "a"))
    b.add("@every 1s", "tick", clocked(fires, clock, "b"))
    tasks = await running(a, b)
    await clock.aadvance(5, sleeping=2)
    await cancel(tasks)
    assert tick_seconds(fires) == [1, 2, 3, 4, 5], fires  # every tick, each by one of the two


async def test_fire_errors_are_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("broker down")

    clock = ManualClock()
    scheduler = PeriodicScheduler(ClockedLock(clock), clock=clock)
    scheduler.add("@every 1s", "boom", boom)
    with caplog.at_level(logging.ERROR, logger="machinery"):
        tasks = await running(scheduler)
        await clock.aadvance(3, sleeping=1)
        await cancel(tasks)
    assert calls == 3
    assert caplog.text.count("periodic task boom (@every 1s): firing failed") == 3
    assert "broker down" in caplog.text


async def test_lock_errors_skip_the_tick_only(caplog: pytest.LogCaptureFixture) -> None:
    class FlakyLock(ClockedLock):
        attempts = 0

        async def acquire(self, key: str, expires_at_ns: int) -> bool:
            self.attempts += 1
            if self.attempts == 1:
                raise ConnectionError("lock store unreachable")
            return await super().acquire(key, expires_at_ns)

    clock = ManualClock()
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(FlakyLock(clock), clock=clock)
    scheduler.add("@every 1s", "flaky", clocked(fires, clock, "x"))
    with caplog.at_level(logging.ERROR, logger="machinery"):
        tasks = await running(scheduler)
        await clock.aadvance(3, sleeping=1)
        await cancel(tasks)
    assert "taking the lock failed; tick skipped" in caplog.text
    assert tick_seconds(fires) == [2, 3]  # the first tick's lock failed; the next ones fire


async def test_go_process_holding_the_key_blocks_python() -> None:
    """A Go Machinery scheduler of the same program took Go's key: Python must not fire that tick."""
    clock = ManualClock()
    lock = ClockedLock(clock)
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(lock, program="app", clock=clock)
    scheduler.add("@every 1s", "job", clocked(fires, clock, "py"))
    assert await lock.acquire(scheduler.lock_key("job", "@every 1s"), clock.now_ns() + 10 * NS)
    tasks = await running(scheduler)
    await clock.aadvance(3, sleeping=1)
    await cancel(tasks)
    assert fires == []

    other_lock = ClockedLock(clock)
    assert await other_lock.acquire(scheduler.lock_key("job", "@every 1s"), clock.now_ns() + 10 * NS)
    independent = PeriodicScheduler(other_lock, program="app", go_compatible=False, clock=clock)
    independent.add("@every 1s", "job", clocked(fires, clock, "py"))
    tasks = await running(independent)
    await clock.aadvance(2, sleeping=1)
    await cancel(tasks)
    assert tick_seconds(fires) == [4, 5]


async def test_a_lagging_clock_cannot_fire_a_tick_again() -> None:
    """Process B reaches tick T after A fired it and after Go's key (held to the next tick) expired."""
    lock = memory_lock()
    fires: list[tuple[str, int]] = []
    a, b = PeriodicScheduler(lock), PeriodicScheduler(lock)
    a.add("@every 1s", "job", recorder(fires, "a"))  # type: ignore[arg-type]
    b.add("@every 1s", "job", recorder(fires, "b"))  # type: ignore[arg-type]
    tick = (time.time_ns() // NS - 3) * NS  # a tick whose following tick has passed
    following = tick + NS
    await a._fire_tick(a._entries["job"], tick, following, deque())
    await b._fire_tick(b._entries["job"], tick, following, deque())
    assert [who for who, _ in fires] == ["a"]
    # Go's key alone would have let B in: it expired at `following`.
    assert await lock.acquire(a.lock_key("job", "@every 1s"), time.time_ns() + NS) is True


async def test_missed_ticks_are_skipped_not_replayed(caplog: pytest.LogCaptureFixture) -> None:
    clock = ManualClock()
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(ClockedLock(clock), clock=clock)
    scheduler.add("@every 1s", "job", clocked(fires, clock, "x"))
    with caplog.at_level(logging.WARNING, logger="machinery"):
        tasks = await running(scheduler)
        await clock.aadvance(1, sleeping=1)  # tick 1 fires; the loop sleeps until tick 2
        clock.jump(2.2)  # suspended through ticks 2 and 3: it wakes at 3.7
        await clock.aadvance(0.5, sleeping=1)  # tick 4 is the next one it fires
        await cancel(tasks)
    assert tick_seconds(fires) == [1, 4], "missed ticks must be skipped, not fired late or in a burst"
    assert "missed ticks while blocked or suspended" in caplog.text


async def test_expired_tick_keys_are_released() -> None:
    clock = ManualClock()
    lock = ClockedLock(clock)
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(lock, max_clock_skew=0.0, clock=clock)
    scheduler.add("@every 1s", "job", clocked(fires, clock, "x"))
    tasks = await running(scheduler)
    await clock.aadvance(6, sleeping=1)
    await cancel(tasks)
    assert len(fires) == 6
    # Go's key plus at most the two newest tick keys: older ones were released, not accumulated.
    assert len(lock._held) <= 3, lock._held


def test_start_stop_on_a_portal_and_add_while_running() -> None:
    portal = Portal("test-periodic")
    clock = ManualClock()
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(ClockedLock(clock), clock=clock)
    try:
        scheduler.add("@every 1s", "first", clocked(fires, clock, "first"))
        scheduler.start(portal)
        scheduler.start(portal)  # idempotent on the same portal
        clock.wait_sleeping(1)
        assert scheduler.running
        scheduler.add("@every 1s", "second", clocked(fires, clock, "second"))
        clock.advance(2, sleeping=2)
        assert sorted(who for who, _ in fires) == ["first", "first", "second", "second"]
        scheduler.stop()
        assert not scheduler.running
        assert clock.sleeping() == 0  # its loops are gone, not parked
        clock.jump(5)
        assert len(fires) == 4  # stopped means stopped
    finally:
        scheduler.stop()
        portal.close()


async def test_astop_from_the_same_loop() -> None:
    clock = ManualClock()
    scheduler = PeriodicScheduler(ClockedLock(clock), clock=clock)
    scheduler.add("@hourly", "job", _noop)
    task = asyncio.create_task(scheduler.run())
    await clock.await_sleeping(1)
    assert scheduler.running
    await scheduler.astop()
    assert task.done()
    assert not scheduler.running
    assert clock.sleeping() == 0


# --- several OS processes --------------------------------------------------------------------------


@pytest.fixture
def redis_lock_url() -> Iterator[tuple[str, str]]:
    """(lock URL, program prefix); deletes the test's keys afterwards."""
    url = redis_url(REDIS_DB)
    program = f"ptest-{uuid.uuid4().hex[:10]}-"
    yield url, program
    import redis

    client = redis.Redis.from_url(url)
    keys = list(client.scan_iter(match=f"machinery_lock_{program}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(params=["redis", "sqlite"])
def shared_lock(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[str, str]:
    if request.param == "redis":
        return request.getfixturevalue("redis_lock_url")  # type: ignore[no-any-return]
    return f"sqlite:///{tmp_path / 'locks.sqlite3'}", "ptest-"


class Children:
    """Scheduler processes started together and stopped at the same wall-clock deadline."""

    def __init__(self, lock_url: str, program: str, out: Path, n: int, seconds: float) -> None:
        self.out = out
        self.until_ns = time.time_ns() + int((3.0 + seconds) * NS)  # 3 s for interpreter start-up
        args = [lock_url, program, "heartbeat", "@every 1s", str(out), str(self.until_ns)]
        self.procs = [
            subprocess.Popen([sys.executable, str(CHILD), *args], stdout=subprocess.PIPE, text=True)
            for _ in range(n)
        ]
        self.ready_ns = self._wait_ready()

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + 30
        for proc in self.procs:
            assert proc.stdout is not None
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            assert readable, "a scheduler process did not start"
            assert proc.stdout.readline().strip() == "ready"
        return time.time_ns()

    def fires(self) -> list[tuple[int, int]]:
        if not self.out.exists():
            return []
        return [(int(p), int(ns)) for p, ns in (line.split() for line in self.out.read_text().splitlines())]

    def wait(self) -> None:
        for proc in self.procs:
            try:
                proc.wait(timeout=max(5.0, (self.until_ns - time.time_ns()) / NS + 10))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                raise

    def kill_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_three_processes_fire_each_tick_exactly_once(shared_lock: tuple[str, str], tmp_path: Path) -> None:
    url, program = shared_lock
    children = Children(url, program, tmp_path / "fires.txt", n=3, seconds=5.0)
    try:
        children.wait()
    finally:
        children.kill_all()
    fires = children.fires()
    counts = Counter(ns // NS for _, ns in fires)
    assert counts and max(counts.values()) == 1, f"a tick fired twice: {sorted(counts.items())}"
    first, last = children.ready_ns // NS + 1, children.until_ns // NS - 1
    missing = [t for t in range(first, last) if t not in counts]
    assert not missing, f"ticks with no fire: {missing}"
    assert last - first >= 3


@pytest.mark.slow
def test_killing_the_winner_does_not_stop_the_schedule(shared_lock: tuple[str, str], tmp_path: Path) -> None:
    url, program = shared_lock
    children = Children(url, program, tmp_path / "fires.txt", n=3, seconds=7.0)
    try:
        deadline = time.monotonic() + 10
        while len([f for f in children.fires() if f[1] > children.ready_ns]) < 2:
            assert time.monotonic() < deadline, "no fires"
            time.sleep(0.05)
        victim = children.fires()[-1][0]
        os.kill(victim, signal.SIGKILL)
        killed_ns = time.time_ns()
        for proc in children.procs:
            if proc.pid != victim:
                proc.wait(timeout=(children.until_ns - time.time_ns()) / NS + 10)
    finally:
        children.kill_all()
    fires = children.fires()
    counts = Counter(ns // NS for _, ns in fires)
    assert max(counts.values()) == 1, f"a tick fired twice: {sorted(counts.items())}"
    after = [(pid, ns) for pid, ns in fires if ns > killed_ns]
    assert victim not in {pid for pid, _ in after}
    first, last = killed_ns // NS + 1, children.until_ns // NS - 1
    missing = [t for t in range(first, last) if t not in counts]
    assert not missing, f"ticks lost after the kill: {missing}"
    assert last - first >= 3
