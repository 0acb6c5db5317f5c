"""Where the embedded store is: shown at worker start and by `machinery status`, and a producer
writing to a file no worker has ever used is told so."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from machinery import Config, Server
from machinery.drivers.registry import describe
from machinery.testing import memory_server

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "machinery"]
PRODUCER = "from apps.default_app import add; print(add.send(1, 2).get(timeout=30))"


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("BROKER", "RESULT_BACKEND", "LOCK")}
    out["PYTHONPATH"] = f"{ROOT / 'tests'}{os.pathsep}{ROOT / 'src'}"
    return out


def test_describe_names_the_absolute_file_and_hides_passwords(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert describe("sqlite:///machinery.sqlite3") == f"SQLite file {tmp_path / 'machinery.sqlite3'}"
    assert describe("sqlite:////var/x.db") == "SQLite file /var/x.db"
    assert describe("redis://:secret@host:6379/2") == "redis://***@host:6379/2"
    assert describe("memory://") == "memory (this process only)"
    server = Server(Config())
    try:
        assert server.where() == f"broker and results: SQLite file {tmp_path / 'machinery.sqlite3'}"
    finally:
        server.close()
    server = memory_server()
    assert server.where() == "broker and results: memory (this process only)"
    server.close()
    server = Server(Config(result_backend="null"))
    assert server.where() == f"broker: SQLite file {tmp_path / 'machinery.sqlite3'}; results: null (stores nothing)"
    server.close()


def test_worker_status_and_a_producer_elsewhere(tmp_path: Path) -> None:
    here, elsewhere = tmp_path / "app", tmp_path / "other"
    here.mkdir()
    elsewhere.mkdir()
    store = here / "machinery.sqlite3"
    worker = subprocess.Popen([*CLI, "worker", "--app", "apps.default_app:server", "--concurrency", "2"],
                              cwd=here, env=env(), text=True, stderr=subprocess.PIPE)
    try:
        assert worker.stderr is not None
        first = worker.stderr.readline()  # logged once the worker has recorded itself in the file
        assert f"consuming machinery_tasks (concurrency 2); broker and results: SQLite file {store}" in first
        status = subprocess.run([*CLI, "status"], cwd=here, env=env(), capture_output=True, text=True,
                                timeout=30, check=True)
        assert status.stdout.splitlines() == [f"broker and results: SQLite file {store}",
                                              "default queue: machinery_tasks (0 waiting)"]
        same = subprocess.run([sys.executable, "-c", PRODUCER], cwd=here, env=env(), capture_output=True,
                              text=True, timeout=60, check=False)
        assert same.returncode == 0 and same.stdout.strip() == "3", same.stderr
        assert same.stderr == ""
        lost = subprocess.run([sys.executable, "-c", PRODUCER.replace("30", "1")], cwd=elsewhere, env=env(),
                              capture_output=True, text=True, timeout=60, check=False)
        assert lost.returncode != 0  # nobody consumes the other file: the wait times out...
        assert (f"no worker has ever consumed queue 'machinery_tasks' from the SQLite file "
                f"{elsewhere / 'machinery.sqlite3'}") in lost.stderr  # ...and the producer was told why
        status = subprocess.run([*CLI, "status"], cwd=elsewhere, env=env(), capture_output=True, text=True,
                                timeout=30, check=True)
        assert status.stdout.splitlines()[1] == "default queue: machinery_tasks (1 waiting)"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.communicate(timeout=30)
