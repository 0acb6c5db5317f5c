"""Recycling `machinery worker --processes` children through the real command, on the embedded
SQLite store and (most) on this run's own Redis server: a
child whose thread ignores its hard time limit, --max-tasks-per-child and --max-memory-per-child;
and a stop signal's hand-back and grace. No task may be lost."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature, TaskError
from machinery.config import RedisConfig
from redis_servers import redis_url

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "machinery"]
APP = "apps.limitsapp:server"


def env_for(cnf: Config, log: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"BROKER": cnf.broker, "RESULT_BACKEND": cnf.result_backend, "DEFAULT_QUEUE": cnf.default_queue,
                "REDIS_DELAYED_TASKS_KEY": cnf.redis.delayed_tasks_key, "MACHINERY_LOG_LEVEL": "WARNING",
                "MACHINERY_TEST_LOG": str(log), "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT / 'src'}"})
    return env


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode().replace("\0", " ")
    except OSError:
        return ""


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def until(check: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def runs(log: Path) -> list[tuple[str, int]]:
    if not log.exists():
        return []
    return [(tag, int(pid)) for tag, pid in (line.split() for line in log.read_text().splitlines())]


#: for the tests that run on both stores (the others use SQLite)
BOTH = pytest.mark.parametrize("cnf", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)], indirect=True)


@pytest.fixture
def cnf(request: pytest.FixtureRequest, tmp_path: Path) -> Config:
    if getattr(request, "param", "sqlite") == "sqlite":
        url = f"sqlite:///{tmp_path / 'recycle.sqlite3'}"
        return Config(broker=url, result_backend=url)
    url = redis_url()  # this run's own Redis server
    ns = uuid.uuid4().hex[:10]
    return Config(broker=url, result_backend=url, default_queue=f"recycle_{ns}",
                  redis=RedisConfig(delayed_tasks_key=f"recycle_delayed_{ns}"))


@pytest.fixture
def log(tmp_path: Path) -> Path:
    return tmp_path / "runs.log"


@pytest.fixture
def server(cnf: Config) -> Iterator[Server]:
    srv = Server(cnf)
    yield srv
    srv.close()


class Workers:
    """`machinery worker` commands started by a test, stopped (SIGTERM, then SIGKILL) after it."""

    def __init__(self, cnf: Config, log: Path) -> None:
        self.env = env_for(cnf, log)
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, *options: str) -> subprocess.Popen[str]:
        proc = subprocess.Popen([*CLI, "worker", "--app", APP, *options], env=self.env, text=True)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def workers(cnf: Config, log: Path) -> Iterator[Workers]:
    started = Workers(cnf, log)
    yield started
    started.stop()


def supervised(proc: subprocess.Popen[str], count: int) -> bool:
    """The supervisor runs and has `count` worker processes past their start."""
    if "cli/supervisor.py" not in cmdline(proc.pid):
        return False
    kids = children(proc.pid)
    return len(kids) == count and all(" worker " in cmdline(k) or "supervisor.py" in cmdline(k) for k in kids)


@BOTH
def test_a_child_whose_thread_ignores_its_hard_limit_is_replaced(server: Server, workers: Workers,
                                                                 log: Path) -> None:
    """`stuck` blocks in time.sleep(3600) with a 1 s hard limit: its FAILURE is stored within
    about 2 s, the other tasks (some on the same child) all finish, and that child is replaced."""
    sup = workers.start("--processes", "2", "--concurrency", "3")
    assert until(lambda: supervised(sup, 2))
    before = set(children(sup.pid))
    others = server.send_tasks([Signature("work", [0.3, f"w{i}"]) for i in range(6)])
    started = time.monotonic()
    stuck = server.send_task(Signature("stuck", ["s"]))
    with pytest.raises(TaskError) as info:
        stuck.get(timeout=30)
    assert time.monotonic() - started < 2.5
    assert info.value.exc_type == "machinery.errors.TimeLimitExceeded"
    more = server.send_tasks([Signature("work", [0.3, f"m{i}"]) for i in range(12)])
    assert sorted(r.get(timeout=60) for r in [*others, *more]) == sorted(
        [f"w{i}" for i in range(6)] + [f"m{i}" for i in range(12)])
    (culprit,) = [pid for tag, pid in runs(log) if tag == "s"]
    assert culprit in before
    assert until(lambda: culprit not in children(sup.pid) and len(children(sup.pid)) == 2, timeout=30)
    replacement = (set(children(sup.pid)) - before).pop()
    assert until(lambda: " worker " in cmdline(replacement) and "--supervised" in cmdline(replacement))
    assert sup.poll() is None
    # the fresh process takes work
    assert until(lambda: replacement in {r.get(timeout=30) for r in server.send_tasks(
        [Signature("pid") for _ in range(10)])})
    assert [tag for tag, _ in runs(log)].count("s") == 1  # a failed task is not run again


@BOTH
def test_max_tasks_per_child_recycles_without_losing_a_task(server: Server, workers: Workers, log: Path) -> None:
    sup = workers.start("--processes", "2", "--concurrency", "2", "--max-tasks-per-child", "5")
    assert until(lambda: supervised(sup, 2))
    results = server.send_tasks([Signature("work", [0.02, f"t{i}"]) for i in range(40)])
    assert sorted(r.get(timeout=120) for r in results) == sorted(f"t{i}" for i in range(40))
    done = runs(log)
    per_pid = Counter(pid for _, pid in done)
    assert len(done) == 40, "a task ran twice or was lost"
    assert max(per_pid.values()) <= 5
    assert len(per_pid) >= 8
    assert sup.poll() is None


def test_one_process_with_max_tasks_runs_under_a_supervisor(server: Server, workers: Workers, log: Path) -> None:
    sup = workers.start("--processes", "1", "--max-tasks-per-child", "3")
    assert until(lambda: supervised(sup, 1))
    results = server.send_tasks([Signature("work", [0.0, f"t{i}"]) for i in range(9)])
    assert sorted(r.get(timeout=120) for r in results) == sorted(f"t{i}" for i in range(9))
    per_pid = Counter(pid for _, pid in runs(log))
    assert sorted(per_pid.values()) == [3, 3, 3]


def test_max_memory_per_child_recycles_without_losing_a_task(server: Server, workers: Workers, log: Path) -> None:
    probe = workers.start("--processes", "1", "--max-tasks-per-child", "1000")
    assert until(lambda: supervised(probe, 1))
    (kid,) = children(probe.pid)
    assert until(lambda: rss_mb(kid) > 20)
    time.sleep(1)
    baseline = rss_mb(kid)
    workers.stop()
    limit = baseline + 100
    sup = workers.start("--processes", "2", "--concurrency", "1", "--max-memory-per-child", f"{limit:.0f}")
    assert until(lambda: supervised(sup, 2))
    results = server.send_tasks([Signature("hog", [60, f"h{i}"]) for i in range(8)])
    assert sorted(r.get(timeout=120) for r in results) == sorted(f"h{i}" for i in range(8))
    per_pid = Counter(pid for _, pid in runs(log))
    assert sum(per_pid.values()) == 8
    assert len(per_pid) >= 3, f"no child was recycled (limit {limit:.0f} MB, runs per pid {dict(per_pid)})"
    assert sup.poll() is None


@BOTH
def test_sigterm_hands_back_unstarted_messages_and_the_grace_hands_back_the_running_one(
        server: Server, workers: Workers, log: Path) -> None:
    """One stop signal: the three messages the worker fetched but did not start go back at once;
    the running one gets --grace 1 s, then goes back too; another worker runs all four."""
    first = workers.start("--concurrency", "1", "--prefetch", "4", "--grace", "1")
    results = server.send_tasks([Signature("work", [5.0, f"t{i}"]) for i in range(4)])
    assert until(lambda: len(runs(log)) == 1)
    assert until(lambda: not server.get_broker().get_pending_tasks())  # all four held
    started = time.monotonic()
    first.send_signal(signal.SIGTERM)
    assert until(lambda: len(server.get_broker().get_pending_tasks()) == 3, timeout=5)
    assert time.monotonic() - started < 1.0
    assert first.wait(timeout=10) is not None
    assert time.monotonic() - started < 4
    assert len(server.get_broker().get_pending_tasks()) == 4
    workers.start("--concurrency", "4")
    assert sorted(r.get(timeout=60) for r in results) == ["t0", "t1", "t2", "t3"]
    done = runs(log)
    running = done[0][0]
    assert Counter(tag for tag, _ in done) == {tag: 2 if tag == running else 1 for tag in ("t0", "t1", "t2", "t3")}


RESTART_DURING_STOP = """
import os, signal, sys, time
from machinery.cli.supervisor import RECYCLE_EXIT, watch

first = os.fork()
if first == 0:
    os._exit(RECYCLE_EXIT)  # retires at once: the supervisor starts a fresh one


def spawn(index):
    pid = os.fork()
    if pid == 0:
        time.sleep(1.0)  # the moment between fork and exec, made long
        os.execv(sys.executable, [sys.executable, "-c", "import signal, time; "
                 "signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM}); time.sleep(60)"])
    print("spawned", pid, flush=True)
    return pid


sys.exit(watch({first: 0}, spawn, print, print))
"""


def test_a_stop_reaches_a_worker_the_supervisor_is_just_starting() -> None:
    """A stop signal that arrives while a restarted worker is between fork and exec is not lost
    (the stop would otherwise wait for that worker forever)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-c", RESTART_DURING_STOP], env=env, text=True, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert "retired; starting a fresh one" in proc.stdout.readline()
        assert proc.stdout.readline().startswith("spawned")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
    finally:
        if proc.poll() is None:
            for pid in children(proc.pid):
                os.kill(pid, signal.SIGKILL)
            proc.kill()
            proc.wait()
