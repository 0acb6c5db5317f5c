"""TaskContext: `retries` counts retries done (up), `retry_count` what is left (down), `attempts`
the deliveries of one message; a task can stop retrying by looking at ctx.retries."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest

from machinery import RetryTaskLater, Signature, TaskContext, TaskError
from machinery.context import RETRIES_HEADER
from machinery.testing import memory_server, running_worker


def test_retries_count_up_for_retry_count_failures() -> None:
    server = memory_server()
    seen: list[tuple[int, int, int]] = []

    @server.task(retry_count=5)
    def flaky(ctx: TaskContext) -> int:
        seen.append((ctx.retries, ctx.retry_count, ctx.attempts))
        if ctx.retries < 1:  # what a user writes to give up after a number of retries
            raise RuntimeError("not yet")
        return ctx.retries

    with running_worker(server):
        assert flaky.send().get(timeout=10) == 1
    server.close()
    assert seen == [(0, 5, 1), (1, 4, 1)]


def test_retries_count_retry_task_later_and_stop_a_loop() -> None:
    server = memory_server()
    seen: list[tuple[int, int]] = []
    lock = threading.Lock()

    @server.task
    def polling(ctx: TaskContext) -> None:
        with lock:
            seen.append((ctx.retries, ctx.retry_count))
        if ctx.retries < 3:
            raise RetryTaskLater("busy", delay=timedelta(milliseconds=20))
        raise RuntimeError(f"gave up after {ctx.retries} retries")

    with running_worker(server):
        res = polling.send()
        with pytest.raises(TaskError, match="gave up after 3 retries"):
            res.get(timeout=10)
    server.close()
    assert seen == [(0, 0), (1, 0), (2, 0), (3, 0)]


def test_the_count_travels_in_a_header_a_go_worker_keeps() -> None:
    sig = Signature("t", headers={RETRIES_HEADER: 2})
    assert TaskContext(sig).retries == 2
    for junk in ("2", True, -1, None):
        assert TaskContext(Signature("t", headers={RETRIES_HEADER: junk})).retries == 0
    assert TaskContext(Signature("t")).retries == 0
