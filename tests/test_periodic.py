"""The periodic-task engine: one fire per tick across processes sharing a lock, skew and failures.

The multi-process tests start three OS processes (tests/periodic_child.py) on the Redis lock (db 11 of
this run's own server, keys under a per-test program prefix) and on the SQLite lock. With CI=true a Redis
that cannot be started fails.
"""

from __future__ import annotations

import asyncio
import itertools
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
from machinery.periodic import PeriodicScheduler
from machinery.portal import Portal
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


# --- in-process behaviour ------------------------------------------------------------------------


async def run_for(seconds: float, *schedulers: PeriodicScheduler) -> None:
    tasks = [asyncio.create_task(s.run()) for s in schedulers]
    await asyncio.sleep(seconds)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def ticks_of(fires: list[tuple[str, int]]) -> Counter[int]:
    return Counter(ns // NS for _, ns in fires)


async def test_two_schedulers_sharing_a_lock_fire_each_tick_once() -> None:
    lock = memory_lock()
    fires: list[tuple[str, int]] = []
    a, b = PeriodicScheduler(lock), PeriodicScheduler(lock)
    a.add("@every 1s", "tick", recorder(fires, "a"))  # type: ignore[arg-type]
    b.add("@every 1s", "tick", recorder(fires, "b"))  # type: ignore[arg-type]
    await run_for(3.2, a, b)
    counts = ticks_of(fires)
    assert len(counts) >= 2
    assert set(counts.values()) == {1}, fires


async def test_fire_errors_are_logged_and_the_loop_goes_on(caplog: pytest.LogCaptureFixture) -> None:
    calls = 0

    async def boom() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("broker down")

    scheduler = PeriodicScheduler(memory_lock())
    scheduler.add("@every 1s", "boom", boom)
    with caplog.at_level(logging.ERROR, logger="machinery"):
        await run_for(2.3, scheduler)
    assert calls >= 2
    assert "periodic task boom (@every 1s): firing failed" in caplog.text
    assert "broker down" in caplog.text


async def test_lock_errors_skip_the_tick_only(caplog: pytest.LogCaptureFixture) -> None:
    class FlakyLock(MemoryLock):
        attempts = 0

        async def acquire(self, key: str, expires_at_ns: int) -> bool:
            self.attempts += 1
            if self.attempts == 1:
                raise ConnectionError("lock store unreachable")
            return await super().acquire(key, expires_at_ns)

    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(FlakyLock(Config(broker="memory", result_backend="memory")))
    scheduler.add("@every 1s", "flaky", recorder(fires, "x"))  # type: ignore[arg-type]
    with caplog.at_level(logging.ERROR, logger="machinery"):
        await run_for(2.3, scheduler)
    assert "taking the lock failed; tick skipped" in caplog.text
    assert len(fires) >= 1


async def test_go_process_holding_the_key_blocks_python() -> None:
    """A Go Machinery scheduler of the same program took Go's key: Python must not fire that tick."""
    lock = memory_lock()
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(lock, program="app")
    scheduler.add("@every 1s", "job", recorder(fires, "py"))  # type: ignore[arg-type]
    assert await lock.acquire(scheduler.lock_key("job", "@every 1s"), time.time_ns() + 10 * NS)
    await run_for(2.2, scheduler)
    assert fires == []

    other_lock = memory_lock()
    assert await other_lock.acquire(scheduler.lock_key("job", "@every 1s"), time.time_ns() + 10 * NS)
    independent = PeriodicScheduler(other_lock, program="app", go_compatible=False)
    independent.add("@every 1s", "job", recorder(fires, "py"))  # type: ignore[arg-type]
    await run_for(2.2, independent)
    assert len(fires) >= 1


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


async def test_missed_ticks_are_skipped_not_replayed() -> None:
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(memory_lock())
    scheduler.add("@every 1s", "job", recorder(fires, "x"))  # type: ignore[arg-type]
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(1.2)
    time.sleep(2.5)  # noqa: ASYNC251 - block the loop through two ticks, as a suspended process would
    await asyncio.sleep(1.5)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    times = sorted(ns for _, ns in fires)
    gaps = [b - a for a, b in itertools.pairwise(times)]
    assert all(g > 0.5 * NS for g in gaps), f"a burst of replayed ticks: {gaps}"
    assert len(times) <= 4


async def test_expired_tick_keys_are_released() -> None:
    lock = memory_lock()
    scheduler = PeriodicScheduler(lock, max_clock_skew=0.0)
    scheduler.add("@every 1s", "job", _noop)
    await run_for(4.2, scheduler)
    # Go's key plus at most the two newest tick keys: older ones were released, not accumulated.
    assert len(lock._held) <= 3, lock._held


def test_start_stop_on_a_portal_and_add_while_running() -> None:
    portal = Portal("test-periodic")
    fires: list[tuple[str, int]] = []
    scheduler = PeriodicScheduler(memory_lock())
    try:
        scheduler.add("@every 1s", "first", recorder(fires, "first"))  # type: ignore[arg-type]
        scheduler.start(portal)
        scheduler.start(portal)  # idempotent on the same portal
        time.sleep(0.3)
        assert scheduler.running
        scheduler.add("@every 1s", "second", recorder(fires, "second"))  # type: ignore[arg-type]
        time.sleep(2.2)
        scheduler.stop()
        assert not scheduler.running
        seen = {who for who, _ in fires}
        assert seen == {"first", "second"}
        count = len(fires)
        time.sleep(1.2)
        assert len(fires) == count  # stopped means stopped
    finally:
        scheduler.stop()
        portal.close()


async def test_astop_from_the_same_loop() -> None:
    scheduler = PeriodicScheduler(memory_lock())
    scheduler.add("@hourly", "job", _noop)
    task = asyncio.create_task(scheduler.run())
    await asyncio.sleep(0.05)
    assert scheduler.running
    await scheduler.astop()
    assert task.done()
    assert not scheduler.running


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
