"""The `machinery` command on the embedded SQLite store, in real subprocesses."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "machinery"]


def env_for(db: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    url = f"sqlite:///{db}"
    env.update({"BROKER": url, "RESULT_BACKEND": url, "MACHINERY_LOG_LEVEL": "WARNING",
                "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT / 'src'}"})
    env.update(extra)
    return env


def run(args: list[str], env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + args, env=env, capture_output=True, text=True, timeout=timeout, check=False)


@pytest.fixture
def db(tmp_path: Path) -> Path:
    return tmp_path / "cli.sqlite3"


@pytest.fixture(params=["preload", "no-preload"])
def worker(db: Path, request: pytest.FixtureRequest) -> Iterator[subprocess.Popen[str]]:
    args = [*CLI, "worker", "--app", "apps.envapp:server", "--processes", "2", "--concurrency", "4"]
    if request.param == "no-preload":
        args.append("--no-preload")
    proc = subprocess.Popen(args, env=env_for(db), text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_send_wait_status_pending(db: Path, worker: subprocess.Popen[str]) -> None:
    env = env_for(db)
    out = run(["send", "--app", "apps.envapp:server", "add", "1", "2", "39", "--wait", "--timeout", "30"], env)
    assert out.returncode == 0, out.stderr
    uuid, value = out.stdout.split()
    assert uuid.startswith("task_") and value == "42"
    status = run(["status", uuid], env)
    assert status.returncode == 0, status.stderr
    state = json.loads(status.stdout)
    assert state["State"] == "SUCCESS" and state["Results"] == [{"Type": "int64", "Value": 42}]
    assert run(["status", "task_missing"], env).returncode == 1


def test_processes_spread_work_and_stop_gracefully(db: Path, worker: subprocess.Popen[str]) -> None:
    env = env_for(db)
    sys.path.insert(0, str(ROOT / "tests"))
    from machinery import Config, Server, Signature

    server = Server(Config(broker=f"sqlite:///{db}", result_backend=f"sqlite:///{db}"))
    try:
        results = server.send_tasks([Signature("sleepy", [0.05, i]) for i in range(40)])
        assert sorted(r.get(timeout=60) for r in results) == list(range(40))
        pids = {server.send_task(Signature("pid")).get(timeout=30) for _ in range(30)}
    finally:
        server.close()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0
    assert len(pids) >= 1
    del env


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def _cmdline(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read().decode().split("\0")


def _mapped_packages(pid: int) -> set[str]:
    """Files a process has mapped from installed packages (site-packages): the extension modules
    of what it imported (msgspec, uvloop, ... for machinery and an app)."""
    with open(f"/proc/{pid}/maps") as f:
        paths = {line.split(maxsplit=5)[5].strip() for line in f if len(line.split(maxsplit=5)) == 6}
    return {p for p in paths if "site-packages" in p or "dist-packages" in p}


def _until(check: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_the_supervisor_holds_no_app_and_restarts_a_dead_worker(db: Path, worker: subprocess.Popen[str]) -> None:
    """After forking, the supervisor execs a stdlib-only script (it keeps none of the app's memory);
    a worker killed outright is started again, as a fresh `machinery worker` process."""
    sup = worker.pid
    assert _until(lambda: "cli/supervisor.py" in " ".join(_cmdline(sup)) and len(_children(sup)) == 2)
    assert _mapped_packages(sup) == set(), "the supervisor still holds modules of the app or machinery"
    child = _children(sup)[0]  # a worker maps msgspec and the rest once it has imported the app: the check sees them
    assert _until(lambda: bool(_mapped_packages(child))), "the check cannot see a worker's packages"
    killed, kept = _children(sup)
    os.kill(killed, signal.SIGKILL)
    assert _until(lambda: len(_children(sup)) == 2 and killed not in _children(sup))
    (new,) = set(_children(sup)) - {kept}
    # between its fork and its exec the new child still shows the supervisor's command line
    assert _until(lambda: not any(part.endswith("cli/supervisor.py") for part in _cmdline(new)))
    argv = _cmdline(new)
    assert argv[argv.index("--processes") + 1] == "1" and argv[argv.index("--name") + 1].endswith(("-0", "-1"))
    sys.path.insert(0, str(ROOT / "tests"))
    from machinery import Config, Server, Signature

    server = Server(Config(broker=f"sqlite:///{db}", result_backend=f"sqlite:///{db}"))
    try:
        results = server.send_tasks([Signature("sleepy", [0.05, i]) for i in range(20)])
        assert sorted(r.get(timeout=60) for r in results) == list(range(20))
        assert _until(lambda: new in {server.send_task(Signature("pid")).get(timeout=30) for _ in range(10)})
    finally:
        server.close()
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


def test_pending_lists_without_consuming(db: Path) -> None:
    env = env_for(db)
    for n in (1, 2, 3):
        assert run(["send", "add", str(n), "1"], env).returncode == 0
    out = run(["pending"], env)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["Args"][0]["Value"] for line in lines] == [1, 2, 3]
    assert run(["pending"], env).stdout == out.stdout


def test_bad_app_is_a_clear_error(db: Path) -> None:
    out = run(["worker", "--app", "no_such_module:server"], env_for(db))
    assert out.returncode == 2 and "cannot import no_such_module" in out.stderr
    out = run(["worker", "--app", "nocolon"], env_for(db))
    assert out.returncode == 2 and "MODULE:ATTR" in out.stderr
    out = run(["status", "x"], env_for(db, BROKER="kafka://x"))
    assert out.returncode == 2 and "known schemes" in out.stderr


def test_example_runs(tmp_path: Path) -> None:
    out = subprocess.run([*CLI, "example", "--db", str(tmp_path / "ex.sqlite3")], capture_output=True,
                         text=True, timeout=120, env=env_for(tmp_path / "unused"), check=False)
    assert out.returncode == 0, out.stderr
    assert "chord multiply(add(1,1), add(5,5)) = 20" in out.stdout
    assert "chain 4 * (5 + 5 + (1 + 1)) = 48" in out.stdout
    assert "retried flaky(7) = 7 after 3 attempts" in out.stdout


def test_worker_sigkill_loses_nothing(db: Path, tmp_path: Path) -> None:
    """SIGKILL a worker in the middle of work: every task still completes (at-least-once)."""
    log = tmp_path / "runs.log"
    env = env_for(db, MACHINERY_TEST_LOG=str(log), SQLITE_LEASE_SECONDS="2")
    sys.path.insert(0, str(ROOT / "tests"))
    from machinery import Config, Server, Signature

    url = f"sqlite:///{db}"
    server = Server(Config(broker=url, result_backend=url))
    try:
        results = server.send_tasks([Signature("sleepy", [0.02, i]) for i in range(300)])
        victim = subprocess.Popen([*CLI, "worker", "--app", "apps.envapp:server", "--concurrency", "8"],
                                  env=env, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and (not log.exists() or len(log.read_text().splitlines()) < 40):
            time.sleep(0.02)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        started_before_kill = len(log.read_text().splitlines())
        assert 40 <= started_before_kill < 300
        rescuer = subprocess.Popen([*CLI, "worker", "--app", "apps.envapp:server", "--concurrency", "8"],
                                   env=env, text=True)
        try:
            assert sorted(r.get(timeout=90) for r in results) == list(range(300))
        finally:
            rescuer.send_signal(signal.SIGTERM)
            rescuer.wait(timeout=30)
    finally:
        server.close()
    runs = [int(line.split()[0]) for line in log.read_text().splitlines()]
    assert set(runs) == set(range(300))
    assert len(runs) >= 300


def _start_worker(db: Path, tmp_path: Path, log: Path) -> subprocess.Popen[str]:
    env = env_for(db, MACHINERY_TEST_LOG=str(log))
    return subprocess.Popen([*CLI, "worker", "--app", "apps.envapp:server", "--concurrency", "2"], env=env, text=True)


def _wait_started(log: Path, count: int = 1, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("task did not start")


def test_one_signal_stops_gracefully(db: Path, tmp_path: Path) -> None:
    from machinery import Config, Server, Signature

    log = tmp_path / "runs.log"
    url = f"sqlite:///{db}"
    server = Server(Config(broker=url, result_backend=url))
    try:
        res = server.send_task(Signature("sleepy", [1.5, 7]))
        proc = _start_worker(db, tmp_path, log)
        _wait_started(log)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        state = res.get_state()  # no other worker: only the stopping one can have finished it
        assert state is not None and state.state == "SUCCESS", "it stopped without finishing its task"
        assert res.get(timeout=5) == 7
    finally:
        server.close()


def test_two_signals_stop_at_once_and_give_the_task_back(db: Path, tmp_path: Path) -> None:
    from machinery import Config, Server, Signature

    log = tmp_path / "runs.log"
    url = f"sqlite:///{db}"
    server = Server(Config(broker=url, result_backend=url))
    try:
        res = server.send_task(Signature("sleepy", [30, 8]))
        proc = _start_worker(db, tmp_path, log)
        _wait_started(log)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=25)
        assert time.monotonic() - started < 20  # the task sleeps 30 s: it did not wait for it
        state = res.get_state()
        assert state is not None and state.state != "SUCCESS"
        assert [s.uuid for s in server.get_broker().get_pending_tasks()] == [res.task_uuid]
    finally:
        server.close()


def test_scheduler_command_sends_on_schedule(db: Path) -> None:
    """`machinery scheduler` keeps an app's schedules running; two of them still send one task per tick."""
    from machinery import Config, Server

    env = env_for(db)
    args = [*CLI, "scheduler", "--app", "apps.periodic_app:server"]
    started_ns = time.time_ns()
    procs = [subprocess.Popen(args, env=env, text=True) for _ in range(2)]
    probe = Server(Config(broker=f"sqlite:///{db}", result_backend=f"sqlite:///{db}"))
    try:
        assert _until(lambda: len(probe.get_broker().get_pending_tasks()) >= 3, timeout=60), "no sends"
    finally:
        probe.close()
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            assert proc.wait(timeout=30) == 0
    ticks = time.time_ns() // 1_000_000_000 - started_ns // 1_000_000_000  # "@every 1s" ticks while they ran
    out = run(["pending"], env)
    sent = [json.loads(line) for line in out.stdout.splitlines()]
    assert 3 <= len(sent) <= ticks, f"{len(sent)} sends in {ticks} ticks: a tick was sent twice"
    assert all(s["Name"] == "add" for s in sent) and len({s["UUID"] for s in sent}) == len(sent)


def test_importing_an_app_with_schedules_sends_nothing(db: Path) -> None:
    """Only processes that ask run the schedules: a plain `import myapp` must queue no ticks."""
    env = env_for(db)
    code = "import time, apps.periodic_app; time.sleep(2.5)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    assert run(["pending"], env).stdout == ""


def test_scheduler_without_schedules_says_so(db: Path) -> None:
    out = run(["scheduler", "--app", "apps.envapp:server"], env_for(db), timeout=30)
    assert out.returncode != 0
    assert "no periodic tasks are registered" in out.stderr


def test_worker_scheduler_flag_runs_the_schedules(db: Path, tmp_path: Path) -> None:
    log = tmp_path / "ticks.log"
    env = env_for(db, MACHINERY_TEST_LOG=str(log))
    args = [*CLI, "worker", "--app", "apps.periodic_app:server", "--concurrency", "2"]
    plain = subprocess.Popen(args, env=env, text=True)
    try:
        time.sleep(2.5)
        assert not log.exists(), "a worker without --scheduler sent ticks"
    finally:
        plain.send_signal(signal.SIGTERM)
        assert plain.wait(timeout=30) == 0
    proc = subprocess.Popen([*args, "--scheduler", "--processes", "2"], env=env, text=True)
    try:
        assert _until(lambda: log.exists() and len(log.read_text().splitlines()) >= 3, timeout=30)
        started = time.monotonic()
        first = len(log.read_text().splitlines())
        time.sleep(3)
        ran = len(log.read_text().splitlines()) - first
        elapsed = time.monotonic() - started
        # two processes run the schedule; each tick is still sent (and run) once
        assert ran <= elapsed + 1.5, f"{ran} ticks ran in {elapsed:.1f} s"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    for processes in ("1", "2"):
        out = run(["worker", "--app", "apps.envapp:server", "--scheduler", "--processes", processes], env_for(db),
                  timeout=30)
        assert out.returncode == 2 and "registers no periodic tasks" in out.stderr
