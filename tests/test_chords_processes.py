"""Hundreds of chords over two worker processes on Redis and on AMQP: each callback fires exactly once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from machinery import Config
from naming import unique
from redis_servers import require_redis
from test_cli import env_for
from workflow_load import chords_fire_exactly_once


def _env(tmp_path: Path, broker: str, backend: str, log: Path) -> dict[str, str]:
    env = env_for(tmp_path / "unused.sqlite3", MACHINERY_TEST_LOG=str(log))
    env.update({"BROKER": broker, "RESULT_BACKEND": backend, "DEFAULT_QUEUE": unique("chords_")})
    return env


URL = "redis://127.0.0.1:6379/12"


def test_redis_chords_fire_exactly_once(tmp_path: Path) -> None:
    require_redis(URL)
    url = URL
    log = tmp_path / "fired.log"
    env = _env(tmp_path, url, url, log)
    chords_fire_exactly_once(Config(broker=url, result_backend=url, default_queue=env["DEFAULT_QUEUE"]), env, log)


def test_amqp_redis_chords_fire_exactly_once(tmp_path: Path) -> None:
    from amqp_support import AMQP_URL, require_rabbit

    asyncio.run(require_rabbit())
    require_redis(URL)
    url = URL
    log = tmp_path / "fired.log"
    env = _env(tmp_path, AMQP_URL, url, log)
    cnf = Config(broker=AMQP_URL, result_backend=url, default_queue=env["DEFAULT_QUEUE"])
    chords_fire_exactly_once(cnf, env, log, chords=100)
