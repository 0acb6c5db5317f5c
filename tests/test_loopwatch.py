"""A blocking call inside an async def task stalls the worker's loop: the worker says so, naming the task."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from machinery.testing import memory_server, running_worker


def blocked_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "event loop has been blocked" in r.getMessage()]


def test_a_blocking_async_task_is_named(caplog: pytest.LogCaptureFixture) -> None:
    server = memory_server(blocked_loop_warning=0.2)

    @server.task
    async def stuck(seconds: float) -> str:
        time.sleep(seconds)  # noqa: ASYNC251 - the mistake under test: it blocks the loop
        return "done"

    @server.task
    async def polite(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "done"

    @server.task
    def plain(seconds: float) -> str:
        time.sleep(seconds)  # runs on a worker thread: the loop keeps turning
        return "done"

    line = stuck.__wrapped__.__code__.co_firstlineno + 2
    with caplog.at_level(logging.INFO, logger="machinery"), running_worker(server, name="w1"):
        assert polite.send(0.6).get(timeout=10) == "done"
        assert plain.send(0.6).get(timeout=10) == "done"
        assert blocked_lines(caplog) == []
        assert stuck.send(0.8).get(timeout=10) == "done"
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not any("turns again" in r.getMessage() for r in caplog.records):
            time.sleep(0.05)
    server.close()
    (warning,) = blocked_lines(caplog)
    assert warning.startswith("worker w1: the event loop has been blocked for 0.")
    assert f"by async task 'stuck' (test_loopwatch.py:{line}); every other task on this worker waits" in warning
    (recovered,) = [r.getMessage() for r in caplog.records if "turns again" in r.getMessage()]
    seconds = float(recovered.split("after ")[1].split(" s")[0])
    assert 0.6 <= seconds <= 1.5


def test_the_check_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    server = memory_server(blocked_loop_warning=0)

    @server.task
    async def stuck() -> None:
        time.sleep(0.5)  # noqa: ASYNC251 - blocks the loop on purpose

    with caplog.at_level(logging.INFO, logger="machinery"), running_worker(server):
        stuck.send().get(timeout=10)
    server.close()
    assert blocked_lines(caplog) == []


def test_the_threshold_is_checked_config() -> None:
    from machinery import Config
    from machinery.errors import ConfigError

    assert Config().blocked_loop_warning == 1.0
    assert Config.from_env({"BLOCKED_LOOP_WARNING": "0.25"}).blocked_loop_warning == 0.25
    with pytest.raises(ConfigError, match="blocked_loop_warning: must be >= 0"):
        Config(blocked_loop_warning=-1)
