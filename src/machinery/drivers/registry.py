"""URL scheme -> driver class, imported lazily so that `import machinery` loads no driver."""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from machinery.errors import ConfigError, DriverMissingError, UnknownSchemeError

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.drivers.backend import Backend
    from machinery.drivers.broker import Broker
    from machinery.drivers.capabilities import Pairing
    from machinery.drivers.lock import Lock

Kind = Literal["broker", "backend", "lock"]


@dataclass(frozen=True, slots=True)
class Driver:
    path: str  # "module:Class"
    extra: str  # the pip extra that installs its dependencies ("" for none)
    module_needed: str = ""  # a third-party module whose absence means the extra is missing


_BROKERS: dict[str, Driver] = {
    "memory": Driver("machinery.drivers.memory.broker:MemoryBroker", ""),
    "eager": Driver("machinery.drivers.memory.broker:MemoryBroker", ""),
    "sqlite": Driver("machinery.drivers.sqlite.broker:SQLiteBroker", ""),
    "redis": Driver("machinery.drivers.redis.broker:RedisBroker", "redis", "redis"),
    "rediss": Driver("machinery.drivers.redis.broker:RedisBroker", "redis", "redis"),
    "redis+socket": Driver("machinery.drivers.redis.broker:RedisBroker", "redis", "redis"),
    "amqp": Driver("machinery.drivers.amqp.broker:AMQPBroker", "amqp", "aiormq"),
    "amqps": Driver("machinery.drivers.amqp.broker:AMQPBroker", "amqp", "aiormq"),
    "sqs": Driver("machinery.drivers.sqs.broker:SQSBroker", "sqs", "aiobotocore"),
    "gcppubsub": Driver("machinery.drivers.gcppubsub.broker:PubSubBroker", "gcppubsub", "google.cloud.pubsub_v1"),
}
_BACKENDS: dict[str, Driver] = {
    "memory": Driver("machinery.drivers.memory.backend:MemoryBackend", ""),
    "eager": Driver("machinery.drivers.memory.backend:MemoryBackend", ""),
    "null": Driver("machinery.drivers.memory.null:NullBackend", ""),
    "sqlite": Driver("machinery.drivers.sqlite.backend:SQLiteBackend", ""),
    "redis": Driver("machinery.drivers.redis.backend:RedisBackend", "redis", "redis"),
    "rediss": Driver("machinery.drivers.redis.backend:RedisBackend", "redis", "redis"),
    "redis+socket": Driver("machinery.drivers.redis.backend:RedisBackend", "redis", "redis"),
    "amqp": Driver("machinery.drivers.amqp.backend:AMQPBackend", "amqp", "aiormq"),
    "amqps": Driver("machinery.drivers.amqp.backend:AMQPBackend", "amqp", "aiormq"),
    "memcache": Driver("machinery.drivers.memcache.backend:MemcacheBackend", "memcache", "aiomcache"),
    "mongodb": Driver("machinery.drivers.mongodb.backend:MongoBackend", "mongodb", "pymongo"),
    "mongodb+srv": Driver("machinery.drivers.mongodb.backend:MongoBackend", "mongodb", "pymongo"),
    "dynamodb": Driver("machinery.drivers.dynamodb.backend:DynamoDBBackend", "dynamodb", "aiobotocore"),
}
_LOCKS: dict[str, Driver] = {
    "eager": Driver("machinery.drivers.memory.lock:MemoryLock", ""),
    "memory": Driver("machinery.drivers.memory.lock:MemoryLock", ""),
    "sqlite": Driver("machinery.drivers.sqlite.lock:SQLiteLock", ""),
    "redis": Driver("machinery.drivers.redis.lock:RedisLock", "redis", "redis"),
    "rediss": Driver("machinery.drivers.redis.lock:RedisLock", "redis", "redis"),
}
_TABLES: dict[Kind, dict[str, Driver]] = {"broker": _BROKERS, "backend": _BACKENDS, "lock": _LOCKS}
_FIELD: dict[Kind, str] = {"broker": "broker", "backend": "result_backend", "lock": "lock"}


def scheme_of(url: str, kind: Kind) -> str:
    """The registry key for a URL; Go's https:// forms map to sqs / dynamodb."""
    if url in ("eager", "null", "memory"):
        return url
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ConfigError(
            f"config field {_FIELD[kind]}: {_redact(url)!r} is not a URL; expected SCHEME://..., "
            f"known schemes: {', '.join(sorted(_TABLES[kind]))}"
        )
    scheme = scheme.lower()
    if scheme in ("https", "http"):
        host = rest.split("/", 1)[0].lower()
        if kind == "broker" and (host.startswith("sqs") or os.environ.get("DISABLE_STRICT_SQS_CHECK")):
            return "sqs"
        if kind == "backend" and (host.startswith("dynamodb") or "dynamodb" in host):
            return "dynamodb"
    return scheme


