"""Configuration: every field of Go Machinery's config, from code, the environment or YAML.

Defaults follow Go Machinery except the broker and backend, which default to the embedded
SQLite file ./machinery.sqlite3 so that `Config()` works with no server.
"""

from __future__ import annotations

import dataclasses
import os
import ssl
import threading
import types
import typing
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar, Self, get_type_hints

from machinery.errors import ConfigError
from machinery.limits import seconds
from machinery.log import get_logger

DEFAULT_SQLITE_URL = "sqlite:///machinery.sqlite3"
EVENT_LOOPS = ("auto", "uvloop", "asyncio")
EXCHANGE_TYPES = ("direct", "topic", "fanout", "headers")


class _Section:
    """Shared validation: check each field's type and run the section's own checks."""

    _env_names: ClassVar[dict[str, str]] = {}
    _yaml_names: ClassVar[dict[str, str]] = {}
    _prefix: ClassVar[str] = ""

    def __new__(cls, *args: Any, **kwargs: Any) -> Self:
        # The dataclass __init__ would refuse an unknown keyword with a bare TypeError; this
        # names the field the way a YAML file's unknown key is named.
        if kwargs:
            known = {f.name for f in fields(cls)}  # type: ignore[arg-type]
            unknown = sorted(k for k in kwargs if k not in known)
            if unknown:
                raise ConfigError(f"unknown config field{'s' if len(unknown) > 1 else ''} "
                                  f"{', '.join(cls._prefix + k for k in unknown)}")
        return super().__new__(cls)

    def __post_init__(self) -> None:
        hints = get_type_hints(type(self))
        for f in fields(self):  # type: ignore[arg-type]
            _check_type(f"{self._prefix}{f.name}", getattr(self, f.name), hints[f.name])
        self._validate()

    def _validate(self) -> None:
        pass


def _check_type(name: str, value: Any, hint: Any) -> None:
    allowed = _allowed_types(hint)
    if allowed is None:
        return
    if isinstance(value, bool) and bool not in allowed:
        raise ConfigError(f"config field {name}: expected {_names(allowed)}, got bool {value!r}")
    if not isinstance(value, tuple(allowed)):
        raise ConfigError(
            f"config field {name}: expected {_names(allowed)}, got {type(value).__name__} {value!r}"
        )


def _allowed_types(hint: Any) -> list[type] | None:
    """The runtime types a field accepts, or None when any value goes (Any, unchecked hints)."""
    if hint is Any:
        return None
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        out: list[type] = []
        for arg in typing.get_args(hint):
            sub = _allowed_types(arg)
            if sub is None:
                return None
            out.extend(sub)
        return out
    if hint is type(None):
        return [type(None)]
    if origin is not None:
        return [origin]
    if hint is float:
        return [float, int]
    if isinstance(hint, type):
        return [hint]
    return None


def _names(types_: list[type]) -> str:
    return " or ".join("None" if t is type(None) else t.__name__ for t in types_)


def _non_negative(section: _Section, *names: str) -> None:
    for name in names:
        if getattr(section, name) < 0:
            raise ConfigError(
                f"config field {section._prefix}{name}: must be >= 0, got {getattr(section, name)}"
            )


@dataclass
class AMQPConfig(_Section):
    exchange: str = "machinery_exchange"
    exchange_type: str = "direct"
    queue_declare_args: dict[str, Any] | None = None
    queue_binding_args: dict[str, Any] | None = None
    binding_key: str = "machinery_task"
    prefetch_count: int = 3
    auto_delete: bool = False
    delayed_queue: str = ""

    _prefix = "amqp."
    _env_names = {
        "exchange": "AMQP_EXCHANGE", "exchange_type": "AMQP_EXCHANGE_TYPE",
        "queue_declare_args": "AMQP_QUEUE_DECLARE_ARGS", "queue_binding_args": "AMQP_QUEUE_BINDING_ARGS",
        "binding_key": "AMQP_BINDING_KEY", "prefetch_count": "AMQP_PREFETCH_COUNT",
        "auto_delete": "AMQP_AUTO_DELETE", "delayed_queue": "AMQP_DELAYED_QUEUE",
    }

    def _validate(self) -> None:
        if self.exchange_type not in EXCHANGE_TYPES:
            raise ConfigError(
                f"config field amqp.exchange_type: expected one of {', '.join(EXCHANGE_TYPES)}, "
                f"got {self.exchange_type!r}"
            )
        _non_negative(self, "prefetch_count")


