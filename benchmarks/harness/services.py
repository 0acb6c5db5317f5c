"""The private Redis server of a run, and throwaway RabbitMQ vhosts (the shared services stay untouched)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


class PrivateRedis:
    """`redis-server` on a free port, no persistence, stopped (and its pid killed) by stop()."""

    def __init__(self, work_dir: Path) -> None:
        self.dir = work_dir / "redis"
        self.port = 0
        self.pid = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if shutil.which("redis-server") is None:
            raise RuntimeError("redis-server is not installed")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        pidfile = self.dir / "redis.pid"
        subprocess.run(
            [
                "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--daemonize", "yes", "--dir", str(self.dir), "--pidfile", str(pidfile),
                "--logfile", str(self.dir / "redis.log"), "--maxclients", "10000",
            ],
            check=True, timeout=30,
        )
        deadline = time.monotonic() + 10
        while not (pidfile.exists() and self.cli("PING") == "PONG"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"private redis on port {self.port} did not start")
            time.sleep(0.05)
        self.pid = int(pidfile.read_text().strip())

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            ["redis-cli", "-h", "127.0.0.1", "-p", str(self.port), *args],
            capture_output=True, text=True, timeout=30, check=False,
        )
        return out.stdout.strip()

    def flush(self) -> None:
        if self.cli("FLUSHALL") != "OK":
            raise RuntimeError("FLUSHALL failed on the private redis")

    def version(self) -> str:
        for line in self.cli("INFO", "server").splitlines():
            if line.startswith("redis_version:"):
                return line.split(":", 1)[1]
        return "?"

    def stop(self) -> None:
        if not self.port:
            return
        self.cli("SHUTDOWN", "NOSAVE")
        deadline = time.monotonic() + 5
        while self.pid and _alive(self.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.pid and _alive(self.pid):
            with contextlib.suppress(ProcessLookupError):
                import os
                import signal

                os.kill(self.pid, signal.SIGKILL)
        self.port = 0


def _alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


class RabbitVhosts:
    """Creates a vhost per adapter run on the shared RabbitMQ (guest/guest) and deletes it afterwards."""

    def __init__(self, prefix: str, host: str = "127.0.0.1", port: int = 5672) -> None:
        self.prefix = prefix
        self.host, self.port = host, port
        self.created: list[str] = []
        self.count = 0

    def available(self) -> tuple[bool, str]:
        if shutil.which("rabbitmqctl") is None:
            return False, "rabbitmqctl not installed"
        if not port_open(self.host, self.port):
            return False, f"nothing listens on {self.host}:{self.port}"
        return True, ""

    def _ctl(self, *args: str) -> None:
        subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)

    def create(self) -> tuple[str, str]:
        """A fresh vhost; returns (name, amqp url)."""
        self.count += 1
        name = f"{self.prefix}-{self.count}"
        self._ctl("add_vhost", name)
        self.created.append(name)
        self._ctl("set_permissions", "-p", name, "guest", ".*", ".*", ".*")
        return name, f"amqp://guest:guest@{self.host}:{self.port}/{name}"

    def delete(self, name: str) -> None:
        with contextlib.suppress(subprocess.SubprocessError):
            self._ctl("delete_vhost", name)
        if name in self.created:
            self.created.remove(name)

    def delete_all(self) -> None:
        for name in list(self.created):
            self.delete(name)

    def version(self) -> str:
        out = subprocess.run(["rabbitmqctl", "-q", "version"], capture_output=True, text=True, timeout=60, check=False)
        return out.stdout.strip() or "?"
