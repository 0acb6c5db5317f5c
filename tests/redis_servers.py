"""Redis servers for the tests: this run's own server, private instances and a private Cluster.

Every Redis test works on `redis_url()`: a redis-server that this test run starts on a free port on
first use and stops at exit, so that two runs on one machine never see each other's keys and a test
may flush its database freely. The shared server on 6379 is never used. MACHINERY_TEST_REDIS_URL
names another server instead; it must be one that no other run uses, since the tests flush it.

Private servers are child processes of the test run on free ports in a temp dir, so fault tests can
kill and restart them without disturbing anything else. With CI=true a server that cannot be started
or reached fails the test instead of skipping it.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from servers import unavailable

DEFAULT_DB = 15  # the database most tests use; a few use others of the same server (lock 11, contract 14)


def ping(url: str, timeout: float = 2.0, password: str = "") -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                      password=password or None)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


def require_redis(url: str) -> None:
    if not ping(url):
        unavailable(f"Redis is not reachable at {url}")


def redis_url(db: int = DEFAULT_DB) -> str:
    """The URL of database `db` on this run's Redis; skips the test (fails it with CI=true) when there is none."""
    override = os.environ.get("MACHINERY_TEST_REDIS_URL")
    if override:
        url = urlunsplit(urlsplit(override)._replace(path=f"/{db}"))
        require_redis(url)
        return url
    try:
        server = session_redis()
    except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
        unavailable(f"cannot start this run's redis-server: {exc}")
        raise AssertionError("unreachable") from exc
    return f"redis://127.0.0.1:{server.port}/{db}"


def require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} is not installed")
        raise AssertionError("unreachable")
    return path


def free_port(also_plus: int = 0) -> int:
    """A free TCP port on 127.0.0.1 (and port+also_plus free too, for a cluster bus)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if also_plus and (port + also_plus > 65535 or not _is_free(port + also_plus)):
            continue
        return port
    raise RuntimeError("no free port found")


def _is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_ping(port: int, deadline_s: float = 10.0, password: str = "") -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if ping(f"redis://127.0.0.1:{port}/0", timeout=0.5, password=password):
            return
        time.sleep(0.02)
    raise RuntimeError(f"redis-server on port {port} did not come up")


def _server_pid(port: int, password: str = "") -> int | None:
    import redis

    client = redis.Redis(port=port, password=password or None, socket_timeout=2)
    try:
        return int(client.info("server")["process_id"])
    except Exception:
        return None
    finally:
        client.close()


class PrivateRedis:
    """A redis-server child process; stop() and start() again keep its port and data dir."""

    def __init__(self, directory: Path, *extra: str, port: int | None = None, config: str = "",
                 password: str = "") -> None:
        self.binary = require_binary("redis-server")
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.extra = extra
        self.config = config  # a config file's text (e.g. a Sentinel's), written to the data dir
        self.password = password  # for the readiness ping
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        args = [self.binary]
        if self.config:
            conf = self.dir / "redis.conf"
            conf.write_text(self.config)
            args.append(str(conf))
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--daemonize", "no",
                 *self.extra]
        if not any(a == "--sentinel" for a in self.extra):
            args += ["--save", ""]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_ping(self.port, password=self.password)
        if _server_pid(self.port, self.password) != self.proc.pid:  # another run took the port first
            self.stop()
            raise RuntimeError(f"port {self.port} is served by another redis-server")
        return self

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final save."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None


class PrivateCluster:
    """Three masters, no replicas, on free ports; ready when every node says cluster_state:ok."""

    def __init__(self, directory: Path, nodes: int = 3) -> None:
        self.dir = directory
        self.nodes = [
            PrivateRedis(directory / f"n{i}", "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                         "--cluster-node-timeout", "2000", "--appendonly", "no", port=free_port(also_plus=10000))
            for i in range(nodes)
        ]

    @property
    def url(self) -> str:
        """Go Machinery's multi-host form: comma-separated hosts mean a cluster."""
        return "redis://" + ",".join(f"127.0.0.1:{n.port}" for n in self.nodes)

    def start(self) -> PrivateCluster:
        for node in self.nodes:
            for stale in ("nodes.conf", "appendonly.aof", "dump.rdb"):
                with contextlib.suppress(FileNotFoundError):
                    (node.dir / stale).unlink()
            node.start()
        cli = require_binary("redis-cli")
        hosts = [f"127.0.0.1:{n.port}" for n in self.nodes]
        subprocess.run([cli, "--cluster", "create", *hosts, "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60)
        deadline = time.monotonic() + 30
        import redis

        while time.monotonic() < deadline:
            states = []
            for n in self.nodes:
                client = redis.Redis(port=n.port, socket_timeout=1)
                try:
                    states.append(b"cluster_state:ok" in client.execute_command("CLUSTER", "INFO"))
                except Exception:
                    states.append(False)
                finally:
                    client.close()
            if all(states):
                return self
            time.sleep(0.1)
        raise RuntimeError("the private Redis Cluster did not reach cluster_state:ok")

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


_session_lock = threading.Lock()
_session: list[PrivateRedis] = []


def session_redis() -> PrivateRedis:
    """This run's own redis-server, started on first use and stopped (its data dir removed) at exit."""
    with _session_lock:
        if not _session:
            require_binary("redis-server")
            directory = Path(tempfile.mkdtemp(prefix="machinery-redis-session-"))
            for attempt in range(5):  # a free port can be taken by another run before our server binds it
                server = PrivateRedis(directory)
                try:
                    server.start()
                    break
                except RuntimeError:
                    server.stop()
                    if attempt == 4:
                        shutil.rmtree(directory, ignore_errors=True)
                        raise
                except BaseException:
                    server.stop()
                    shutil.rmtree(directory, ignore_errors=True)
                    raise

            def stop() -> None:
                server.stop()
                shutil.rmtree(directory, ignore_errors=True)

            atexit.register(stop)
            _session.append(server)
        return _session[0]


_cluster_lock = threading.Lock()
_cluster: list[PrivateCluster] = []


def shared_cluster() -> PrivateCluster:
    """One private cluster per test run, started on first use and stopped at exit."""
    with _cluster_lock:
        if not _cluster:
            require_binary("redis-server")
            require_binary("redis-cli")
            directory = Path(tempfile.mkdtemp(prefix="machinery-redis-cluster-"))
            cluster = PrivateCluster(directory).start()

            def stop() -> None:
                cluster.stop()
                shutil.rmtree(directory, ignore_errors=True)

            atexit.register(stop)
            _cluster.append(cluster)
        return _cluster[0]