@dataclass
class SQSConfig(_Section):
    wait_time_seconds: int = 0
    visibility_timeout: int | None = None
    visibility_heartbeat: bool = False
    client: Any = None

    _prefix = "sqs."
    _env_names = {
        "wait_time_seconds": "SQS_WAIT_TIME_SECONDS", "visibility_timeout": "SQS_VISIBILITY_TIMEOUT",
        "visibility_heartbeat": "SQS_VISIBILITY_HEARTBEAT",
    }
    _yaml_names = {
        "wait_time_seconds": "receive_wait_time_seconds", "visibility_timeout": "receive_visibility_timeout",
        "visibility_heartbeat": "visibility_hearth_beat",
    }

    def _validate(self) -> None:
        if not 0 <= self.wait_time_seconds <= 20:
            raise ConfigError(
                f"config field sqs.wait_time_seconds: must be 0..20, got {self.wait_time_seconds}"
            )
        if self.visibility_timeout is not None and not 0 <= self.visibility_timeout <= 43200:
            raise ConfigError(
                f"config field sqs.visibility_timeout: must be 0..43200, got {self.visibility_timeout}"
            )


@dataclass
class RedisConfig(_Section):
    max_idle: int = 3
    max_active: int = 0
    idle_timeout: int = 240
    wait: bool = False
    read_timeout: int = 15
    write_timeout: int = 15
    connect_timeout: int = 15
    normal_tasks_poll_period: int = 1000
    delayed_tasks_poll_period: int = 500
    delayed_tasks_key: str = "delayed_tasks"
    client_name: str = ""
    master_name: str = ""
    cluster_mode: bool = False
    sentinel_password: str = ""
    lease_seconds: float = 30.0
    """How long a fetched task stays claimed without a heartbeat before it goes back to the queue."""

    _prefix = "redis."
    _env_names = {
        "max_idle": "REDIS_MAX_IDLE", "max_active": "REDIS_MAX_ACTIVE", "idle_timeout": "REDIS_IDLE_TIMEOUT",
        "wait": "REDIS_WAIT", "read_timeout": "REDIS_READ_TIMEOUT", "write_timeout": "REDIS_WRITE_TIMEOUT",
        "connect_timeout": "REDIS_CONNECT_TIMEOUT",
        "normal_tasks_poll_period": "REDIS_NORMAL_TASKS_POLL_PERIOD",
        "delayed_tasks_poll_period": "REDIS_DELAYED_TASKS_POLL_PERIOD",
        "delayed_tasks_key": "REDIS_DELAYED_TASKS_KEY", "client_name": "REDIS_CLIENT_NAME",
        "master_name": "REDIS_MASTER_NAME", "cluster_mode": "REDIS_CLUSTER_MODE",
        "sentinel_password": "REDIS_SENTINEL_PASSWORD", "lease_seconds": "REDIS_LEASE_SECONDS",
    }
    _yaml_names = {"idle_timeout": "max_idle_timeout"}
    _aliases = {"cluster_enabled": "cluster_mode", "REDIS_CLUSTER_ENABLED": "cluster_mode"}

    def _validate(self) -> None:
        _non_negative(self, "max_idle", "max_active", "idle_timeout", "read_timeout", "write_timeout",
                      "connect_timeout", "normal_tasks_poll_period", "delayed_tasks_poll_period")
        if not self.delayed_tasks_key:
            self.delayed_tasks_key = "delayed_tasks"
        if self.lease_seconds <= 0:
            raise ConfigError(f"config field redis.lease_seconds: must be > 0, got {self.lease_seconds}")


@dataclass
class GCPPubSubConfig(_Section):
    client: Any = None
    max_extension: float = 0.0
    lease_seconds: float = 30.0
    """The ack deadline set on each fetched message (whole seconds, up to 600); the worker renews it."""

    _prefix = "gcppubsub."
    _env_names = {"lease_seconds": "GCPPUBSUB_LEASE_SECONDS"}

    def _validate(self) -> None:
        if not 0 < self.lease_seconds <= 600:
            raise ConfigError(f"config field gcppubsub.lease_seconds: must be in (0, 600], got {self.lease_seconds}")
        _non_negative(self, "max_extension")


@dataclass
class MongoDBConfig(_Section):
    client: Any = None
    database: str = "machinery"

    _prefix = "mongodb."


@dataclass
class DynamoDBConfig(_Section):
    task_states_table: str = "task_states"
    group_metas_table: str = "group_metas"
    client: Any = None

    _prefix = "dynamodb."
    _env_names = {"task_states_table": "TASK_STATES_TABLE", "group_metas_table": "GROUP_METAS_TABLE"}


