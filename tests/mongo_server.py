"""One MongoDB wire-protocol server per test run, shared by every test that needs it.

There is no mongod for this machine kind, so the tests use SecantusDB (`secantusdb` on PyPI, a
MongoDB-compatible server on WiredTiger), in memory. Its pins clash with the project's (botocore),
so it lives in its own virtualenv, `.venv-mongo/` at the repository root: scripts/test.sh creates
it, and `mongo_url()` creates it too when it is missing. `mongo_url()` starts the server on a free
127.0.0.1 port on first use and stops it when the test process exits. Tests keep apart by database
name. MACHINERY_TEST_MONGO_URL points the tests at another server instead. When the server cannot
be installed or started the tests skip locally and fail with CI=true.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from servers import free_port, unavailable

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv-mongo"
SERVER_BIN = VENV / "bin" / "secantusd-py"
PACKAGE = "secantusdb==0.7.0b3"

_lock = threading.Lock()
_urls: list[str] = []




def _install() -> None:
    """Create .venv-mongo with the server in it (about 15 s)."""
    python = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([python, "-m", "venv", str(VENV)], check=True, capture_output=True, timeout=300)
    subprocess.run([str(VENV / "bin" / "python"), "-m", "pip", "install", "-q", PACKAGE], check=True,
                   capture_output=True, timeout=600)


def _wait_up(port: int, proc: subprocess.Popen[bytes], log: Path, deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"secantusd exited with code {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"secantusd on port {port} did not come up in {deadline_s} s")


def _start() -> str:
    if not SERVER_BIN.exists():
        try:
            _install()
        except (OSError, subprocess.SubprocessError) as exc:
            detail = getattr(exc, "stderr", b"") or b""
            unavailable(f"cannot install {PACKAGE} into {VENV}: {exc} {detail.decode(errors='replace')[-1000:]}")
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="secantusd-")) / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(SERVER_BIN), "--host", "127.0.0.1", "--port", str(port), "--storage-path", ":memory:",
             "--log-level", "WARNING"],
            stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
        )

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        shutil.rmtree(log.parent, ignore_errors=True)

    atexit.register(stop)
    try:
        _wait_up(port, proc, log)
    except RuntimeError as exc:
        stop()
        unavailable(str(exc))
    return f"mongodb://127.0.0.1:{port}/"


def mongo_url() -> str:
    """The mongodb:// URL of this run's server, started (and installed) on first use."""
    with _lock:
        if not _urls:
            _urls.append(os.environ.get("MACHINERY_TEST_MONGO_URL") or _start())
        return _urls[0]


@pytest.fixture(scope="session")
def mongo_server() -> str:
    """The shared server's URL (a fixture form of mongo_url())."""
    return mongo_url()
