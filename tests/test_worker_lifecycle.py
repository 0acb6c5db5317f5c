"""Worker lifecycle on real stores (the embedded SQLite file; this run's own Redis server,
point it at a private server): the prefetch bound, a stop that hands back what was fetched but
not started, the grace for running tasks, and retiring after max_tasks or past max_memory_mb."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature, TaskContext
from machinery import lifecycle as lifecycle_module
from machinery.config import RedisConfig
from machinery.errors import MachineryError
from machinery.testing import memory_server
from machinery.worker import Worker
from redis_servers import redis_url


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def cnf(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'lifecycle.sqlite3'}"
        return Config(broker=url, result_backend=url)
    url = redis_url()  # this run's own Redis server
    ns = uuid.uuid4().hex[:10]
    return Config(broker=url, result_backend=url, default_queue=f"lifecycle_{ns}",
                  redis=RedisConfig(delayed_tasks_key=f"lifecycle_delayed_{ns}"))


@pytest.fixture
def server(cnf: Config) -> Iterator[Server]:
    srv = Server(cnf)
    yield srv
    srv.close()


def until(check: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


class Runs:
    """Which worker started which task, in order (thread-safe)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.starts: list[tuple[str, str]] = []

    def add(self, worker: str, tag: str) -> None:
        with self.lock:
            self.starts.append((worker, tag))

    def by(self, worker: str) -> list[str]:
        with self.lock:
            return [tag for w, tag in self.starts if w == worker]


def register(server: Server, runs: Runs, release: threading.Event) -> None:
    def hold(ctx: TaskContext, tag: str) -> str:
        runs.add(ctx.worker_name, tag)
        release.wait(20)
        return tag

    def sleep(ctx: TaskContext, seconds: float, tag: str) -> str:
        runs.add(ctx.worker_name, tag)
        time.sleep(seconds)
        return tag

    server.register_task("hold", hold)
    server.register_task("sleep", sleep)


def pending(server: Server) -> int:
    return len(server.get_broker().get_pending_tasks())


def test_prefetch_bounds_what_a_worker_holds(server: Server) -> None:
    runs, release = Runs(), threading.Event()
    register(server, runs, release)
    worker = server.new_worker("a", 1, prefetch=3)
    future = worker.launch_async()
    try:
        results = [server.send_task(_sig("hold", i)) for i in range(10)]
        assert until(lambda: len(runs.by("a")) == 1 and worker.held == 3)
        time.sleep(0.3)  # a worker past its bound would fetch more meanwhile
        assert worker.held == 3 and pending(server) == 7
        release.set()
        assert sorted(r.get(timeout=30) for r in results) == [f"t{i}" for i in range(10)]
    finally:
        release.set()
        worker.quit()
        future.result(timeout=30)


def test_prefetch_defaults_to_twice_the_concurrency_or_the_config() -> None:
    server = memory_server(prefetch=5)
    try:
        assert server.new_worker("a", 3).prefetch == 5
        assert server.new_worker("b", 3, prefetch=0).prefetch == 6
        assert server.new_worker("c", 3, prefetch=2).prefetch == 2
        with pytest.raises(MachineryError, match="prefetch"):
            server.new_worker("d", prefetch=-1)
    finally:
        server.close()
    assert memory_server().new_worker("e", 4).prefetch == 8


def test_a_stop_hands_back_unstarted_messages_at_once(server: Server) -> None:
    """Worker a runs one task and holds three more; stopped, it gives those three back at once
    (another worker runs them while a is still finishing its own) and runs nothing new."""
    runs, release = Runs(), threading.Event()
    register(server, runs, release)
    a = server.new_worker("a", 1, prefetch=4)
    a_done = a.launch_async()
    b: Worker | None = None
    b_done: concurrent.futures.Future[None] | None = None
    try:
        results = [server.send_task(_sig("hold", i)) for i in range(4)]
        assert until(lambda: len(runs.by("a")) == 1 and a.held == 4)
        stopping = threading.Thread(target=a.quit)
        started = time.monotonic()
        stopping.start()
        assert until(lambda: pending(server) == 3, timeout=5)
        assert time.monotonic() - started < 2
        b = server.new_worker("b", 3)
        b_done = b.launch_async()
        assert until(lambda: len(runs.by("b")) == 3)
        assert a.is_running, "a still finishes its own task"
        release.set()
        assert sorted(r.get(timeout=30) for r in results) == ["t0", "t1", "t2", "t3"]
        stopping.join(30)
        a_done.result(timeout=30)
        assert len(runs.by("a")) == 1 and len(runs.starts) == 4
    finally:
        release.set()
        a.quit()
        if b is not None and b_done is not None:
            b.quit()
            b_done.result(timeout=30)


