"""The SQLite store's doorbell: other processes' publishes and results wake waiters at once.

The cross-process tests run real processes on a real database file, with a poll interval long
enough (1 s) that only the doorbell can explain a fast round trip.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from machinery.config import Config, SQLiteConfig
from machinery.drivers.sqlite.backend import SQLiteBackend
from machinery.drivers.sqlite.broker import SQLiteBroker
from machinery.drivers.sqlite.doorbell import Doorbell, bells_dir
from machinery.loops import run
from machinery.server import Server
from machinery.tasks.signature import Signature
from machinery.tasks.state import SUCCESS, TaskState
from timing import Calls, RecordingAsyncio

ROOT = Path(__file__).resolve().parents[1]
POLL_MS = 1000
SIG = Signature("t")


def cnf_for(db: Path, poll_ms: int = POLL_MS) -> Config:
    url = f"sqlite:///{db}"
    return Config(broker=url, result_backend=url, sqlite=SQLiteConfig(poll_interval_ms=poll_ms))


def child_env(db: Path) -> dict[str, str]:
    env = dict(os.environ)
    url = f"sqlite:///{db}"
    env.update({"BROKER": url, "RESULT_BACKEND": url, "SQLITE_POLL_INTERVAL_MS": str(POLL_MS),
                "MACHINERY_LOG_LEVEL": "WARNING",
                "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), str(ROOT / "src")])})
    return env


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A directory short enough for the bells to live beside the database (tmp_path may not be)."""
    path = Path(tempfile.mkdtemp(prefix="bell-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def bell_dir(db: Path, kind: str) -> Path:
    found = bells_dir(str(db), kind)
    assert found is not None
    return Path(found[0])


def bell_files(db: Path, kind: str) -> list[str]:
    d = bell_dir(db, kind)
    return sorted(p.name for p in d.iterdir()) if d.is_dir() else []


def broker_at(db: Path, poll_ms: int) -> SQLiteBroker:
    cnf = cnf_for(db, poll_ms)
    return SQLiteBroker(cnf, cnf.broker)


def backend_at(db: Path, poll_ms: int) -> SQLiteBackend:
    cnf = cnf_for(db, poll_ms)
    return SQLiteBackend(cnf, cnf.result_backend)


def wait_until(check: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def on_both_loops(fn: Callable[[], Coroutine[Any, Any, None]]) -> None:
    for kind in ("asyncio", "uvloop"):
        run(fn(), kind)


# --- a real worker (`machinery worker --processes 2`, forked after import) and a producer -----


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Server]]:
    db = tmp_path_factory.mktemp("bell") / "bell.sqlite3"
    cmd = [sys.executable, "-m", "machinery", "worker", "--app", "apps.envapp:server", "--processes", "2"]
    worker = subprocess.Popen(cmd, env=child_env(db), text=True)
    server = Server(cnf_for(db))
    try:
        assert server.send_task(Signature("add", args=[1, 2])).get(timeout=60) == 3
        yield db, server
    finally:
        server.close()
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def round_trips(server: Server, n: int) -> list[float]:
    times = []
    for i in range(n):
        start = time.perf_counter()
        assert server.send_task(Signature("add", args=[i, 1])).get(timeout=30) == i + 1
        times.append(time.perf_counter() - start)
    return times


@pytest.mark.slow
def test_cross_process_round_trip_is_much_faster_than_the_poll_interval(served: tuple[Path, Server]) -> None:
    db, server = served
    p50 = statistics.median(round_trips(server, 30))
    assert p50 < 0.05, f"p50 {p50 * 1000:.1f} ms: the doorbell did not wake the worker or the waiter"
    # each forked worker process binds its own socket
    wait_until(lambda: len(bell_files(db, "broker")) == 2, timeout=10)


@pytest.mark.slow
@pytest.mark.parametrize("lose", ["directory", "worker-sockets"])
def test_a_lost_ring_delays_but_never_loses(served: tuple[Path, Server], lose: str) -> None:
    db, server = served
    round_trips(server, 3)
    if lose == "directory":
        shutil.rmtree(bell_dir(db, "broker").parent)
    else:
        for name in bell_files(db, "broker"):
            os.unlink(bell_dir(db, "broker") / name)
    lost = max(round_trips(server, 1))
    # The worker's fetch, deaf now, still polls (and re-checks its socket on its next call).
    assert lost < POLL_MS / 1000 + 2.0
    time.sleep(1.2)  # every fetch that began before the loss has ended: all sockets are new
    healed = statistics.median(round_trips(server, 10))
    assert healed < 0.05, f"p50 {healed * 1000:.1f} ms after the loss: the bell did not heal"


@pytest.mark.slow
def test_a_killed_processes_socket_is_removed_by_the_next_ring(short_tmp: Path) -> None:
    db = short_tmp / "stale.sqlite3"
    holder = subprocess.Popen(
        [sys.executable, str(ROOT / "tests" / "sqlite_child.py"), "hold", str(db), "30", "1"],
        env=child_env(db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        prefix = f"{holder.pid:x}-"
        wait_until(lambda: any(n.startswith(prefix) for n in bell_files(db, "broker")))
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    stale = [n for n in bell_files(db, "broker") if n.startswith(prefix)]
    assert len(stale) == 1, "SIGKILL leaves the socket file behind"

    async def publish() -> None:
        broker = broker_at(db, POLL_MS)
        try:
            await broker.publish(SIG, b"x", None)
        finally:
            await broker.close()

    asyncio.run(publish())
    assert not any(n.startswith(prefix) for n in bell_files(db, "broker"))


@pytest.mark.slow
def test_fork_gives_the_child_its_own_socket_and_spares_the_parents(short_tmp: Path) -> None:
    db = short_tmp / "fork.sqlite3"
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "doorbell_child.py"), str(db)],
                         env=child_env(db), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    child, parent = (json.loads(line) for line in out.stdout.strip().splitlines())
    assert child["who"] == "child" and parent["who"] == "parent" and child["live"]
    assert parent["child_status"] == 0
    parents = [n for n in child["sockets"] if n.startswith(f"{parent['pid']:x}-")]
    childs = [n for n in child["sockets"] if n.startswith(f"{child['pid']:x}-")]
    assert len(parents) == 1 and len(childs) == 1, child["sockets"]
    assert parent["sockets"] == parents, "the child's exit removed its own socket and only that"
    assert parent["heard"], "the parent's socket still hears rings after the child exited"
    assert bell_files(db, "broker") == []


# --- several driver objects in one process ------------------------------------------------


NO_POLL_MS = 600_000  # no poll within a test: a fetch or wait that ends early was woken by a ring


async def publish_wakes_another_objects_fetch(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    consumer, producer = broker_at(db, NO_POLL_MS), broker_at(db, NO_POLL_MS)
    try:
        await consumer.pending("q")
        claims = Calls(monkeypatch, consumer, "_claim")
        fetch = asyncio.create_task(consumer.fetch(consumer.cnf.default_queue, 10, 10.0))
        await claims.reach(1)  # found nothing: it waits now, its socket bound
        await producer.publish(SIG, b"rung", None)
        assert [d.body for d in await fetch] == [b"rung"]  # unwoken, it would return [] after 10 s
        assert claims.count == 2
    finally:
        await consumer.close()
        await producer.close()


async def result_wakes_another_objects_wait(db: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reader, writer = backend_at(db, NO_POLL_MS), backend_at(db, NO_POLL_MS)
    try:
        reads = Calls(monkeypatch, reader, "get_state")
        task = f"task_{os.urandom(4).hex()}"  # each run on the same database waits for a new task
        waiting = asyncio.create_task(reader.wait_completed(task, 10.0))
        await reads.reach(1)
        await writer.set_state(TaskState(task, SUCCESS, task_name="t"))
        state = await waiting  # unwoken, it would return None after 10 s
        assert state is not None and state.state == SUCCESS
        assert reads.count == 2
    finally:
        await reader.close()
        await writer.close()


def test_rings_wake_other_driver_objects_in_one_process_on_both_loops(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = short_tmp / "objects.sqlite3"

    def both() -> Coroutine[Any, Any, None]:
        async def go() -> None:
            with monkeypatch.context() as patch:
                await publish_wakes_another_objects_fetch(db, patch)
                await result_wakes_another_objects_wait(db, patch)
        return go()

    on_both_loops(both)
    assert bell_dir(db, "broker") == Path(f"{db}.bells") / "broker"
    assert not Path(f"{db}.bells").exists(), "close() removes the sockets, then the empty directories"


def test_a_path_too_long_for_a_socket_uses_a_short_directory_in_tmp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    db = deep / "long.sqlite3"
    found = bells_dir(str(db), "broker")
    assert found is not None and found[1], "expected the temp-dir fallback"
    short = Path(found[0]).parent
    try:
        assert len(os.fsencode(found[0])) < 90
        assert bells_dir(str(db), "broker") == found, "every process must pick the same directory"
        run(publish_wakes_another_objects_fetch(db, monkeypatch))
        assert not Path(f"{db}.bells").exists()
        assert not short.exists(), "the last socket's close removes the directories in tmp"
    finally:
        shutil.rmtree(short, ignore_errors=True)


def test_without_a_usable_directory_waiters_poll(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from machinery.drivers.sqlite import broker as sqlite_broker

    db = short_tmp / "nobell.sqlite3"
    Path(f"{db}.bells").write_text("not a directory")

    async def go() -> None:
        bell = Doorbell(str(db), "broker", lambda key: None)
        with bell.listening() as live:
            assert not live
        consumer, producer = broker_at(db, 50), broker_at(db, 50)
        waits = RecordingAsyncio()
        monkeypatch.setattr(sqlite_broker, "asyncio", waits)
        claims = Calls(monkeypatch, consumer, "_claim")
        try:
            await consumer.pending("q")
            fetch = asyncio.create_task(consumer.fetch(consumer.cnf.default_queue, 10, 10.0))
            await claims.reach(10)  # polls from 2 ms, doubling up to the 50 ms cap
            await producer.publish(SIG, b"polled", None)
            assert [d.body for d in await fetch] == [b"polled"]
            assert claims.count > 10  # a later poll found it: no ring reached this fetch
            assert waits.timeouts and all(t is not None and t <= 0.05 for t in waits.timeouts)
        finally:
            await consumer.close()
            await producer.close()

    run(go())
    assert Path(f"{db}.bells").read_text() == "not a directory"


def test_no_bell_without_unix_sockets_or_a_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert bells_dir(":memory:", "broker") is None
    monkeypatch.delattr(socket, "AF_UNIX")
    assert bells_dir(str(tmp_path / "x.db"), "broker") is None


def test_ringing_lists_the_directory_only_when_it_changed(
    short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from machinery.drivers.sqlite import doorbell

    monkeypatch.setattr(doorbell, "_SETTLE_NS", 0)  # this filesystem's mtimes are fine-grained enough
    listed = []
    real_listdir = os.listdir

    def listdir(path: Any) -> Any:
        listed.append(path)
        return real_listdir(path)

    monkeypatch.setattr(os, "listdir", listdir)
    db = str(short_tmp / "cache.sqlite3")
    heard: list[str] = []

    async def go() -> None:
        first = Doorbell(db, "broker", heard.append)
        second = Doorbell(db, "broker", heard.append)
        ringer = Doorbell(db, "broker", lambda key: None)
        with first.listening():
            await asyncio.sleep(0.05)
            for i in range(100):
                ringer.ring([f"q{i}"])
                await asyncio.sleep(0)  # a socket queues only a few datagrams (net.unix.max_dgram_qlen)
            assert len(listed) == 1
            await asyncio.sleep(0.05)
            assert sorted(heard) == sorted(f"q{i}" for i in range(100))
            with second.listening():
                ringer.ring(["again"])
                await asyncio.sleep(0.05)
        assert len(listed) == 2 and heard.count("again") == 2
        for bell in (first, second, ringer):
            bell.close()

    run(go())


def test_a_stale_socket_file_is_unlinked_when_rung(short_tmp: Path) -> None:
    db = str(short_tmp / "dead.sqlite3")
    directory = bell_dir(Path(db), "broker")
    directory.mkdir(parents=True)
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dead.bind(str(directory / "1-deadbeef.bell"))
    dead.close()
    ringer = Doorbell(db, "broker", lambda key: None)
    ringer.ring(["q"])
    ringer.close()
    assert list(directory.iterdir()) == []