def driver_class(url: str, kind: Kind) -> type[Any]:
    scheme = scheme_of(url, kind)
    table = _TABLES[kind]
    driver = table.get(scheme)
    if driver is None:
        raise UnknownSchemeError(
            f"config field {_FIELD[kind]}: unknown {kind} URL scheme {scheme!r} in {_redact(url)}; "
            f"known schemes: {', '.join(sorted(table))}"
        )
    module_name, _, cls_name = driver.path.partition(":")
    if driver.module_needed:
        try:
            importlib.import_module(driver.module_needed)
        except ImportError:
            raise DriverMissingError(
                f"the {scheme}:// {kind} needs an extra: pip install 'machinery[{driver.extra}]'"
            ) from None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or ""
        if driver.extra and missing and missing.split(".")[0] != "machinery":
            raise DriverMissingError(
                f"the {scheme}:// {kind} needs the {missing!r} module: "
                f"pip install 'machinery[{driver.extra}]'"
            ) from None
        if missing == module_name:
            raise UnknownSchemeError(
                f"config field {_FIELD[kind]}: the {scheme}:// {kind} is not available in this version of "
                f"machinery; available schemes: {', '.join(sorted(s for s in table if _exists(table[s])))}"
            ) from None
        raise
    cls: type[Any] = getattr(module, cls_name)
    return cls


def _exists(driver: Driver) -> bool:
    return importlib.util.find_spec(driver.path.partition(":")[0]) is not None


def make_broker(cnf: Config, url: str | None = None) -> Broker:
    url = url if url is not None else cnf.broker
    broker: Broker = driver_class(url, "broker")(cnf, url)
    return broker


def make_backend(cnf: Config, url: str | None = None) -> Backend:
    url = url if url is not None else cnf.result_backend
    backend: Backend = driver_class(url, "backend")(cnf, url)
    return backend


def make_lock(cnf: Config, url: str | None = None) -> Lock:
    """The lock for periodic tasks: cnf.lock, else the backend's store when it can lock, else in-process."""
    if url is None:
        url = cnf.lock
    if not url:
        backend_scheme = scheme_of(cnf.result_backend, "backend") if cnf.result_backend else ""
        url = cnf.result_backend if backend_scheme in ("sqlite", "redis", "rediss") else "eager"
    lock: Lock = driver_class(url, "lock")(cnf, url)
    return lock


def describe(url: str) -> str:
    """Where a broker, backend or lock URL points, for people: a SQLite URL as the absolute path
    of its file (a relative one is resolved against the current directory, so processes started
    elsewhere use other files), any other URL with its password hidden."""
    if url.lower().startswith("sqlite:"):
        from machinery.drivers.sqlite.db import MEMORY_PATH, URL_PREFIX

        path = url[len(URL_PREFIX):] if url[:len(URL_PREFIX)].lower() == URL_PREFIX else ""
        if not path or path == MEMORY_PATH:
            return _redact(url)
        return f"SQLite file {os.path.abspath(path)}"
    if url in ("memory", "eager") or url.startswith("memory:"):
        return "memory (this process only)"
    if url == "null":
        return "null (stores nothing)"
    return _redact(url)


def find_pairing(broker: Broker, backend: Backend) -> Pairing | None:
    """What this broker and backend can do together (see capabilities.Pairing), or None.

    Asks the broker's driver package, then the backend's: a package of this registry that pairs
    its drivers has a module `pairing` whose `pair(broker, backend)` recognises them. Drivers of
    other packages (injected ones) pair with nothing.
    """
    asked: set[str] = set()
    for driver in (broker, backend):
        package = type(driver).__module__.rpartition(".")[0]
        if package in asked or package not in _packages():
            continue
        asked.add(package)
        if importlib.util.find_spec(f"{package}.pairing") is None:
            continue
        pairing: Pairing | None = importlib.import_module(f"{package}.pairing").pair(broker, backend)
        if pairing is not None:
            return pairing
    return None


def _packages() -> set[str]:
    """The driver packages of the scheme tables ("machinery.drivers.redis", ...)."""
    return {d.path.partition(":")[0].rpartition(".")[0] for table in _TABLES.values() for d in table.values()}


def _redact(url: str) -> str:
    """The URL with any user:password@ part hidden, for error messages."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    if "@" not in authority:
        return url
    host = authority.rpartition("@")[2]
    return f"{scheme}{sep}***@{host}{slash}{path}"
