"""A failed task keeps its exception's type and traceback for get() callers and `machinery
status`, and a running task reports progress that AsyncResult.progress() reads."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from machinery import Config, Server, Signature, TaskContext, TaskError
from machinery.errors import ArgTypeError
from machinery.tasks.state import FAILURE
from machinery.testing import running_worker


class CustomError(Exception):
    pass


@pytest.fixture(params=["memory", "sqlite"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'details.sqlite3'}"
    server = Server(Config(broker=url, result_backend=url))
    gate = threading.Event()
    server.__dict__["gate"] = gate

    def inner(x: int) -> int:
        raise CustomError(f"no good: {x}")

    @server.task
    def boom(x: int) -> int:
        return inner(x)

    @server.task
    def steps(ctx: TaskContext, n: int) -> int:
        for i in range(n):
            ctx.set_progress({"done": i + 1, "of": n})
        gate.wait(15)
        return n

    @server.task
    async def bad_progress(ctx: TaskContext) -> None:
        ctx.set_progress(object())

    try:
        yield server
    finally:
        server.close()


def test_get_raises_with_the_exception_type_and_traceback(server: Server) -> None:
    result = server.send_task(Signature("boom", args=[7]))
    with running_worker(server), pytest.raises(TaskError) as info:
        result.get(timeout=15)
    error = info.value
    assert error.error == "no good: 7"
    assert error.exc_type == f"{__name__}.CustomError"
    assert "Traceback (most recent call last)" in error.traceback
    assert "in inner" in error.traceback and "CustomError: no good: 7" in error.traceback
    state = result.get_state()
    assert state is not None and state.state == FAILURE and state.exc_type == error.exc_type


def test_progress_is_read_while_the_task_runs_and_kept_after(server: Server) -> None:
    result = server.send_task(Signature("steps", args=[3]))
    assert result.progress() is None
    with running_worker(server):
        deadline = time.monotonic() + 15
        while result.progress() != {"done": 3, "of": 3}:
            assert time.monotonic() < deadline, result.progress()
            time.sleep(0.02)
        server.__dict__["gate"].set()
        assert result.get(timeout=15) == 3
    assert result.progress() == {"done": 3, "of": 3}


def test_a_progress_value_that_is_not_json_fails_the_task_with_a_clear_error(server: Server) -> None:
    result = server.send_task(Signature("bad_progress"))
    with running_worker(server), pytest.raises(TaskError) as info:
        result.get(timeout=15)
    assert info.value.exc_type == "machinery.errors.ArgTypeError"
    assert ArgTypeError.__name__ in info.value.traceback


def test_machinery_status_shows_the_exception_type_and_traceback(tmp_path: Path) -> None:
    import json
    import os
    import subprocess
    import sys

    db = tmp_path / "status.sqlite3"
    url = f"sqlite:///{db}"
    server = Server(Config(broker=url, result_backend=url))
    server.register_task("boom", lambda: 1 // 0)
    try:
        result = server.send_task(Signature("boom"))
        with running_worker(server), pytest.raises(TaskError):
            result.get(timeout=15)
    finally:
        server.close()
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "BROKER": url, "RESULT_BACKEND": url, "PYTHONPATH": str(src)}
    shown = subprocess.run([sys.executable, "-m", "machinery", "status", result.signature.uuid], env=env,
                           capture_output=True, text=True, timeout=60, check=False)
    assert shown.returncode == 0, shown.stderr
    state = json.loads(shown.stdout)
    assert state["State"] == "FAILURE" and state["ExcType"] == "ZeroDivisionError"
    assert "ZeroDivisionError: integer division or modulo by zero" in state["Traceback"]