def test_a_task_running_past_the_grace_is_handed_back_and_runs_elsewhere(server: Server) -> None:
    runs, release = Runs(), threading.Event()
    register(server, runs, release)
    a = server.new_worker("a", 2, grace=0.5)
    a_done = a.launch_async()
    try:
        result = server.send_task(_sig("sleep", 0, 3.0))
        assert until(lambda: runs.by("a") == ["t0"])
        started = time.monotonic()
        a.quit()
        a_done.result(timeout=10)
        assert time.monotonic() - started < 2.5 and a.aborted
        assert pending(server) == 1
    finally:
        a.quit()
    b = server.new_worker("b", 2)
    b_done = b.launch_async()
    try:
        assert result.get(timeout=30) == "t0"
        assert runs.by("b") == ["t0"]
    finally:
        b.quit()
        b_done.result(timeout=30)


def test_max_tasks_retires_the_worker_after_that_many_and_leaves_the_rest(server: Server) -> None:
    runs, release = Runs(), threading.Event()
    release.set()
    register(server, runs, release)
    results = [server.send_task(_sig("hold", i)) for i in range(5)]
    worker = server.new_worker("a", 2, max_tasks=3)
    worker.launch_async().result(timeout=30)  # returns by itself
    assert worker.retired == "it took its 3 tasks"
    assert len(runs.by("a")) == 3 and pending(server) == 2
    assert [r.get(timeout=5) for r in results[:3]] == ["t0", "t1", "t2"]


def test_max_memory_retires_after_the_task_that_passed_it() -> None:
    server = memory_server()
    kept: list[bytearray] = []

    @server.task
    def noop() -> None:
        pass

    @server.task
    def grow(megabytes: int) -> None:
        kept.append(bytearray(os.urandom(1024)) * (megabytes * 1024))

    worker = server.new_worker("a", 1, max_memory_mb=lifecycle_module.rss_mb() + 60)
    done = worker.launch_async()
    try:
        noop.send().get(timeout=10)
        assert worker.is_running and not worker.retired
        grow.send(100).get(timeout=10)
        done.result(timeout=10)
        assert worker.retired.startswith("its memory (") and "passed its limit of" in worker.retired
    finally:
        kept.clear()
        worker.quit()
        server.close()


def test_a_worker_past_its_memory_limit_at_start_is_not_retired_for_it(caplog: pytest.LogCaptureFixture) -> None:
    """A fresh process would be as big: replacing it would only loop."""
    caplog.set_level(logging.WARNING, logger="machinery")
    server = memory_server()

    @server.task
    def noop() -> None:
        pass

    worker = server.new_worker("a", 1, max_memory_mb=1)
    done = worker.launch_async()
    try:
        assert until(lambda: "before running any task" in caplog.text, timeout=5)
        noop.send().get(timeout=10)
        noop.send().get(timeout=10)
        assert worker.is_running and not worker.retired
    finally:
        worker.quit()
        done.result(timeout=10)
        server.close()


def test_worker_options_are_checked() -> None:
    server = memory_server()
    for bad in ({"grace": -1}, {"max_tasks": 1.5}, {"max_memory_mb": float("nan")}, {"prefetch": True}):
        with pytest.raises(MachineryError):
            server.new_worker("w", **bad)  # type: ignore[arg-type]
    server.close()


def _sig(name: str, i: int, seconds: float | None = None) -> Signature:
    args: list[object] = [f"t{i}"] if seconds is None else [seconds, f"t{i}"]
    return Signature(name, args)
