"""RabbitMQ helpers for the AMQP tests: reachability (skip locally, fail on CI), raw admin calls
for assertions and clean-up, and a private RabbitMQ node for restart tests."""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiormq
from aiormq import exceptions as amqp_exc
from aiormq.abc import AbstractChannel, AbstractConnection, DeliveredMessage
from pamqp import commands as spec

from machinery.config import AMQPConfig, Config
from naming import unique
from servers import free_port, unavailable

AMQP_URL = os.environ.get("AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
RABBIT_BIN = Path("/usr/lib/rabbitmq/bin")
GOLDEN = Path(__file__).parent / "golden"


def golden(name: str) -> bytes:
    """Go's own encoding/json output (tests/golden, a copy of the reference vectors)."""
    return (GOLDEN / name).read_bytes()


async def require_rabbit(url: str = AMQP_URL) -> None:
    try:
        conn = await asyncio.wait_for(aiormq.connect(url), 5)
    except (OSError, TimeoutError, amqp_exc.AMQPError) as exc:
        unavailable(f"RabbitMQ is not reachable at {url}: {exc}")
        return
    await conn.close()


def make_cnf(url: str = AMQP_URL, **amqp: Any) -> Config:
    """A config whose exchange and queues no other test uses."""
    ns = unique()
    amqp.setdefault("exchange", f"{ns}_exchange")
    amqp.setdefault("binding_key", f"{ns}_task")
    return Config(broker=url, result_backend=url, default_queue=f"{ns}_tasks", results_expire_in=120,
                  amqp=AMQPConfig(**amqp))


class Admin:
    """Raw AMQP calls for assertions: what is really on the server, and clean-up."""

    def __init__(self, url: str = AMQP_URL) -> None:
        self.url = url
        self.conn: AbstractConnection | None = None
        self.queues: set[str] = set()
        self.exchanges: set[str] = set()

    async def __aenter__(self) -> Admin:
        self.conn = await aiormq.connect(self.url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.cleanup()
        if self.conn is not None:
            await self.conn.close()

    async def channel(self) -> AbstractChannel:
        assert self.conn is not None
        return await self.conn.channel()

    def track(self, cnf: Config, *queues: str) -> None:
        """Delete these at the end (with the config's default, dead-letter and index queues)."""
        q = cnf.default_queue
        self.queues.update({q, f"{q}.dead_letters", f"{q}.delay_index", *queues})
        self.exchanges.add(cnf.amqp.exchange)

    async def exists(self, queue: str) -> bool:
        ch = await self.channel()
        try:
            await ch.queue_declare(queue, passive=True)
            return True
        except amqp_exc.ChannelNotFoundEntity:
            return False
        finally:
            if not ch.is_closed:
                await ch.close()

    async def count(self, queue: str) -> int:
        ch = await self.channel()
        try:
            ok = await ch.queue_declare(queue, passive=True)
            return int(ok.message_count or 0)
        finally:
            if not ch.is_closed:
                await ch.close()

    async def peek(self, queue: str) -> list[DeliveredMessage]:
        """Messages of a queue without consuming them (get, then close the channel)."""
        ch = await self.channel()
        try:
            out = []
            while True:
                msg = await ch.basic_get(queue, no_ack=False)
                if isinstance(msg.delivery, spec.Basic.GetEmpty):
                    return out
                out.append(msg)
        finally:
            await ch.close()

    async def declare(self, queue: str, **kw: Any) -> spec.Queue.DeclareOk:
        ch = await self.channel()
        try:
            return await ch.queue_declare(queue, **kw)
        finally:
            if not ch.is_closed:
                await ch.close()

    async def publish(self, exchange: str, routing_key: str, body: bytes, **props: Any) -> None:
        ch = await self.channel()
        try:
            await ch.basic_publish(body, exchange=exchange, routing_key=routing_key,
                                   properties=spec.Basic.Properties(**props))
        finally:
            await ch.close()

    async def cleanup(self) -> None:
        if self.conn is None or self.conn.is_closed:
            return
        ch = await self.channel()
        for q in sorted(self.queues):
            await ch.queue_delete(q)
        for x in sorted(self.exchanges):
            await ch.exchange_delete(x)
        await ch.close()


class PrivateRabbit:
    """A RabbitMQ node of our own on free ports, for tests that stop and start the broker."""

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="machinery-rabbit-"))
        self.port = free_port()
        self.name = f"mtest{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        conf = f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        self.tls_url = ""
        if shutil.which("openssl"):  # a TLS listener too, with a throwaway CA
            self.tls_port = free_port()
            self.tls_url = f"amqps://guest:guest@localhost:{self.tls_port}/"
            self._make_certs()
            conf += (
                f"listeners.ssl.default = 127.0.0.1:{self.tls_port}\n"
                f"ssl_options.cacertfile = {self.dir / 'ca.pem'}\n"
                f"ssl_options.certfile = {self.dir / 'server.pem'}\n"
                f"ssl_options.keyfile = {self.dir / 'server.key'}\n"
                "ssl_options.verify = verify_none\nssl_options.fail_if_no_peer_cert = false\n"
            )
        (self.dir / "rabbitmq.conf").write_text(conf)
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "env.conf").write_text("")
        self.env = {
            **os.environ,
            "HOME": str(self.dir),
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.dir / "env.conf"),
            "RABBITMQ_PID_FILE": str(self.dir / "pid"),
        }

    def _make_certs(self) -> None:
        d = self.dir
        (d / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        for cmd in (
            f"req -x509 -newkey rsa:2048 -nodes -keyout {d}/ca.key -out {d}/ca.pem -days 2 -subj /CN=test-ca",
            f"req -newkey rsa:2048 -nodes -keyout {d}/server.key -out {d}/server.csr -subj /CN=localhost",
            f"x509 -req -in {d}/server.csr -CA {d}/ca.pem -CAkey {d}/ca.key -CAcreateserial "
            f"-out {d}/server.pem -days 2 -extfile {d}/san.ext",
        ):
            subprocess.run(["openssl", *cmd.split()], check=True, capture_output=True, timeout=60)
        for name in ("server.key", "server.pem", "ca.pem"):
            (d / name).chmod(0o644)

    def client_tls(self) -> ssl.SSLContext:
        """A client context that trusts this node's throwaway CA."""
        return ssl.create_default_context(cafile=str(self.dir / "ca.pem"))

    @staticmethod
    def available() -> bool:
        return (RABBIT_BIN / "rabbitmq-server").exists() and (RABBIT_BIN / "rabbitmqctl").exists()

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(RABBIT_BIN / "rabbitmqctl"), "-n", self.name, "-q", *args], env=self.env,
                              capture_output=True, text=True, timeout=timeout, check=False)

    def start(self, timeout: float = 60) -> None:
        subprocess.run([str(RABBIT_BIN / "rabbitmq-server"), "-detached"], env=self.env, check=True,
                       capture_output=True, timeout=30)
        deadline = time.monotonic() + timeout
        while True:
            res = self.ctl("await_startup", "--timeout", "30")
            if res.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"private RabbitMQ did not start: {res.stdout} {res.stderr}")
            time.sleep(0.5)

    def stop_app(self) -> None:
        res = self.ctl("stop_app")
        assert res.returncode == 0, res.stderr

    def start_app(self) -> None:
        res = self.ctl("start_app")
        assert res.returncode == 0, res.stderr

    def stop(self) -> None:
        self.ctl("stop", timeout=60)
        shutil.rmtree(self.dir, ignore_errors=True)


def private_rabbit_node() -> Iterator[PrivateRabbit]:
    """A private RabbitMQ node for a module's tests (use as `pytest.fixture(scope="module")(...)`):
    unavailable (a skip, or a failure with CI=true) when it cannot be installed or started."""
    if not PrivateRabbit.available():
        unavailable("rabbitmq-server is not installed: cannot start a private RabbitMQ node")
    node = PrivateRabbit()
    try:
        node.start()
    except Exception as exc:
        node.stop()
        unavailable(f"could not start a private RabbitMQ node: {exc}")
    yield node
    node.stop()
