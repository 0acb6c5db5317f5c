"""The less common ways to reach Redis, each against a real private server: a unix socket with a
password, TLS (rediss:// really encrypts; cnf.tls is used as given) and Sentinel."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import threading
from pathlib import Path

import pytest

from machinery import Server
from machinery.config import Config, RedisConfig
from machinery.drivers.redis.backend import RedisBackend
from machinery.drivers.redis.broker import RedisBroker
from machinery.errors import BrokerError
from machinery.tasks.signature import Signature, encode_signature
from machinery.tasks.state import SUCCESS, TaskResult, TaskState
from redis_servers import PrivateRedis, free_port, redis_url, require_binary

pytestmark = pytest.mark.redis


async def round_trip(cnf: Config) -> None:
    """Publish, fetch, ack, store and read a state through the given config."""
    broker, backend = RedisBroker(cnf), RedisBackend(cnf)
    try:
        sig = Signature("add", [1, 2], uuid="task_conn", routing_key="machinery_tasks")
        body = encode_signature(sig)
        await broker.publish(sig, body, None)
        got = await broker.fetch("machinery_tasks", 10, 2.0)
        assert [d.body for d in got] == [body]
        await broker.ack(got)
        await backend.set_state(TaskState("task_conn", SUCCESS, task_name="add", results=[TaskResult("int64", 3)]))
        state = await backend.wait_completed("task_conn", 2.0)
        assert state is not None and state.values() == [3]
    finally:
        await broker.close()
        await backend.close()


def blocking_round_trip(cnf: Config) -> None:
    """The sync facade's direct calls (a blocking client) through the given config."""
    server = Server(cnf)
    try:
        res = server.send_task(Signature("add", [1, 2], uuid="task_sync"))
        stored = TaskState("task_sync", SUCCESS, task_name="add", results=[TaskResult("int64", 3)])
        store = threading.Timer(0.1, lambda: server.portal.run(server.get_backend().set_state(stored)))
        store.start()
        assert res.get(timeout=5) == 3
        store.join()
        assert b"task_sync" in server.portal.run(server.get_broker().pending("machinery_tasks"))[-1]
    finally:
        server.close()


