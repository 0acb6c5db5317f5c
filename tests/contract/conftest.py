"""Driver factories for the contract suites: every broker, backend and lock runs the same tests.

HOW TO ADD A DRIVER: write an async context manager factory `(env: DriverEnv) -> client` and add
one entry to BROKER_DRIVERS / BACKEND_DRIVERS / LOCK_DRIVERS, e.g.

    @asynccontextmanager
    async def _redis_broker(env: DriverEnv) -> AsyncIterator[Broker]:
        url = await asyncio.to_thread(redis_url, 14)          # this run's server; none: skip, FAIL on CI
        from machinery.drivers.redis.broker import RedisBroker
        cnf = env.cnf                                         # isolate keys with env.namespace
        cnf.redis.delayed_tasks_key = f"delayed_tasks_{env.namespace}"
        broker = RedisBroker(cnf, url)
        try:
            yield broker
        finally:
            ...  # delete this test's keys
            await broker.close()

    BROKER_DRIVERS["redis"] = DriverSpec(_redis_broker, marks=(pytest.mark.redis,))

then list the capabilities it declares in declared.py: the capability suites run on it from there.

Rules for a factory: calling it several times with the same `env` must give independent clients of
the SAME store (tests use that for "another process/client"); honour `env.lease_seconds` when the
broker has leases; keep keys/queues of different tests apart with `env.namespace`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar

import pytest

from machinery.config import Config, SQLiteConfig
from machinery.drivers.backend import Backend
from machinery.drivers.broker import Broker
from machinery.drivers.lock import Lock
from machinery.drivers.memory.backend import MemoryBackend
from machinery.drivers.memory.broker import MemoryBroker
from machinery.drivers.memory.lock import MemoryLock
from naming import unique

T = TypeVar("T")


class DriverUnavailable(Exception):
    """Raised by a factory whose server cannot be reached."""


@dataclass
class DriverEnv:
    """What a factory gets: one per test, shared by every client that test opens."""

    cnf: Config
    tmp_path: Path
    namespace: str  # unique per test: prefix keys, queues, tables on shared servers with it
    lease_seconds: float | None = None  # requested lease for leased brokers; None = driver default
    shared: dict[str, Any] = field(default_factory=dict)  # in-process drivers keep their one store here


@dataclass(frozen=True)
class DriverSpec(Generic[T]):
    factory: Callable[[DriverEnv], AbstractAsyncContextManager[T]]
    marks: tuple[pytest.MarkDecorator, ...] = ()
    #: documented deviations a contract test adapts to explicitly (never a silent skip), e.g.
    #: "push_consumer": deliveries are pushed to live consumers, so a requeued message may go back to
    #: the client that requeued it rather than to another one (RabbitMQ round-robin).
    #: "no_listing": pending() cannot list messages without receiving them and always returns []
    #: (SQS); the tests expect [] there and check the messages by fetching them instead. (Listing
    #: delayed messages is a capability, DelayedListing: see declared.py.)
    #: "no_state_merge": a later state is stored as given, so one without a CreatedAt reads back
    #: without one instead of keeping PENDING's (AMQP: each state is a message in the task's queue).
    #: "no_pending_fill": set_pending leaves a state the worker stored first exactly as it is, so that
    #: state has no CreatedAt (Redis: SET NX).
    caps: frozenset[str] = frozenset()


async def require_tcp(host: str, port: int, what: str, timeout: float = 2.0) -> None:
    """Raise DriverUnavailable unless something accepts TCP connections on host:port."""
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, TimeoutError) as exc:
        raise DriverUnavailable(f"{what} is not reachable on {host}:{port}: {exc}") from None
    writer.close()
    await writer.wait_closed()


def _sqlite_url(env: DriverEnv) -> str:
    return f"sqlite:///{env.tmp_path / 'contract.sqlite3'}"


def _sqlite_cnf(env: DriverEnv) -> Config:
    if env.lease_seconds is not None:
        env.cnf.sqlite = SQLiteConfig(
            lease_seconds=env.lease_seconds,
            poll_interval_ms=env.cnf.sqlite.poll_interval_ms,
            busy_timeout_ms=env.cnf.sqlite.busy_timeout_ms,
        )
    return env.cnf


# --- brokers ---------------------------------------------------------------------------------


@asynccontextmanager
async def _memory_broker(env: DriverEnv) -> AsyncIterator[Broker]:
    yield env.shared.setdefault("broker", MemoryBroker(env.cnf))


@asynccontextmanager
async def _sqlite_broker(env: DriverEnv) -> AsyncIterator[Broker]:
    from machinery.drivers.sqlite.broker import SQLiteBroker

    broker = SQLiteBroker(_sqlite_cnf(env), _sqlite_url(env))
    try:
        yield broker
    finally:
        await broker.close()


@asynccontextmanager
async def _amqp_broker(env: DriverEnv) -> AsyncIterator[Broker]:
    from amqp_support import AMQP_URL, Admin
    from machinery.drivers.amqp.broker import AMQPBroker

    await require_tcp("127.0.0.1", 5672, "RabbitMQ")
    cnf = _amqp_cnf(env)
    broker = AMQPBroker(cnf, AMQP_URL)
    env.shared["amqp_broker_clients"] = env.shared.get("amqp_broker_clients", 0) + 1
    try:
        yield broker
    finally:
        await broker.close()
        env.shared["amqp_broker_clients"] -= 1
        if env.shared["amqp_broker_clients"] == 0:  # the last client out deletes the test's queues
            async with Admin(AMQP_URL) as admin:
                admin.track(cnf, f"{env.namespace}_other")


def _amqp_cnf(env: DriverEnv) -> Config:
    from machinery.config import AMQPConfig

    if env.cnf.amqp.exchange == "machinery_exchange":
        env.cnf.amqp = AMQPConfig(exchange=f"{env.namespace}_exchange", binding_key=f"{env.namespace}_task")
    return env.cnf


# --- backends --------------------------------------------------------------------------------


@asynccontextmanager
async def _memory_backend(env: DriverEnv) -> AsyncIterator[Backend]:
    yield env.shared.setdefault("backend", MemoryBackend(env.cnf))


@asynccontextmanager
async def _sqlite_backend(env: DriverEnv) -> AsyncIterator[Backend]:
    from machinery.drivers.sqlite.backend import SQLiteBackend

    backend = SQLiteBackend(_sqlite_cnf(env), _sqlite_url(env))
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def _amqp_backend(env: DriverEnv) -> AsyncIterator[Backend]:
    from amqp_support import AMQP_URL, Admin
    from machinery.drivers.amqp.backend import AMQPBackend

    await require_tcp("127.0.0.1", 5672, "RabbitMQ")
    backend = AMQPBackend(_amqp_cnf(env), AMQP_URL)
    env.shared["amqp_backend_clients"] = env.shared.get("amqp_backend_clients", 0) + 1
    try:
        yield backend
    finally:
        await backend.close()
        env.shared["amqp_backend_clients"] -= 1
        if env.shared["amqp_backend_clients"] == 0:  # state queues expire; the exchange is ours
            async with Admin(AMQP_URL) as admin:
                admin.exchanges.add(env.cnf.amqp.exchange)


# --- locks -----------------------------------------------------------------------------------


@asynccontextmanager
async def _memory_lock(env: DriverEnv) -> AsyncIterator[Lock]:
    yield env.shared.setdefault("lock", MemoryLock(env.cnf))


@asynccontextmanager
async def _sqlite_lock(env: DriverEnv) -> AsyncIterator[Lock]:
    from machinery.drivers.sqlite.lock import SQLiteLock

    lock = SQLiteLock(_sqlite_cnf(env), _sqlite_url(env))
    try:
        yield lock
    finally:
        await lock.close()


# --- redis (db 14 of this run's own server, and a private 3-master cluster) -------------------

REDIS_CONTRACT_DB = 14


async def _redis_url(env: DriverEnv, cluster: bool) -> str:
    if cluster:
        from redis_servers import shared_cluster

        try:
            return (await asyncio.to_thread(shared_cluster)).url
        except (OSError, RuntimeError) as exc:
            raise DriverUnavailable(f"cannot start a private Redis Cluster: {exc}") from None
    from redis_servers import redis_url

    return await asyncio.to_thread(redis_url, REDIS_CONTRACT_DB)


async def _redis_cleanup(env: DriverEnv, url: str) -> None:
    """Delete this test's keys (every key the drivers make for it carries env.namespace)."""
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(url)
    try:
        names = [k async for k in client.scan_iter(match=f"*{env.namespace}*", count=1000)]
        if names:
            await client.delete(*names)
    finally:
        await client.aclose()