@dataclass
class SQLiteConfig(_Section):
    """The embedded broker's settings (not in Go Machinery)."""

    lease_seconds: float = 30.0
    """How long a fetched task stays claimed without a heartbeat before another worker may take it."""
    poll_interval_ms: int = 50
    """Longest sleep between polls of an idle queue (other processes' sends are seen this fast)."""
    busy_timeout_ms: int = 10000

    _prefix = "sqlite."
    _env_names = {"lease_seconds": "SQLITE_LEASE_SECONDS", "poll_interval_ms": "SQLITE_POLL_INTERVAL_MS",
                  "busy_timeout_ms": "SQLITE_BUSY_TIMEOUT_MS"}

    def _validate(self) -> None:
        if self.lease_seconds <= 0:
            raise ConfigError(f"config field sqlite.lease_seconds: must be > 0, got {self.lease_seconds}")
        _non_negative(self, "poll_interval_ms", "busy_timeout_ms")


@dataclass
class TLSConfig(_Section):
    """TLS for every driver's connections where no code hands in an `ssl.SSLContext` (`Config.tls`):
    from the environment (TLS_*) or YAML (`tls:`). Peers are verified unless `verify` is false."""

    ca_file: str = ""
    """PEM bundle of the certificate authorities to trust (default: the system's)."""
    cert_file: str = ""
    """Client certificate (PEM), for servers that ask for one."""
    key_file: str = ""
    """The client certificate's private key (PEM), when not in cert_file."""
    verify: bool = True

    _prefix = "tls."
    _env_names = {"ca_file": "TLS_CA_FILE", "cert_file": "TLS_CERT_FILE", "key_file": "TLS_KEY_FILE",
                  "verify": "TLS_VERIFY"}

    def _validate(self) -> None:
        if self.key_file and not self.cert_file:
            raise ConfigError("config field tls.key_file: set tls.cert_file too (the key belongs to a certificate)")

    def is_set(self) -> bool:
        return bool(self.ca_file or self.cert_file or not self.verify)

    def context(self) -> ssl.SSLContext:
        """The SSLContext these settings describe; a file that cannot be read is a ConfigError."""
        try:
            ctx = ssl.create_default_context(cafile=self.ca_file or None)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"config field tls.ca_file: cannot load {self.ca_file!r}: {exc}") from None
        if self.cert_file:
            try:
                ctx.load_cert_chain(self.cert_file, self.key_file or None)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(f"config field tls.cert_file: cannot load {self.cert_file!r}"
                                  f"{' with ' + repr(self.key_file) if self.key_file else ''}: {exc}") from None
        if not self.verify:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        return ctx


_SECTIONS: dict[str, type[_Section]] = {
    "amqp": AMQPConfig, "sqs": SQSConfig, "redis": RedisConfig, "gcppubsub": GCPPubSubConfig,
    "mongodb": MongoDBConfig, "dynamodb": DynamoDBConfig, "sqlite": SQLiteConfig, "tls_settings": TLSConfig,
}
#: YAML keys of sections whose field has another name
_SECTION_YAML = {"tls": "tls_settings"}