async def test_unix_socket_with_password_and_db(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    server = PrivateRedis(tmp_path / "data", "--unixsocket", str(sock), "--unixsocketperm", "700",
                          "--requirepass", "s3cret", password="s3cret").start()
    try:
        url = f"redis+socket://s3cret@{sock}:/2"
        await round_trip(Config(broker=url, result_backend=url))
        await asyncio.to_thread(blocking_round_trip, Config(broker=url, result_backend=url))
        with pytest.raises(BrokerError):
            await RedisBroker(Config(broker=f"redis+socket://wrong@{sock}")).pending("machinery_tasks")
    finally:
        server.kill()


@pytest.fixture
def tls_server(tmp_path: Path) -> tuple[PrivateRedis, int, Path]:
    openssl = require_binary("openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert),
                    "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True)
    tls_port = free_port()
    server = PrivateRedis(tmp_path / "data", "--tls-port", str(tls_port), "--tls-cert-file", str(cert),
                          "--tls-key-file", str(key), "--tls-auth-clients", "no")
    server.start()
    return server, tls_port, cert


async def test_rediss_uses_tls_with_the_configured_context(tls_server: tuple[PrivateRedis, int, Path]) -> None:
    server, port, cert = tls_server
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        tls = ssl.create_default_context(cafile=str(cert))
        await round_trip(Config(broker=url, result_backend=url, tls=tls))
        await asyncio.to_thread(blocking_round_trip, Config(broker=url, result_backend=url, tls=tls))
        # TLS is really on: the default context refuses the self-signed certificate ...
        with pytest.raises(BrokerError):
            await RedisBroker(Config(broker=url)).pending("machinery_tasks")
        # ... and plain redis:// cannot talk to the TLS port.
        plain = RedisBroker(Config(broker=f"redis://127.0.0.1:{port}/0",
                                   redis=RedisConfig(read_timeout=1, connect_timeout=1)))
        with pytest.raises(BrokerError):
            await asyncio.wait_for(plain.pending("machinery_tasks"), 20)
    finally:
        server.kill()


async def test_sentinel_finds_the_master(tmp_path: Path) -> None:
    master = PrivateRedis(tmp_path / "master", "--requirepass", "mpw", password="mpw").start()
    sentinel_conf = (
        f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        "sentinel auth-pass mymaster mpw\n"
        "sentinel down-after-milliseconds mymaster 5000\n"
        "requirepass spw\n"
    )
    sentinel = PrivateRedis(tmp_path / "sentinel", "--sentinel", config=sentinel_conf, password="spw").start()
    try:
        url = f"redis://mpw@127.0.0.1:{sentinel.port}/3"
        redis_cnf = RedisConfig(master_name="mymaster", sentinel_password="spw")
        await round_trip(Config(broker=url, result_backend=url, redis=redis_cnf))
        import redis

        direct = redis.Redis(port=master.port, db=3, password="mpw")
        assert direct.exists("task_conn")  # the state went to the master the sentinel named
        direct.close()
    finally:
        sentinel.kill()
        master.kill()


async def test_scripts_reload_after_the_server_forgets_them(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "data").start()
    try:
        cnf = Config(broker=server.url, result_backend=server.url)
        broker, backend = RedisBroker(cnf), RedisBackend(cnf)
        for queue in ("q1", "q2"):
            sig = Signature("add", [1], routing_key=queue)
            await broker.publish(sig, encode_signature(sig), None)
        got = await broker.fetch("q1", 10, 1.0) + await broker.fetch("q2", 10, 1.0)
        client = await broker._client()
        await client.script_flush()  # as after a restart or a failover
        await broker.ack(got)  # two script calls in one pipeline: NOSCRIPT, load, run again
        await backend.set_states([TaskState(f"task_{i}", SUCCESS) for i in range(3)])
        assert await broker.inflight("q1") == [] and await broker.inflight("q2") == []
        assert len(await client.keys("task_*")) == 3
        await broker.close()
        await backend.close()
    finally:
        server.kill()


async def test_a_write_to_a_stalled_server_times_out(tmp_path: Path) -> None:
    """Writes are bounded by read_timeout (our timer in place of redis-py's wait_for): a server
    that stops reading makes a large write fail with the driver's error, not hang."""
    import os
    import signal
    import time

    from machinery.errors import BackendError

    server = PrivateRedis(tmp_path / "data").start()
    cnf = Config(broker=server.url, result_backend=server.url, redis=RedisConfig(read_timeout=1))
    backend = RedisBackend(cnf)
    try:
        await backend.set_state(TaskState("task_w", SUCCESS, task_name="add"))  # connected and working
        assert server.proc is not None
        os.kill(server.proc.pid, signal.SIGSTOP)
        big = TaskState("task_w", SUCCESS, task_name="add", results=[TaskResult("string", "x" * 64_000_000)])
        started = time.monotonic()
        with pytest.raises(BackendError, match=r"(?i)timeout"):
            await backend.set_state(big)
        assert time.monotonic() - started < 20  # bounded: the client's retries, each within 1 s
    finally:
        if server.proc is not None:
            os.kill(server.proc.pid, signal.SIGCONT)
        await backend.close()
        server.kill()


async def test_tls_without_redis_py_s_hooks_falls_back_to_ssl_options(
        tls_server: tuple[PrivateRedis, int, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """Where a redis-py release has neither hook that takes an SSLContext as it is, its CAs and
    verification settings go over as ssl_* options: the self-signed server is still verified."""
    from machinery.drivers.redis import internals

    monkeypatch.setattr(internals, "async_context_hook", lambda: False)
    monkeypatch.setattr(internals, "blocking_wrap_hook", lambda: False)
    server, port, cert = tls_server
    try:
        url = f"rediss://127.0.0.1:{port}/0"
        tls = ssl.create_default_context(cafile=str(cert))
        assert internals.async_tls_class(tls)[1]["ssl_ca_data"].startswith("-----BEGIN CERTIFICATE-----")
        await round_trip(Config(broker=url, result_backend=url, tls=tls))
        await asyncio.to_thread(blocking_round_trip, Config(broker=url, result_backend=url, tls=tls))
        with pytest.raises(BrokerError):  # still verified: the default context refuses the certificate
            await RedisBroker(Config(broker=url)).pending("machinery_tasks")
    finally:
        server.kill()


async def test_without_the_hiredis_serializer_commands_pack_as_redis_py_packs_them(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import redis.connection

    from machinery.drivers.redis import internals

    url = redis_url(9)  # a database of its own; started (and pinged) before the class goes
    import redis as redis_py

    client = redis_py.Redis.from_url(url)
    client.flushdb()
    client.close()
    monkeypatch.delattr(redis.connection, "HiredisRespSerializer")
    assert internals.hiredis_serializer() is None
    await round_trip(Config(broker=url, result_backend=url))


def test_socket_helpers_do_without_the_socket_attribute() -> None:
    from machinery.drivers.redis import internals

    class Bare:
        pass

    assert internals.is_connected(Bare()) is True
    internals.restore_socket_timeout(Bare(), 1.0)  # nothing to set, nothing raised