def _redis_broker(cluster: bool) -> Callable[[DriverEnv], AbstractAsyncContextManager[Broker]]:
    @asynccontextmanager
    async def factory(env: DriverEnv) -> AsyncIterator[Broker]:
        from machinery.drivers.redis.broker import RedisBroker

        url = await _redis_url(env, cluster)
        env.cnf.redis.delayed_tasks_key = f"delayed_tasks_{env.namespace}"
        broker = RedisBroker(env.cnf, url)
        broker.dead_letter_key = f"{env.namespace}:dead_letters"
        if env.lease_seconds is not None:
            broker.lease_seconds = env.lease_seconds
        owner = env.shared.setdefault("redis_broker_owner", broker) is broker
        try:
            yield broker
        finally:
            await broker.close()
            if owner and not cluster:
                await _redis_cleanup(env, url)

    return factory


def _redis_backend(cluster: bool) -> Callable[[DriverEnv], AbstractAsyncContextManager[Backend]]:
    @asynccontextmanager
    async def factory(env: DriverEnv) -> AsyncIterator[Backend]:
        from machinery.drivers.redis.backend import RedisBackend

        backend = RedisBackend(env.cnf, await _redis_url(env, cluster))
        try:
            yield backend  # task and group keys are random UUIDs that expire with the results
        finally:
            await backend.close()

    return factory


