"""RedisLock: the shared Lock contract suite on Redis (db 11 of this run's own server), plus Go
compatibility and URL handling.

With CI=true a Redis that cannot be started or reached fails instead of skipping.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from contract.conftest import Driver, DriverEnv, DriverSpec
from contract.test_lock_contract import (  # noqa: F401 - collected here against the Redis lock
    test_acquire_free_key_then_held,
    test_expired_lock_can_be_taken_again,
    test_held_key_is_refused_to_another_client,
    test_keys_are_independent,
    test_one_winner_under_concurrency,
    test_release_frees_the_key,
)
from machinery.config import Config
from machinery.drivers.lock import Lock
from machinery.drivers.registry import make_lock
from machinery.errors import BackendError, ConfigError
from redis_servers import redis_url

DB = 11

pytestmark = pytest.mark.redis


@pytest.fixture(autouse=True)
def url() -> str:
    """Database DB of this run's Redis (started on first use; none: skip, or fail with CI=true)."""
    return redis_url(DB)


@asynccontextmanager
async def _redis_lock(env: DriverEnv) -> AsyncIterator[Lock]:
    from machinery.drivers.redis.lock import RedisLock

    lock = RedisLock(env.cnf, redis_url(DB))
    try:
        yield lock
    finally:
        await lock.close()


@pytest.fixture
async def lock_driver(tmp_path: Path) -> AsyncIterator[Driver[Lock]]:
    driver: Driver[Lock] = Driver("redis", DriverSpec(_redis_lock), tmp_path)
    yield driver
    await driver.aclose()


@pytest.fixture
async def lock(lock_driver: Driver[Lock]) -> Lock:
    return await lock_driver.open()


@pytest.fixture
def raw(url: str) -> Iterator[object]:
    import redis

    client = redis.Redis.from_url(url)
    yield client
    client.close()


def _key() -> str:
    return f"rlock_{uuid.uuid4().hex}"


def _cnf(**kw: str) -> Config:
    return Config(broker="memory", result_backend=kw.get("result_backend", "memory"), lock=kw.get("lock", ""))


async def test_value_and_ttl_are_gos(lock: Lock, raw: object) -> None:
    """Go stores the expiry in Unix ns as the value, with a PX that ends at that moment."""
    import redis

    assert isinstance(raw, redis.Redis)
    k = _key()
    expires = time.time_ns() + 5_000_000_000
    assert await lock.acquire(k, expires)
    assert raw.get(k) == str(expires).encode()
    assert 4000 < int(raw.pttl(k)) <= 5001
    raw.delete(k)


async def test_stale_key_without_ttl_is_taken(lock: Lock, raw: object) -> None:
    """Go's GETSET fallback: a key whose stored expiry has passed is free even if Redis still has it."""
    import redis

    assert isinstance(raw, redis.Redis)
    k = _key()
    raw.set(k, str(time.time_ns() - 1))  # no TTL at all
    assert await lock.acquire(k, time.time_ns() + 5_000_000_000)
    assert int(raw.pttl(k)) > 0
    raw.set(k, str(time.time_ns() + 60_000_000_000))  # a live Go holder
    assert not await lock.acquire(k, time.time_ns() + 5_000_000_000)
    raw.set(k, "not-a-number")  # someone else's key: never stolen
    assert not await lock.acquire(k, time.time_ns() + 5_000_000_000)
    raw.delete(k)


async def test_db_is_honoured(lock: Lock, url: str) -> None:
    import redis

    k = _key()
    assert await lock.acquire(k, time.time_ns() + 5_000_000_000)
    in_db = redis.Redis.from_url(url)
    in_zero = redis.Redis.from_url(redis_url(0))
    try:
        assert in_db.exists(k) == 1
        assert in_zero.exists(k) == 0
        in_db.delete(k)
    finally:
        in_db.close()
        in_zero.close()


async def test_username_is_sent(url: str) -> None:
    from machinery.drivers.redis.lock import RedisLock

    lock = RedisLock(_cnf(), url.replace("redis://", f"redis://nobody-{uuid.uuid4().hex[:6]}:secret@"))
    try:
        with pytest.raises(BackendError, match="redis lock"):
            await lock.acquire(_key(), time.time_ns() + 1_000_000_000)
    finally:
        await lock.close()


def test_bad_url_names_the_field() -> None:
    from machinery.drivers.redis.lock import RedisLock

    with pytest.raises(ConfigError, match=r"config field lock: port must be 1\.\.65535"):
        RedisLock(_cnf(), "redis://127.0.0.1:notaport")
    with pytest.raises(ConfigError, match="config field lock: the database must be a number"):
        RedisLock(_cnf(), "redis://127.0.0.1:6379/x")


async def test_rediss_uses_tls() -> None:
    from redis.asyncio.connection import SSLConnection

    from machinery.drivers.redis.lock import RedisLock

    lock = RedisLock(_cnf(), "rediss://secret@127.0.0.1:6380/3")
    assert lock.target.tls and lock.target.db == 3 and lock.target.password == "secret"
    client = lock._client()
    assert issubclass(client.connection_pool.connection_class, SSLConnection)
    await lock.close()


def test_make_lock_picks_redis(url: str) -> None:
    from machinery.drivers.redis.lock import RedisLock

    assert isinstance(make_lock(_cnf(lock=url)), RedisLock)
    assert isinstance(make_lock(_cnf(result_backend=url)), RedisLock)  # the backend's store
