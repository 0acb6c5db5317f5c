"""Server lifecycle: `with` and `async with` close it, close() is idempotent, and a program that
never closes its Server is closed cleanly at interpreter exit (no asyncio warning on stderr)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

import machinery
from machinery import Config, Server, Signature
from machinery.errors import ServerClosedError
from redis_servers import PrivateRedis, require_binary

SRC = Path(machinery.__file__).resolve().parents[1]


def memory_config() -> Config:
    return Config(broker="memory://", result_backend="memory://")


def test_with_closes_the_server() -> None:
    with Server(memory_config()) as server:
        server.send_task(Signature("x"))
        assert server.portal.started and not server.closed
    assert server.closed and server.portal.closed
    with pytest.raises(ServerClosedError):
        server.send_task(Signature("x"))


def test_with_closes_on_an_error_too() -> None:
    with pytest.raises(KeyError), Server(memory_config()) as server:
        raise KeyError("in the block")
    assert server.closed


async def test_async_with_closes_the_server_and_its_sync_loop() -> None:
    async with Server(memory_config()) as server:
        res = await server.asend_task(Signature("x"))
        server.send_tasks([Signature("y")])  # the sync facade's loop runs too
        assert server.portal.started
    assert server.closed and server.portal.closed
    with pytest.raises(ServerClosedError):
        await server.asend_task(Signature("x"))
    with pytest.raises(ServerClosedError):
        await res.aget(timeout=1)


async def test_async_with_without_the_sync_loop_starts_none() -> None:
    async with Server(memory_config()) as server:
        await server.asend_task(Signature("x"))
    assert server.closed and not server.portal.started


def test_close_is_idempotent_in_both_faces() -> None:
    server = Server(memory_config())
    server.send_task(Signature("x"))
    server.close()
    server.close()
    asyncio.run(server.aclose())
    other = Server(memory_config())
    asyncio.run(other.aclose())
    asyncio.run(other.aclose())
    other.close()
    assert server.closed and other.closed


def test_the_exit_hook_is_per_server_and_goes_with_it(tmp_path: Path) -> None:
    """At exit, only the Servers still open are closed: close() unregisters a Server's hook, and
    a collected Server's hook finds nothing (it holds the Server weakly: nothing keeps it alive)."""
    script = tmp_path / "hooks.py"
    script.write_text(textwrap.dedent("""
        import atexit, gc, weakref
        from machinery import Config, Server

        seen = []
        atexit.register(lambda: print("closed at exit:", seen, flush=True))  # runs after the hooks
        original = Server._close_at_exit

        def spy(self):
            seen.append(self.name)
            original(self)

        Server._close_at_exit = spy
        cnf = Config(broker="memory://", result_backend="memory://")
        servers = {}
        for name in ("closed", "open", "collected", "async-closed"):
            servers[name] = Server(cnf)
            servers[name].name = name
            servers[name].send_tasks([])  # starts its sync facade's loop
        servers["closed"].close()
        import asyncio
        asyncio.run(servers["async-closed"].aclose())
        gone = weakref.ref(servers.pop("collected"))
        gc.collect()
        print("collected:", gone() is None, flush=True)
    """))
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.splitlines() == ["collected: True", "closed at exit: ['open']"]


# --- a program that exits without close() --------------------------------------------------

APP = """
import os
from machinery import Config, Server

url = os.environ["APP_URL"]
server = Server(Config(broker=url, result_backend=url))


@server.task
def add(x: int, y: int) -> int:
    return x + y
"""

# The producer waits on results every way the sync API can (in the caller's thread, and on the
# Server's own loop: groups and chains wait there, through the backend's notifier) and exits
# without close(). An atexit function registered before the Server runs after its hook and
# reports whether the Server was closed by then.
PRODUCER = """
import atexit

state = {}
atexit.register(lambda: print("closed at exit:", state["server"].closed, flush=True))

from app import add, server
from machinery import Chain, Group

state["server"] = server
print(add.send(1, 2).get(timeout=20))
print([r.get(timeout=20) for r in server.send_group(Group(add.s(1, 1), add.s(2, 2)))])
print(server.send_chain(Chain(add.s(1, 2), add.partial(3))).get(timeout=20))
"""


@contextmanager
def worker_process(tmp_path: Path, url: str) -> Iterator[dict[str, str]]:
    (tmp_path / "app.py").write_text(textwrap.dedent(APP))
    env = {**os.environ, "APP_URL": url, "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    worker = subprocess.Popen([sys.executable, "-m", "machinery", "--log-level", "INFO", "worker",
                               "--app", "app:server", "--concurrency", "4"],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    assert worker.stderr is not None
    lines: list[bytes] = []
    started = threading.Event()

    def drain(stream: IO[bytes]) -> None:
        for line in stream:
            lines.append(line)
            started.set()

    reader = threading.Thread(target=drain, args=(worker.stderr,), daemon=True)
    reader.start()
    try:
        # its first line comes once it consumes (a producer before that is warned of no worker)
        assert started.wait(30), "the worker did not start"
        yield env
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        reader.join(10)
        assert worker.returncode == 0, b"".join(lines).decode()


def run_producer(tmp_path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "producer.py"
    script.write_text(textwrap.dedent(PRODUCER))
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=90, check=False)
    assert time.monotonic() - started < 60
    return done


def check_clean_exit(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["3", "[2, 4]", "6", "closed at exit: True"], done.stdout + done.stderr
    assert done.stderr == "", done.stderr  # no "Task was destroyed but it is pending!", nothing else


def test_exit_without_close_is_clean_on_the_sqlite_default(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'machinery.sqlite3'}"
    with worker_process(tmp_path, url) as env:
        check_clean_exit(run_producer(tmp_path, env))


@pytest.mark.slow
def test_exit_without_close_is_clean_on_redis(tmp_path: Path) -> None:
    """On a private redis-server (never the shared one): result waits on the Server's loop use
    the backend's pub/sub notifier, whose reader task was left pending at exit."""
    require_binary("redis-server")
    redis = PrivateRedis(tmp_path / "redis").start()
    try:
        with worker_process(tmp_path, f"redis://127.0.0.1:{redis.port}/0") as env:
            check_clean_exit(run_producer(tmp_path, env))
    finally:
        redis.stop()
