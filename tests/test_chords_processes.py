"""Hundreds of chords over two worker processes on Redis and on AMQP: each callback fires exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from machinery import Config
from machinery.config import AMQPConfig
from naming import unique
from redis_servers import redis_url
from test_cli import env_for
from workflow_load import chords_fire_exactly_once


def _env(tmp_path: Path, broker: str, backend: str, log: Path) -> dict[str, str]:
    """The workers' config: this session's names for the queue, and for the exchange on RabbitMQ."""
    env = env_for(tmp_path / "unused.sqlite3", MACHINERY_TEST_LOG=str(log))
    env.update({"BROKER": broker, "RESULT_BACKEND": backend, "DEFAULT_QUEUE": unique("chords_"),
                "AMQP_EXCHANGE": unique("chords_exchange_"), "AMQP_BINDING_KEY": unique("chords_task_")})
    return env


def test_redis_chords_fire_exactly_once(tmp_path: Path) -> None:
    url = redis_url(12)
    log = tmp_path / "fired.log"
    env = _env(tmp_path, url, url, log)
    chords_fire_exactly_once(Config(broker=url, result_backend=url, default_queue=env["DEFAULT_QUEUE"]), env, log)


def test_amqp_redis_chords_fire_exactly_once(tmp_path: Path) -> None:
    from amqp_support import AMQP_URL, require_rabbit

    asyncio.run(require_rabbit())
    url = redis_url(12)
    log = tmp_path / "fired.log"
    env = _env(tmp_path, AMQP_URL, url, log)
    cnf = Config(broker=AMQP_URL, result_backend=url, default_queue=env["DEFAULT_QUEUE"],
                 amqp=AMQPConfig(exchange=env["AMQP_EXCHANGE"], binding_key=env["AMQP_BINDING_KEY"]))
    try:
        chords_fire_exactly_once(cnf, env, log, chords=100)
    finally:
        asyncio.run(_delete_amqp(cnf))


async def _delete_amqp(cnf: Config) -> None:
    from amqp_support import AMQP_URL, Admin

    async with Admin(AMQP_URL) as admin:
        admin.track(cnf)


def test_forked_redis_workers_run_each_task_once(tmp_path: Path) -> None:
    """`--processes 2` builds the app before forking: each child must still be its own consumer
    (its own landing list), or a message one child BLMOVEd is run by both."""
    import signal
    import subprocess

    import redis

    from machinery import Chain, Server, Signature
    from workflow_load import CLI

    url = redis_url(12)
    log = tmp_path / "runs.log"
    env = _env(tmp_path, url, url, log)
    workers = subprocess.Popen([*CLI, "worker", "--app", "apps.envapp:server", "--processes", "2"], env=env)
    server = Server(Config(broker=url, result_backend=url, default_queue=env["DEFAULT_QUEUE"]))
    try:
        for i in range(0, 60, 3):  # small bursts into an empty queue: both children land one by BLMOVE
            results = server.send_tasks([Signature("sleepy", [0, i + k]) for k in range(3)])
            assert [r.get(timeout=30) for r in results] == [i, i + 1, i + 2]
        links = [Signature("sleepy", [0, 100 + i], immutable=True) for i in range(30)]
        assert server.send_chain(Chain(*links)).get(timeout=60) == 129
    finally:
        server.close()
        workers.send_signal(signal.SIGTERM)
        workers.wait(timeout=60)
    # The workers are gone and nothing is left queued, claimed or landed: no duplicate can still run.
    queue = env["DEFAULT_QUEUE"]
    probe = redis.Redis.from_url(url)
    try:
        assert probe.llen(queue) == 0 and probe.hlen(f"{{{queue}}}:machinery:inflight") == 0
        assert [k for k in probe.scan_iter(match=f"{{{queue}}}:machinery:landing:*") if probe.llen(k)] == []
    finally:
        probe.close()
    tags = sorted(int(line.split()[0]) for line in log.read_text().splitlines())
    assert tags == [*range(60), *range(100, 130)]