# --- sqs (the run's moto server) ---------------------------------------------------------------


@asynccontextmanager
async def _sqs_broker(env: DriverEnv) -> AsyncIterator[Broker]:
    """Queues are named after env.namespace (created on first use); the last client out deletes them."""
    import sqs_support
    from machinery.config import SQSConfig
    from machinery.drivers.sqs.broker import SQSBroker

    url = await asyncio.to_thread(sqs_support.broker_url)
    if env.cnf.sqs.client is None:
        env.cnf.sqs = SQSConfig(client=sqs_support.session())
    broker = SQSBroker(env.cnf, url)
    if env.lease_seconds is not None:
        broker.lease_seconds = env.lease_seconds
    env.shared["sqs_clients"] = env.shared.get("sqs_clients", 0) + 1
    try:
        yield broker
    finally:
        await broker.close()
        env.shared["sqs_clients"] -= 1
        if env.shared["sqs_clients"] == 0:
            await sqs_support.delete_queues(env.namespace)


# --- gcppubsub (the run's Pub/Sub emulator) ------------------------------------------------------


@asynccontextmanager
async def _pubsub_broker(env: DriverEnv) -> AsyncIterator[Broker]:
    """Topics and subscriptions are named after env.namespace; the broker creates them on the emulator
    and the last client out deletes them."""
    import pubsub_emulator
    from machinery.config import GCPPubSubConfig
    from machinery.drivers.gcppubsub.broker import PubSubBroker

    host = await asyncio.to_thread(pubsub_emulator.emulator_host)
    if env.lease_seconds is not None and env.cnf.gcppubsub.lease_seconds != env.lease_seconds:
        env.cnf.gcppubsub = GCPPubSubConfig(lease_seconds=env.lease_seconds)
    broker = PubSubBroker(env.cnf, f"gcppubsub://{pubsub_emulator.PROJECT}/{env.namespace}_sub")
    env.shared["pubsub_clients"] = env.shared.get("pubsub_clients", 0) + 1
    try:
        yield broker
    finally:
        await broker.close()
        env.shared["pubsub_clients"] -= 1
        if env.shared["pubsub_clients"] == 0:
            await asyncio.to_thread(pubsub_emulator.delete_resources, host, pubsub_emulator.PROJECT, env.namespace)


# --- memcache (two private memcached servers) and dynamodb (the run's serial moto server) -------


@asynccontextmanager
async def _memcache_backend(env: DriverEnv) -> AsyncIterator[Backend]:
    """Two servers, so every test also spreads keys across hosts; keys are random UUIDs that expire."""
    from machinery.drivers.memcache.backend import MemcacheBackend
    from memcached_servers import memcache_url

    backend = MemcacheBackend(env.cnf, await asyncio.to_thread(memcache_url, 2))
    try:
        yield backend
    finally:
        await backend.close()