@dataclass
class Config(_Section):
    """Everything a Server needs; `Config()` is the embedded SQLite default."""

    broker: str = DEFAULT_SQLITE_URL
    lock: str = ""
    multiple_broker_separator: str = ""
    default_queue: str = "machinery_tasks"
    result_backend: str = DEFAULT_SQLITE_URL
    results_expire_in: int = 3600
    no_unix_signals: bool = False
    #: chords whose members may also run on Go workers (which do not count members as we do): a
    #: Python member that finds its group incomplete by the count reads every member's state, as Go
    #: does (one read of the group per member: off unless Go workers share the queues)
    go_chord_members: bool = False
    #: hand-backs of a task no worker that took it has registered, before it is dead-lettered (0: never;
    #: where workers that register different tasks share a queue, each hand-back meets a random worker)
    unregistered_bounces: int = 20
    #: the loop the worker and the sync API's portal thread run on: auto (uvloop if installed), uvloop, asyncio
    event_loop: str = "auto"
    #: seconds the worker's event loop may be blocked (a blocking call in an async def task) before
    #: the worker logs a warning naming the task; 0 turns the check off
    blocked_loop_warning: float = 1.0
    #: a task's hard and soft time limits (seconds or a timedelta; 0 = none) where neither its
    #: message nor its registration sets one (machinery.limits)
    time_limit: float | timedelta = 0.0
    soft_time_limit: float | timedelta = 0.0
    #: unfinished messages a worker holds, running or waiting for a slot (0 = twice its concurrency)
    prefetch: int = 0
    tls: ssl.SSLContext | None = None
    #: the TLS settings that build `tls` when no SSLContext is given (YAML `tls:`, env TLS_*)
    tls_settings: TLSConfig = field(default_factory=TLSConfig)
    #: HMAC key that signs every message sent and is required of every message run (machinery.signing)
    signing_key: str = ""
    #: keys still accepted on messages (not used to sign): the old ones, while keys are rotated
    signing_keys_old: list[str] = field(default_factory=list)
    amqp: AMQPConfig = field(default_factory=AMQPConfig)
    sqs: SQSConfig = field(default_factory=SQSConfig)
    redis: RedisConfig = field(default_factory=RedisConfig)
    gcppubsub: GCPPubSubConfig = field(default_factory=GCPPubSubConfig)
    mongodb: MongoDBConfig = field(default_factory=MongoDBConfig)
    dynamodb: DynamoDBConfig = field(default_factory=DynamoDBConfig)
    sqlite: SQLiteConfig = field(default_factory=SQLiteConfig)

    _env_names = {
        "broker": "BROKER", "lock": "LOCK", "multiple_broker_separator": "MULTIPLE_BROKER_SEPARATOR",
        "default_queue": "DEFAULT_QUEUE", "result_backend": "RESULT_BACKEND",
        "results_expire_in": "RESULTS_EXPIRE_IN", "no_unix_signals": "NO_UNIX_SIGNALS",
        "event_loop": "EVENT_LOOP", "go_chord_members": "GO_CHORD_MEMBERS",
        "signing_key": "SIGNING_KEY", "signing_keys_old": "SIGNING_KEYS_OLD",
        "unregistered_bounces": "UNREGISTERED_BOUNCES",
        "blocked_loop_warning": "BLOCKED_LOOP_WARNING",
        "time_limit": "TIME_LIMIT", "soft_time_limit": "SOFT_TIME_LIMIT", "prefetch": "PREFETCH",
    }

    def __post_init__(self) -> None:
        # sections may be given as mappings (YAML-style keys); build them before the type checks
        for name, cls in _SECTIONS.items():
            value = getattr(self, name)
            if isinstance(value, Mapping):
                setattr(self, name, _section_from_mapping(cls, value))
        super().__post_init__()
        if self.tls is None and self.tls_settings.is_set():
            self.tls = self.tls_settings.context()

    def _validate(self) -> None:
        if not self.broker:
            raise ConfigError("config field broker: must not be empty")
        if not self.default_queue:
            raise ConfigError("config field default_queue: must not be empty")
        _non_negative(self, "results_expire_in", "unregistered_bounces", "blocked_loop_warning", "prefetch")
        for name in ("time_limit", "soft_time_limit"):
            if seconds(getattr(self, name)) is None:
                raise ConfigError(f"config field {name}: must be a number of seconds >= 0 or a timedelta, "
                                  f"got {getattr(self, name)!r}")
        if self.event_loop not in EVENT_LOOPS:
            raise ConfigError(f"config field event_loop: expected one of {', '.join(EVENT_LOOPS)}, "
                              f"got {self.event_loop!r}")
        if self.results_expire_in == 0:
            self.results_expire_in = 3600

    def broker_urls(self) -> list[str]:
        """The broker URLs, split on multiple_broker_separator when it is set."""
        if self.multiple_broker_separator:
            return [u.strip() for u in self.broker.split(self.multiple_broker_separator) if u.strip()]
        return [self.broker]

    # --- loaders ---------------------------------------------------------------------------

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read Go Machinery's variable names (BROKER, DEFAULT_QUEUE, RESULT_BACKEND, AMQP_EXCHANGE, ...)."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        hints = get_type_hints(cls)
        for name, var in cls._env_names.items():
            if var in env:
                values[name] = _parse_env(var, env[var], hints[name])
        if "multiple_broker_separator" not in values and "MULTIPLE_BROKEN_SEPARATOR" in env:
            values["multiple_broker_separator"] = env["MULTIPLE_BROKEN_SEPARATOR"]
        for section, scls in _SECTIONS.items():
            shints = get_type_hints(scls)
            sub: dict[str, Any] = {}
            for name, var in scls._env_names.items():
                if var in env:
                    sub[name] = _parse_env(var, env[var], shints[name])
            if section == "redis" and "cluster_mode" not in sub and "REDIS_CLUSTER_ENABLED" in env:
                sub["cluster_mode"] = _parse_env("REDIS_CLUSTER_ENABLED", env["REDIS_CLUSTER_ENABLED"], bool)
            if sub:
                values[section] = scls(**sub)
        return cls(**values)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str], keep_reloading: bool = False) -> Config:
        """Load a YAML file with Go Machinery's keys; with keep_reloading, re-read it every 10 s."""
        cnf = cls._load_yaml(Path(path))
        if keep_reloading:
            reloader = _Reloader(cnf, Path(path))
            cnf.__dict__["_reloader"] = reloader
            reloader.start()
        return cnf

    def stop_reloading(self) -> None:
        """Stop the keep_reloading thread of a config loaded by from_yaml (no-op otherwise)."""
        reloader: _Reloader | None = self.__dict__.pop("_reloader", None)
        if reloader is not None:
            reloader.stop()

    @classmethod
    def _load_yaml(cls, path: Path) -> Config:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        import yaml  # only YAML users pay for it (about 1.4 MB per process)

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"config file {path}: expected a mapping at the top level")
        return cls.from_mapping(data, source=str(path))

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "mapping") -> Config:
        """Build from YAML-style keys (nested sections as mappings); unknown keys are errors."""
        known = {f.name for f in fields(cls) if f.name not in ("tls", "tls_settings")}
        values: dict[str, Any] = {}
        for yaml_key, value in data.items():
            key = _SECTION_YAML.get(yaml_key, yaml_key)
            if key in _SECTIONS:
                if value is None:
                    continue
                if not isinstance(value, Mapping):
                    raise ConfigError(f"config field {yaml_key} in {source}: expected a mapping")
                values[key] = _section_from_mapping(_SECTIONS[key], value, source)
            elif key in known:
                values[key] = value
            else:
                raise ConfigError(f"unknown config field {yaml_key!r} in {source}")
        return cls(**values)


