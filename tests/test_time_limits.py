"""Time limits: soft and hard, on async and plain tasks that sleep or spin, on the embedded SQLite
store and on Redis (this run's own Redis server), and how a run's
limits are chosen."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from machinery import (
    Config,
    OptionError,
    Server,
    Signature,
    SoftTimeLimitExceeded,
    TaskContext,
    TaskError,
    TimeLimitExceeded,
)
from machinery import limits as limits_module
from machinery.config import RedisConfig
from machinery.errors import ConfigError, MachineryError
from machinery.limits import HARD_HEADER, SOFT_HEADER, TimeLimiter, TimeLimits
from machinery.testing import memory_server, running_worker
from machinery.threads import SyncRunner
from redis_servers import redis_url

HARD = "machinery.errors.TimeLimitExceeded"
SOFT = "machinery.errors.SoftTimeLimitExceeded"


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'limits.sqlite3'}"
        cnf = Config(broker=url, result_backend=url)
    else:
        url = redis_url()  # this run's own Redis server
        ns = uuid.uuid4().hex[:10]
        cnf = Config(broker=url, result_backend=url, default_queue=f"limits_{ns}",
                     redis=RedisConfig(delayed_tasks_key=f"limits_delayed_{ns}"))
    srv = Server(cnf)
    yield srv
    srv.close()


def failure(result: Any, timeout: float = 20) -> TaskError:
    with pytest.raises(TaskError) as info:
        result.get(timeout=timeout)
    return info.value


# --- hard limits ---------------------------------------------------------------------------


def test_hard_limit_ends_a_blocked_thread_at_once_and_frees_its_slot(server: Server) -> None:
    """time.sleep does not see the injected exception, yet the run ends FAILURE at its limit and
    a fresh thread takes the slot: the next task runs while the old thread still sleeps."""

    @server.task(time_limit=0.5)
    def nap() -> None:
        time.sleep(4)

    @server.task
    def quick() -> str:
        return "quick"

    with running_worker(server, concurrency=1):
        started = time.monotonic()
        stuck = nap.send()
        after = quick.send()
        error = failure(stuck)
        assert time.monotonic() - started < 2.5
        assert error.exc_type == HARD and error.error == "hard time limit (0.5 s) exceeded"
        assert after.get(timeout=10) == "quick"
        assert time.monotonic() - started < 3.5, "the second task waited for the abandoned thread"


def test_hard_limit_stops_a_thread_spinning_in_python(server: Server) -> None:
    stopped = threading.Event()
    seen: list[str] = []

    @server.task(time_limit=0.5)
    def spin() -> None:
        x = 0
        try:
            while True:
                x += 1
        except BaseException as exc:
            seen.append(type(exc).__name__)
            raise
        finally:
            stopped.set()

    with running_worker(server, concurrency=2):
        started = time.monotonic()
        error = failure(spin.send())
        assert time.monotonic() - started < 2.5
        assert error.exc_type == HARD
        assert stopped.wait(2), "the injected TimeLimitExceeded did not stop the thread"
        assert seen == ["TimeLimitExceeded"]


def test_hard_limit_cancels_a_coroutine(server: Server) -> None:
    seen: list[str] = []

    @server.task(time_limit=0.4)
    async def wait() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    with running_worker(server):
        started = time.monotonic()
        error = failure(wait.send())
        assert time.monotonic() - started < 2.5
        assert error.exc_type == HARD and "(0.4 s)" in error.error
        deadline = time.monotonic() + 2
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == ["cancelled"]


def test_a_coroutine_that_ignores_its_hard_limit_still_ends_at_it(server: Server) -> None:
    """The slot does not wait for a coroutine that swallows its cancellation."""

    @server.task(time_limit=0.3)
    async def stubborn() -> str:
        for _ in range(3):
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass
        return "late"

    with running_worker(server, concurrency=1):
        started = time.monotonic()
        error = failure(stubborn.send())
        assert time.monotonic() - started < 2
        assert error.exc_type == HARD


def test_a_hard_limit_failure_is_retried_like_any_failure(server: Server) -> None:
    runs: list[float] = []

    @server.task(time_limit=0.3, retry_count=1)
    async def slow() -> None:
        runs.append(time.monotonic())
        await asyncio.sleep(10)

    with running_worker(server):
        error = failure(slow.send(), timeout=30)
    assert error.exc_type == HARD
    assert len(runs) == 2


# --- soft limits ---------------------------------------------------------------------------


def test_soft_limit_in_a_spinning_thread(server: Server) -> None:
    @server.task(soft_time_limit=0.3, time_limit=5)
    def tidy() -> str:
        x = 0
        try:
            while True:
                x += 1
        except SoftTimeLimitExceeded:
            return "tidied"

    @server.task(soft_time_limit=0.3)
    def careless() -> None:
        x = 0
        while True:
            x += 1

    with running_worker(server):
        started = time.monotonic()
        assert tidy.send().get(timeout=20) == "tidied"
        assert time.monotonic() - started < 2.5
        error = failure(careless.send())
        assert error.exc_type == SOFT and error.error == "soft time limit (0.3 s) exceeded"


def test_soft_limit_reaches_a_sleeping_thread_when_the_call_returns(server: Server) -> None:
    """The documented caveat: a blocking C call is not interrupted; the exception comes after."""

    @server.task(soft_time_limit=0.2)
    def nap() -> float:
        started = time.monotonic()
        try:
            time.sleep(1.0)
            x = 0
            while x < 10_000_000:  # Python code: where the exception arrives
                x += 1
        except SoftTimeLimitExceeded:
            return time.monotonic() - started
        return -1.0

    with running_worker(server):
        waited = nap.send().get(timeout=20)
    assert 1.0 <= waited < 1.5


def test_soft_limit_in_a_coroutine(server: Server) -> None:
    @server.task(soft_time_limit=0.3)
    async def lets_it_through() -> None:
        await asyncio.sleep(30)

    @server.task(soft_time_limit=0.3)
    async def answers_anyway() -> str:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            return "partial"
        return "full"

    @server.task(soft_time_limit=0.2, time_limit=0.6)
    async def keeps_going() -> str:
        for _ in range(3):
            try:
                await asyncio.sleep(1)
            except asyncio.CancelledError:
                pass
        return "late"

    with running_worker(server):
        started = time.monotonic()
        first, second, third = lets_it_through.send(), answers_anyway.send(), keeps_going.send()
        error = failure(first)
        assert error.exc_type == SOFT and error.error == "soft time limit (0.3 s) exceeded"
        assert "CancelledError" in error.traceback  # the task's own frames, where it was cancelled
        assert second.get(timeout=20) == "partial"
        assert failure(third).exc_type == HARD
        assert time.monotonic() - started < 3


# --- which limits apply ----------------------------------------------------------------------


def test_headers_then_task_options_then_the_worker_default(server: Server) -> None:
    @server.task
    async def plain(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.task(time_limit=timedelta(milliseconds=700))
    async def limited(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.task(time_limit=0)
    async def unlimited(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    worker = server.new_worker("w", 10, time_limit=0.4)
    future = worker.launch_async()
    try:
        by_default = plain.send(5)
        by_option = limited.send(5)
        by_send = limited.with_options(time_limit=0.2).send(5)
        by_header = server.send_task(Signature("limited", [5.0], headers={HARD_HEADER: 0.3}))
        lifted_by_send = limited.with_options(time_limit=0).send(1.0)
        lifted_by_option = unlimited.send(1.0)
        assert failure(by_default).error == "hard time limit (0.4 s) exceeded"
        assert failure(by_option).error == "hard time limit (0.7 s) exceeded"
        assert failure(by_send).error == "hard time limit (0.2 s) exceeded"
        assert failure(by_header).error == "hard time limit (0.3 s) exceeded"
        assert lifted_by_send.get(timeout=20) == "done"
        assert lifted_by_option.get(timeout=20) == "done"
    finally:
        worker.quit()
        future.result(timeout=30)


def test_limits_for_each_level_and_a_bad_header() -> None:
    loop = asyncio.new_event_loop()
    pool = SyncRunner(loop, 1)
    limiter = TimeLimiter(TimeLimits(soft=5, hard=10), pool, lambda what: None)
    sig = Signature("t", [])
    assert limiter.limits_for(sig, {}) == TimeLimits(5, 10)
    assert limiter.limits_for(sig, {"time_limit": timedelta(seconds=3)}) == TimeLimits(5, 3)
    sig.headers = {SOFT_HEADER: 1, HARD_HEADER: 2.5}
    assert limiter.limits_for(sig, {"time_limit": 3, "soft_time_limit": 2}) == TimeLimits(1, 2.5)
    sig.headers = {HARD_HEADER: "soon", SOFT_HEADER: -1}
    assert limiter.limits_for(sig, {"time_limit": 3}) == TimeLimits(5, 3)
    sig.headers = {HARD_HEADER: 0, SOFT_HEADER: 0}
    assert limiter.limits_for(sig, {"time_limit": 3}) is None
    assert TimeLimiter(TimeLimits(), pool, lambda what: None).limits_for(Signature("t", []), {}) is None
    loop.close()


def test_send_options_carry_limits_in_the_headers_and_registration_keeps_its_own() -> None:
    server = memory_server()

    @server.task(time_limit=30, soft_time_limit=timedelta(seconds=25))
    def job(x: int) -> int:
        return x

    assert not job.signature(1).headers
    sig = job.with_options(soft_time_limit=timedelta(seconds=2), time_limit=3,
                           headers={"mine": 1}).signature(1)
    assert sig.headers == {"mine": 1, SOFT_HEADER: 2.0, HARD_HEADER: 3.0}
    assert job.spec.options == {"time_limit": 30, "soft_time_limit": timedelta(seconds=25)}
    for bad in ("5", True, -1, float("nan"), timedelta(seconds=-1)):
        with pytest.raises(OptionError, match="time_limit"):
            job.with_options(time_limit=bad)  # type: ignore[arg-type]
        with pytest.raises(OptionError, match="soft_time_limit"):
            server.register_task("other", job, soft_time_limit=bad)  # type: ignore[arg-type]
    server.close()


def test_config_and_worker_defaults() -> None:
    assert Config.from_env({"TIME_LIMIT": "30", "SOFT_TIME_LIMIT": "2.5", "PREFETCH": "8"}).time_limit == 30.0
    assert Config(time_limit=timedelta(minutes=1)).time_limit == timedelta(minutes=1)
    for bad in (-1, float("inf"), timedelta(seconds=-1)):
        with pytest.raises(ConfigError, match="time_limit"):
            Config(soft_time_limit=bad)
    server = memory_server(time_limit=timedelta(seconds=9), soft_time_limit=4)
    assert server.new_worker("a").time_limits == TimeLimits(soft=4, hard=9)
    assert server.new_worker("b", time_limit=2, soft_time_limit=0).time_limits == TimeLimits(soft=0, hard=2)
    with pytest.raises(MachineryError, match="time limits"):
        server.new_worker("c", time_limit=-2)
    server.close()


def test_both_exceptions_are_machinery_errors() -> None:
    assert issubclass(SoftTimeLimitExceeded, MachineryError) and issubclass(TimeLimitExceeded, MachineryError)
    assert str(TimeLimitExceeded()) == "hard time limit exceeded"


# --- one log line per limit hit, and a thread that will not stop -------------------------------


def test_one_line_per_limit_hit_and_a_stuck_thread_is_named(caplog: pytest.LogCaptureFixture,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(limits_module, "STUCK_GRACE", 0.3)
    server = memory_server()

    @server.task(soft_time_limit=0.1, time_limit=0.3)
    def nap(ctx: TaskContext) -> None:
        time.sleep(2)

    caplog.set_level(logging.INFO, logger="machinery")
    with running_worker(server) as worker:
        res = nap.send()
        assert failure(res).exc_type == HARD
        deadline = time.monotonic() + 5
        while "has not stopped" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not worker.retired  # no supervisor: only logged
    lines = [r.getMessage() for r in caplog.records if "time limit" in r.getMessage() and res.signature.uuid in
             r.getMessage()]
    hits = [line for line in lines if "passed its" in line]
    assert len(hits) == 2 and "soft time limit (0.1 s)" in hits[0] and "hard time limit (0.3 s)" in hits[1]
    stuck = [line for line in lines if "has not stopped" in line]
    assert len(stuck) == 1 and f"task nap ({res.signature.uuid})" in stuck[0]
    server.close()