@asynccontextmanager
async def _dynamodb_backend(env: DriverEnv) -> AsyncIterator[Backend]:
    """Tables named after env.namespace: the first client creates them, the last one out drops them."""
    from dynamodb_support import backend_url, delete_tables, dynamodb_config
    from machinery.drivers.dynamodb.backend import DynamoDBBackend

    url = await asyncio.to_thread(backend_url)
    if env.cnf.dynamodb.client is None:
        env.cnf.dynamodb = dynamodb_config(env.namespace)
    backend = DynamoDBBackend(env.cnf, url)
    env.shared["dynamodb_clients"] = env.shared.get("dynamodb_clients", 0) + 1
    try:
        if not env.shared.get("dynamodb_tables"):
            await backend.create_tables()
            env.shared["dynamodb_tables"] = True
        yield backend
    finally:
        await backend.close()
        env.shared["dynamodb_clients"] -= 1
        if env.shared["dynamodb_clients"] == 0:
            await delete_tables(env.cnf)



# --- mongodb (the run's SecantusDB server) ---------------------------------------------------------


@asynccontextmanager
async def _mongodb_backend(env: DriverEnv) -> AsyncIterator[Backend]:
    """A database named after env.namespace; the last client out drops it."""
    from machinery.config import MongoDBConfig
    from machinery.drivers.mongodb.backend import MongoBackend
    from mongo_server import mongo_url

    url = await asyncio.to_thread(mongo_url)
    if env.cnf.mongodb.database != env.namespace:
        env.cnf.mongodb = MongoDBConfig(database=env.namespace)
    backend = MongoBackend(env.cnf, url)
    env.shared["mongodb_clients"] = env.shared.get("mongodb_clients", 0) + 1
    try:
        yield backend
    finally:
        await backend.close()
        env.shared["mongodb_clients"] -= 1
        if env.shared["mongodb_clients"] == 0:
            from pymongo import AsyncMongoClient

            client: AsyncMongoClient[dict[str, Any]] = AsyncMongoClient(url)
            try:
                await client.drop_database(env.namespace)
            finally:
                await client.close()


# Add one entry per driver (see the module docstring).
BROKER_DRIVERS: dict[str, DriverSpec[Broker]] = {
    "memory": DriverSpec(_memory_broker),
    "sqlite": DriverSpec(_sqlite_broker),
    "amqp": DriverSpec(_amqp_broker, marks=(pytest.mark.amqp,), caps=frozenset({"push_consumer"})),
    "redis": DriverSpec(_redis_broker(cluster=False), marks=(pytest.mark.redis,)),
    "redis-cluster": DriverSpec(_redis_broker(cluster=True), marks=(pytest.mark.redis,)),
    # SQS can only list messages by receiving them: pending() always returns []
    "sqs": DriverSpec(_sqs_broker, caps=frozenset({"no_listing"})),
    # Pub/Sub cannot list a subscription without receiving: pending() always returns []
    "gcppubsub": DriverSpec(_pubsub_broker, marks=(pytest.mark.gcppubsub,), caps=frozenset({"no_listing"})),
}
BACKEND_DRIVERS: dict[str, DriverSpec[Backend]] = {
    "memory": DriverSpec(_memory_backend),
    "sqlite": DriverSpec(_sqlite_backend),
    "redis": DriverSpec(_redis_backend(cluster=False), marks=(pytest.mark.redis,),
                        caps=frozenset({"no_pending_fill"})),
    "redis-cluster": DriverSpec(_redis_backend(cluster=True), marks=(pytest.mark.redis,),
                                caps=frozenset({"no_pending_fill"})),
    # states are messages: a publish cannot merge with the stored PENDING (Go's AMQP backend neither)
    "amqp": DriverSpec(_amqp_backend, marks=(pytest.mark.amqp,), caps=frozenset({"no_state_merge"})),
    "memcache": DriverSpec(_memcache_backend),
    "dynamodb": DriverSpec(_dynamodb_backend),
    "mongodb": DriverSpec(_mongodb_backend),
}
LOCK_DRIVERS: dict[str, DriverSpec[Lock]] = {
    "memory": DriverSpec(_memory_lock),
    "sqlite": DriverSpec(_sqlite_lock),
}


# --- fixtures --------------------------------------------------------------------------------


