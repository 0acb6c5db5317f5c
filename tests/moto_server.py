"""One moto server (AWS SQS and DynamoDB emulator) per test run, shared by every test that needs it.

`moto_endpoint()` starts `moto.server` from this venv on a free 127.0.0.1 port the first time it is
called and stops it when the test process exits; every later call returns the same endpoint URL.
Tests keep apart by naming their queues and tables uniquely.

`moto_endpoint(serial=True)` is a second server that handles one request at a time, for DynamoDB:
moto's DynamoDB has no locking, so in the threaded server two concurrent conditional updates of one
item can both read the old item and lose an update, where real DynamoDB applies each atomically.
(SQS keeps the threaded server: a long poll would hold a serial one up.) The emulator accepts any credentials:
use `MOTO_REGION` and `MOTO_CREDENTIALS` (also set by `moto_env()` for clients that read the
environment). A missing `moto[server]` install skips locally and fails with CI=true.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from servers import free_port, unavailable

MOTO_REGION = "us-east-1"
MOTO_CREDENTIALS = ("testing", "testing")  # access key id, secret access key

_lock = threading.Lock()
_endpoints: dict[bool, str] = {}  # serial? -> endpoint URL

# moto.server's main() always serves threaded; this runs the same app one request at a time
_SERIAL_SERVER = (
    "import sys\n"
    "from werkzeug.serving import run_simple\n"
    "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app\n"
    "run_simple('127.0.0.1', int(sys.argv[1]), DomainDispatcherApplication(create_backend_app), threaded=False,\n"
    "           request_handler=MotoRequestHandler)\n"
)




def _wait_up(url: str, proc: subprocess.Popen[bytes], deadline_s: float = 30.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=1):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"moto server at {url} did not come up in {deadline_s} s")


def moto_endpoint(serial: bool = False) -> str:
    """The endpoint URL (http://127.0.0.1:PORT) of this run's moto server, started on first use."""
    with _lock:
        if serial not in _endpoints:
            try:
                import moto.server  # noqa: F401
            except ImportError:
                unavailable("moto[server] is not installed (pip install -e '.[dev]')")
            port = free_port()
            args = ["-c", _SERIAL_SERVER, str(port)] if serial else ["-m", "moto.server", "-H", "127.0.0.1",
                                                                     "-p", str(port)]
            proc = subprocess.Popen(
                [sys.executable, *args],
                env={**os.environ, "MOTO_PORT": str(port)}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )

            def stop() -> None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()

            atexit.register(stop)
            url = f"http://127.0.0.1:{port}"
            try:
                _wait_up(url, proc)
            except RuntimeError as exc:
                stop()
                unavailable(str(exc))
            _endpoints[serial] = url
        return _endpoints[serial]


def moto_env() -> dict[str, str]:
    """Environment variables that point AWS clients at the emulator with dummy credentials."""
    return {
        "AWS_ENDPOINT_URL": moto_endpoint(),
        "AWS_DEFAULT_REGION": MOTO_REGION,
        "AWS_REGION": MOTO_REGION,
        "AWS_ACCESS_KEY_ID": MOTO_CREDENTIALS[0],
        "AWS_SECRET_ACCESS_KEY": MOTO_CREDENTIALS[1],
    }


@pytest.fixture(scope="session")
def moto_server() -> str:
    """The shared moto server's endpoint URL (a fixture form of moto_endpoint())."""
    return moto_endpoint()


def moto_session() -> object:
    """An aiobotocore AioSession with the emulator's dummy credentials and region (for `*.client`)."""
    from aiobotocore.session import AioSession

    session = AioSession()
    session.set_credentials(*MOTO_CREDENTIALS)
    session.set_config_variable("region", MOTO_REGION)
    return session