def _section_from_mapping(cls: type[_Section], data: Mapping[str, Any], source: str = "") -> _Section:
    by_yaml = {cls._yaml_names.get(f.name, f.name): f.name for f in fields(cls)}  # type: ignore[arg-type]
    by_yaml.update({f.name: f.name for f in fields(cls)})  # type: ignore[arg-type]
    by_yaml.update(getattr(cls, "_aliases", {}))
    values: dict[str, Any] = {}
    for key, value in data.items():
        name = by_yaml.get(key)
        if name is None:
            where = f" in {source}" if source else ""
            raise ConfigError(f"unknown config field {cls._prefix}{key!s}{where}")
        values[name] = value
    return cls(**values)


def _parse_env(var: str, raw: str, hint: Any) -> Any:
    allowed = _allowed_types(hint) or [str]
    if bool in allowed:
        low = raw.strip().lower()
        if low in ("1", "true", "t", "yes", "y", "on"):
            return True
        if low in ("0", "false", "f", "no", "n", "off", ""):
            return False
        raise ConfigError(f"environment variable {var}: expected a boolean, got {raw!r}")
    if int in allowed and float not in allowed:
        if raw.strip() == "" and type(None) in allowed:
            return None
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(f"environment variable {var}: expected an integer, got {raw!r}") from None
    if float in allowed:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(f"environment variable {var}: expected a number, got {raw!r}") from None
    if dict in allowed:
        return _parse_kv(var, raw)
    if list in allowed:
        return [item.strip() for item in raw.split(",") if item.strip()]
    return raw


def _parse_kv(var: str, raw: str) -> dict[str, Any] | None:
    """Go's envconfig map form: `k:v,k2:v2` (string values)."""
    if not raw.strip():
        return None
    out: dict[str, Any] = {}
    for part in raw.split(","):
        key, sep, value = part.partition(":")
        if not sep or not key.strip():
            raise ConfigError(f"environment variable {var}: expected key:value pairs, got {raw!r}")
        out[key.strip()] = value.strip()
    return out


class _Reloader:
    """Re-reads a YAML file every `interval` seconds and copies the new values into the live Config.

    It holds the Config weakly: the thread ends when the Config is garbage or stop() is called.
    """

    interval = 10.0

    def __init__(self, cnf: Config, path: Path) -> None:
        self._cnf = weakref.ref(cnf)
        self._path = path
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(
            target=self._run, name=f"machinery-config-reload:{self._path}", daemon=True
        )
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                fresh = Config._load_yaml(self._path)
            except ConfigError as exc:
                get_logger().warning(
                    "config reload of %s failed, keeping the old values: %s", self._path, exc
                )
                continue
            cnf = self._cnf()
            if cnf is None:
                return
            for f in dataclasses.fields(Config):
                if f.name != "tls":
                    setattr(cnf, f.name, getattr(fresh, f.name))
            del cnf