class Driver(Generic[T]):
    """One driver under test: `configure()` first if needed, then `open()` as many clients as wanted."""

    def __init__(self, name: str, spec: DriverSpec[T], tmp_path: Path) -> None:
        self.name = name
        self._spec = spec
        self.caps = spec.caps
        namespace = unique("ct_")  # this session's prefix: the end-of-session sweep finds leftovers
        self.env = DriverEnv(
            cnf=Config(broker="memory", result_backend="memory", default_queue=f"{namespace}_default"),
            tmp_path=tmp_path,
            namespace=namespace,
        )
        self._stack = AsyncExitStack()
        self._opened = False

    def configure(self, *, results_expire_in: int | None = None, lease_seconds: float | None = None) -> None:
        """Adjust the config before the first client is opened."""
        assert not self._opened, "configure() must come before the first open()"
        if results_expire_in is not None:
            self.env.cnf.results_expire_in = results_expire_in
        if lease_seconds is not None:
            self.env.lease_seconds = lease_seconds

    async def open(self) -> T:
        """A new client of this test's store (an in-process driver may hand back the same object)."""
        self._opened = True
        try:
            return await self._stack.enter_async_context(self._spec.factory(self.env))
        except DriverUnavailable as exc:
            if os.environ.get("CI", "").lower() == "true":
                pytest.fail(f"{self.name}: {exc} (CI=true: an unreachable server is a failure, not a skip)")
            pytest.skip(f"{self.name}: {exc}")

    async def aclose(self) -> None:
        await self._stack.aclose()


def _params(drivers: dict[str, DriverSpec[Any]]) -> list[Any]:
    return [pytest.param(name, marks=spec.marks, id=name) for name, spec in drivers.items()]


@pytest.fixture(params=_params(BROKER_DRIVERS))
async def broker_driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver[Broker]]:
    driver = Driver(request.param, BROKER_DRIVERS[request.param], tmp_path)
    yield driver
    await driver.aclose()


@pytest.fixture
async def broker(broker_driver: Driver[Broker]) -> Broker:
    return await broker_driver.open()


@pytest.fixture(params=_params(BACKEND_DRIVERS))
async def backend_driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver[Backend]]:
    driver = Driver(request.param, BACKEND_DRIVERS[request.param], tmp_path)
    yield driver
    await driver.aclose()


@pytest.fixture
async def backend(backend_driver: Driver[Backend]) -> Backend:
    return await backend_driver.open()


@pytest.fixture(params=_params(LOCK_DRIVERS))
async def lock_driver(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver[Lock]]:
    driver = Driver(request.param, LOCK_DRIVERS[request.param], tmp_path)
    yield driver
    await driver.aclose()


@pytest.fixture
async def lock(lock_driver: Driver[Lock]) -> Lock:
    return await lock_driver.open()


# --- capability suites: a driver named by the test's parameter (see declared.py) --------------


@pytest.fixture
async def broker_of(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver[Broker]]:
    """The broker driver named by the test's (indirect) `broker_of` parameter."""
    driver = Driver(request.param, BROKER_DRIVERS[request.param], tmp_path)
    yield driver
    await driver.aclose()


@pytest.fixture
async def backend_of(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Driver[Backend]]:
    """The backend driver named by the test's (indirect) `backend_of` parameter."""
    driver = Driver(request.param, BACKEND_DRIVERS[request.param], tmp_path)
    yield driver
    await driver.aclose()


class Pair:
    """A broker driver and a backend driver (or the null backend) under test together."""

    def __init__(self, name: str, broker: str, backend: str, tmp_path: Path) -> None:
        self.name = name
        self.broker_driver = Driver(broker, BROKER_DRIVERS[broker], tmp_path / "broker")
        self.backend_driver = (
            None if backend == "null" else Driver(backend, BACKEND_DRIVERS[backend], tmp_path / "backend"))

    async def open(self) -> tuple[Broker, Backend]:
        from machinery.drivers.memory.null import NullBackend

        self.broker_driver.env.tmp_path.mkdir(exist_ok=True)
        broker = await self.broker_driver.open()
        if self.backend_driver is None:
            return broker, NullBackend(self.broker_driver.env.cnf, "null://")
        self.backend_driver.env.tmp_path.mkdir(exist_ok=True)
        return broker, await self.backend_driver.open()

    async def aclose(self) -> None:
        await self.broker_driver.aclose()
        if self.backend_driver is not None:
            await self.backend_driver.aclose()


@pytest.fixture
async def pair_of(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Pair]:
    """The broker and backend of the pairing named by the test's (indirect) `pair_of` parameter."""
    from .declared import PAIRINGS

    spec = PAIRINGS[request.param]
    pair = Pair(request.param, spec.broker, spec.backend, tmp_path)
    yield pair
    await pair.aclose()
