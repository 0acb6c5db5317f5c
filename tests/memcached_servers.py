"""Private memcached servers for the tests: started on free 127.0.0.1 ports on first use, stopped at exit.

`memcache_url(n)` gives a `memcache://` URL over the first n servers of this test run (two at most,
so the key distribution across hosts is exercised). Without the `memcached` binary (Debian package
`memcached`; scripts/test.sh installs it) the tests skip locally and fail with CI=true.
"""

from __future__ import annotations

import atexit
import os
import shutil
import socket
import subprocess
import threading
import time

from servers import free_port, unavailable

_lock = threading.Lock()
_ports: list[int] = []




def _wait_up(port: int, proc: subprocess.Popen[bytes], deadline_s: float = 10.0) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"memcached on port {port} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"memcached on port {port} did not come up")


def _start(binary: str) -> int:
    port = free_port()
    args = [binary, "-l", "127.0.0.1", "-p", str(port), "-U", "0", "-m", "64"]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args += ["-u", "root"]  # memcached refuses to run as root without it
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def stop() -> None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()

    atexit.register(stop)
    try:
        _wait_up(port, proc)
    except RuntimeError:
        stop()
        raise
    return port


def memcache_url(servers: int = 1) -> str:
    """memcache://127.0.0.1:P1[,127.0.0.1:P2] over this run's private servers, started on first use."""
    assert 1 <= servers <= 2
    with _lock:
        binary = shutil.which("memcached") or ("/usr/bin/memcached" if os.path.exists("/usr/bin/memcached") else None)
        if binary is None:
            unavailable("memcached is not installed (Debian package memcached)")
            raise AssertionError("unreachable")
        try:
            while len(_ports) < servers:
                _ports.append(_start(binary))
        except (OSError, RuntimeError) as exc:
            unavailable(f"cannot start memcached: {exc}")
        return "memcache://" + ",".join(f"127.0.0.1:{p}" for p in _ports[:servers])
