"""Config defaults, environment and YAML loading, reloading, and the URL-scheme driver registry."""

from __future__ import annotations

import builtins
import importlib
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from machinery import config as config_module
from machinery.config import (
    AMQPConfig,
    Config,
    DynamoDBConfig,
    RedisConfig,
    SQSConfig,
)
from machinery.drivers import registry
from machinery.errors import ConfigError, DriverMissingError, MachineryError, UnknownSchemeError

SRC = Path(__file__).resolve().parent.parent / "src"


# --- defaults -------------------------------------------------------------------------------------


def test_defaults() -> None:
    cnf = Config()
    assert cnf.broker == "sqlite:///machinery.sqlite3"
    assert cnf.result_backend == "sqlite:///machinery.sqlite3"
    assert cnf.default_queue == "machinery_tasks"
    assert cnf.results_expire_in == 3600
    assert cnf.lock == ""
    assert cnf.multiple_broker_separator == ""
    assert cnf.no_unix_signals is False
    assert cnf.tls is None
    assert cnf.broker_urls() == ["sqlite:///machinery.sqlite3"]


def test_amqp_defaults() -> None:
    amqp = Config().amqp
    assert amqp == AMQPConfig()
    assert amqp.exchange == "machinery_exchange"
    assert amqp.exchange_type == "direct"
    assert amqp.queue_declare_args is None
    assert amqp.queue_binding_args is None
    assert amqp.binding_key == "machinery_task"
    assert amqp.prefetch_count == 3
    assert amqp.auto_delete is False
    assert amqp.delayed_queue == ""


def test_redis_defaults() -> None:
    redis = Config().redis
    assert redis == RedisConfig()
    assert (redis.max_idle, redis.max_active, redis.idle_timeout, redis.wait) == (3, 0, 240, False)
    assert (redis.read_timeout, redis.write_timeout, redis.connect_timeout) == (15, 15, 15)
    assert (redis.normal_tasks_poll_period, redis.delayed_tasks_poll_period) == (1000, 500)
    assert redis.delayed_tasks_key == "delayed_tasks"
    assert (redis.client_name, redis.master_name, redis.cluster_mode, redis.sentinel_password) == ("", "", False, "")


def test_other_section_defaults() -> None:
    cnf = Config()
    assert (cnf.sqs.wait_time_seconds, cnf.sqs.visibility_timeout, cnf.sqs.visibility_heartbeat) == (0, None, False)
    assert (cnf.dynamodb.task_states_table, cnf.dynamodb.group_metas_table) == ("task_states", "group_metas")
    assert cnf.sqlite.lease_seconds > 0


def test_results_expire_in_zero_means_3600() -> None:
    assert Config(results_expire_in=0).results_expire_in == 3600


def test_empty_delayed_tasks_key_means_the_default() -> None:
    assert RedisConfig(delayed_tasks_key="").delayed_tasks_key == "delayed_tasks"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"results_expire_in": "soon"}, "results_expire_in"),
        ({"results_expire_in": 1.5}, "results_expire_in"),
        ({"results_expire_in": True}, "results_expire_in"),
        ({"results_expire_in": -1}, "results_expire_in"),
        ({"broker": ""}, "broker"),
        ({"broker": 5}, "broker"),
        ({"default_queue": ""}, "default_queue"),
        ({"no_unix_signals": "yes"}, "no_unix_signals"),
        ({"amqp": "x"}, "amqp"),
        ({"redis": {"max_idle": "many"}}, "redis.max_idle"),
        ({"redis": {"nope": 1}}, "redis.nope"),
    ],
)
def test_bad_code_config_names_the_field(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config(**kwargs)


@pytest.mark.parametrize(
    ("factory", "field"),
    [
        (lambda: AMQPConfig(exchange_type="bogus"), "amqp.exchange_type"),
        (lambda: AMQPConfig(prefetch_count=-1), "amqp.prefetch_count"),
        (lambda: SQSConfig(wait_time_seconds=21), "sqs.wait_time_seconds"),
        (lambda: SQSConfig(visibility_timeout=-1), "sqs.visibility_timeout"),
        (lambda: RedisConfig(max_active=-1), "redis.max_active"),
        (lambda: RedisConfig(cluster_mode="yes"), "redis.cluster_mode"),  # type: ignore[arg-type]
        (lambda: DynamoDBConfig(task_states_table=1), "dynamodb.task_states_table"),  # type: ignore[arg-type]
    ],
)
def test_bad_section_values_name_the_field(factory: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        factory()


def test_sections_from_mappings_in_code() -> None:
    cnf = Config(redis={"max_idle": 5, "max_idle_timeout": 60}, amqp={"exchange": "ex"})  # type: ignore[arg-type]
    assert isinstance(cnf.redis, RedisConfig) and cnf.redis.max_idle == 5 and cnf.redis.idle_timeout == 60
    assert cnf.amqp.exchange == "ex"


def test_any_typed_fields_take_any_value() -> None:
    client = object()
    assert SQSConfig(client=client).client is client
    assert Config(sqs=SQSConfig(client=client)).sqs.client is client


def test_config_error_is_a_machinery_error() -> None:
    assert issubclass(ConfigError, MachineryError) and issubclass(ConfigError, ValueError)
    assert issubclass(UnknownSchemeError, ConfigError)
    assert issubclass(DriverMissingError, MachineryError) and issubclass(DriverMissingError, ImportError)


# --- environment -------------------------------------------------------------------------------------


def test_from_env_with_gos_names() -> None:
    env = {
        "BROKER": "redis://localhost:6379",
        "DEFAULT_QUEUE": "q",
        "RESULT_BACKEND": "redis://localhost:6379/1",
        "RESULTS_EXPIRE_IN": "60",
        "LOCK": "redis://localhost:6379/2",
        "NO_UNIX_SIGNALS": "true",
        "AMQP_EXCHANGE": "ex",
        "AMQP_EXCHANGE_TYPE": "topic",
        "AMQP_BINDING_KEY": "bk",
        "AMQP_PREFETCH_COUNT": "7",
        "AMQP_AUTO_DELETE": "1",
        "AMQP_DELAYED_QUEUE": "dq",
        "AMQP_QUEUE_BINDING_ARGS": "image-type:png,x-match:any",
        "AMQP_QUEUE_DECLARE_ARGS": "x-max-priority:10",
        "SQS_WAIT_TIME_SECONDS": "20",
        "SQS_VISIBILITY_TIMEOUT": "30",
        "SQS_VISIBILITY_HEARTBEAT": "true",
        "REDIS_MAX_IDLE": "4",
        "REDIS_MAX_ACTIVE": "8",
        "REDIS_IDLE_TIMEOUT": "100",
        "REDIS_WAIT": "true",
        "REDIS_READ_TIMEOUT": "1",
        "REDIS_WRITE_TIMEOUT": "2",
        "REDIS_CONNECT_TIMEOUT": "3",
        "REDIS_NORMAL_TASKS_POLL_PERIOD": "10",
        "REDIS_DELAYED_TASKS_POLL_PERIOD": "20",
        "REDIS_DELAYED_TASKS_KEY": "dk",
        "REDIS_CLIENT_NAME": "cn",
        "REDIS_MASTER_NAME": "mn",
        "REDIS_CLUSTER_MODE": "true",
        "REDIS_SENTINEL_PASSWORD": "sp",
        "TASK_STATES_TABLE": "ts",
        "GROUP_METAS_TABLE": "gm",
        "UNRELATED": "ignored",
    }
    cnf = Config.from_env(env)
    assert (cnf.broker, cnf.default_queue, cnf.result_backend) == (
        "redis://localhost:6379", "q", "redis://localhost:6379/1")
    assert (cnf.results_expire_in, cnf.lock, cnf.no_unix_signals) == (60, "redis://localhost:6379/2", True)
    assert cnf.amqp == AMQPConfig(
        exchange="ex", exchange_type="topic", binding_key="bk", prefetch_count=7, auto_delete=True,
        delayed_queue="dq", queue_binding_args={"image-type": "png", "x-match": "any"},
        queue_declare_args={"x-max-priority": "10"},
    )
    assert cnf.sqs == SQSConfig(wait_time_seconds=20, visibility_timeout=30, visibility_heartbeat=True)
    assert cnf.redis == RedisConfig(
        max_idle=4, max_active=8, idle_timeout=100, wait=True, read_timeout=1, write_timeout=2,
        connect_timeout=3, normal_tasks_poll_period=10, delayed_tasks_poll_period=20, delayed_tasks_key="dk",
        client_name="cn", master_name="mn", cluster_mode=True, sentinel_password="sp",
    )
    assert cnf.dynamodb == DynamoDBConfig(task_states_table="ts", group_metas_table="gm")


def test_from_env_empty_gives_defaults() -> None:
    assert Config.from_env({}) == Config()


def test_from_env_reads_os_environ(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DEFAULT_QUEUE", "from_os_environ")
    assert Config.from_env().default_queue == "from_os_environ"


def test_multiple_broker_separator_names() -> None:
    # Go Machinery's env tag is misspelt MULTIPLE_BROKEN_SEPARATOR; both spellings work
    gos = Config.from_env({"BROKER": "redis://a,redis://b", "MULTIPLE_BROKEN_SEPARATOR": ","})
    assert gos.multiple_broker_separator == ","
    assert gos.broker_urls() == ["redis://a", "redis://b"]
    fixed = Config.from_env({"BROKER": "redis://a|redis://b", "MULTIPLE_BROKER_SEPARATOR": "|"})
    assert fixed.broker_urls() == ["redis://a", "redis://b"]
    both = Config.from_env({"MULTIPLE_BROKER_SEPARATOR": ";", "MULTIPLE_BROKEN_SEPARATOR": ","})
    assert both.multiple_broker_separator == ";"


def test_redis_cluster_enabled_alias() -> None:
    assert Config.from_env({"REDIS_CLUSTER_ENABLED": "true"}).redis.cluster_mode is True
    assert Config.from_env({"REDIS_CLUSTER_ENABLED": "false"}).redis.cluster_mode is False
    assert Config.from_env({"REDIS_CLUSTER_MODE": "true", "REDIS_CLUSTER_ENABLED": "false"}).redis.cluster_mode


@pytest.mark.parametrize(
    ("var", "value", "expected"),
    [
        ("RESULTS_EXPIRE_IN", "soon", "expected an integer"),
        ("REDIS_MAX_IDLE", "3.5", "expected an integer"),
        ("AMQP_PREFETCH_COUNT", "", "expected an integer"),
        ("SQS_VISIBILITY_TIMEOUT", "x", "expected an integer"),
        ("NO_UNIX_SIGNALS", "maybe", "expected a boolean"),
        ("REDIS_CLUSTER_ENABLED", "2", "expected a boolean"),
        ("AMQP_QUEUE_BINDING_ARGS", "novalue", "expected key:value pairs"),
        ("AMQP_QUEUE_DECLARE_ARGS", "a:1,:2", "expected key:value pairs"),
        ("SQLITE_LEASE_SECONDS", "long", "expected a number"),
    ],
)
def test_bad_env_values_name_the_variable(var: str, value: str, expected: str) -> None:
    with pytest.raises(ConfigError, match=f"environment variable {var}: {expected}"):
        Config.from_env({var: value})


def test_env_values_are_validated() -> None:
    with pytest.raises(ConfigError, match=r"amqp\.exchange_type"):
        Config.from_env({"AMQP_EXCHANGE_TYPE": "bogus"})
    with pytest.raises(ConfigError, match=r"sqs\.wait_time_seconds"):
        Config.from_env({"SQS_WAIT_TIME_SECONDS": "30"})


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", "t", "yes", "on", " y "])
def test_env_true_spellings(raw: str) -> None:
    assert Config.from_env({"NO_UNIX_SIGNALS": raw}).no_unix_signals is True


@pytest.mark.parametrize("raw", ["0", "false", "False", "f", "no", "off", ""])
def test_env_false_spellings(raw: str) -> None:
    assert Config.from_env({"NO_UNIX_SIGNALS": raw}).no_unix_signals is False


def test_env_empty_optional_int_is_none() -> None:
    assert Config.from_env({"SQS_VISIBILITY_TIMEOUT": ""}).sqs.visibility_timeout is None
    assert Config.from_env({"AMQP_QUEUE_BINDING_ARGS": ""}).amqp.queue_binding_args is None


# --- YAML -----------------------------------------------------------------------------------------

GO_YAML = """\
---
broker: amqp://guest:guest@localhost:5672/
default_queue: machinery_tasks
result_backend: redis://127.0.0.1:6379
results_expire_in: 3600000
multiple_broker_separator: ","
no_unix_signals: true
lock: redis://127.0.0.1:6379/3
amqp:
  exchange: machinery_exchange
  exchange_type: direct
  binding_key: machinery_task
  prefetch_count: 5
  queue_declare_args:
    x-max-priority: 10
  queue_binding_args:
    image-type: png
redis:
  max_idle: 5
  max_active: 10
  max_idle_timeout: 120
  wait: true
  read_timeout: 2
  write_timeout: 3
  connect_timeout: 4
  normal_tasks_poll_period: 100
  delayed_tasks_poll_period: 50
  delayed_tasks_key: my_delayed
  master_name: mymaster
  cluster_enabled: true
sqs:
  receive_wait_time_seconds: 10
  receive_visibility_timeout: 60
  visibility_hearth_beat: true
dynamodb:
  task_states_table: states
  group_metas_table: metas
"""


def write(tmp_path: Path, text: str, name: str = "config.yml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def test_from_yaml_with_gos_key_names(tmp_path: Path) -> None:
    cnf = Config.from_yaml(write(tmp_path, GO_YAML))
    assert cnf.broker == "amqp://guest:guest@localhost:5672/"
    assert cnf.result_backend == "redis://127.0.0.1:6379"
    assert cnf.results_expire_in == 3600000
    assert cnf.multiple_broker_separator == ","
    assert cnf.no_unix_signals is True
    assert cnf.lock == "redis://127.0.0.1:6379/3"
    assert cnf.amqp.prefetch_count == 5
    assert cnf.amqp.queue_declare_args == {"x-max-priority": 10}
    assert cnf.amqp.queue_binding_args == {"image-type": "png"}
    assert cnf.redis == RedisConfig(
        max_idle=5, max_active=10, idle_timeout=120, wait=True, read_timeout=2, write_timeout=3,
        connect_timeout=4, normal_tasks_poll_period=100, delayed_tasks_poll_period=50,
        delayed_tasks_key="my_delayed", master_name="mymaster", cluster_mode=True,
    )
    assert cnf.sqs == SQSConfig(wait_time_seconds=10, visibility_timeout=60, visibility_heartbeat=True)
    assert cnf.dynamodb == DynamoDBConfig(task_states_table="states", group_metas_table="metas")


def test_from_yaml_python_field_names_also_work(tmp_path: Path) -> None:
    text = "redis:\n  idle_timeout: 7\n  cluster_mode: true\nsqs:\n  wait_time_seconds: 3\n"
    cnf = Config.from_yaml(write(tmp_path, text))
    assert (cnf.redis.idle_timeout, cnf.redis.cluster_mode, cnf.sqs.wait_time_seconds) == (7, True, 3)


def test_from_yaml_missing_keys_keep_defaults(tmp_path: Path) -> None:
    cnf = Config.from_yaml(write(tmp_path, "default_queue: other\namqp:\n"))
    assert cnf.default_queue == "other"
    assert cnf.broker == "sqlite:///machinery.sqlite3"
    assert cnf.amqp == AMQPConfig()
    assert Config.from_yaml(write(tmp_path, "", "empty.yml")) == Config()


def test_from_yaml_reads_a_file_larger_than_1000_bytes(tmp_path: Path) -> None:
    """Go Machinery reads only the first 1000 bytes; the whole file counts here."""
    padding = "".join(f"# comment line {i:04d} padding padding padding padding\n" for i in range(40))
    text = padding + "default_queue: after_the_first_kilobyte\nredis:\n  max_idle: 9\n"
    path = write(tmp_path, text)
    assert path.stat().st_size > 1000
    assert text.index("default_queue") > 1000
    cnf = Config.from_yaml(path)
    assert cnf.default_queue == "after_the_first_kilobyte"
    assert cnf.redis.max_idle == 9


def test_yaml_tls_is_a_mapping_of_settings(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"config field tls in .*expected a mapping"):
        Config.from_yaml(write(tmp_path, "tls: true\n"))


@pytest.mark.parametrize(
    ("text", "names"),
    [
        ("brokr: redis://x\n", ["brokr", "config.yml"]),
        ("redis:\n  max_idel: 3\n", ["redis.max_idel", "config.yml"]),
        ("amqp:\n  exchange_kind: topic\n", ["amqp.exchange_kind"]),
        ("signing_key_olds: [x]\n", ["signing_key_olds"]),
    ],
)
def test_from_yaml_unknown_keys_name_the_key(tmp_path: Path, text: str, names: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_yaml(write(tmp_path, text))
    assert "unknown config field" in str(info.value)
    for name in names:
        assert name in str(info.value)


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("results_expire_in: soon\n", "results_expire_in"),
        ("results_expire_in: 1.5\n", "results_expire_in"),
        ("default_queue: 5\n", "default_queue"),
        ("no_unix_signals: 1\n", "no_unix_signals"),
        ("redis:\n  max_idle: lots\n", "redis.max_idle"),
        ("redis:\n  wait: 1\n", "redis.wait"),
        ("amqp:\n  exchange_type: bogus\n", "amqp.exchange_type"),
        ("amqp:\n  queue_binding_args: [a, b]\n", "amqp.queue_binding_args"),
        ("sqs:\n  receive_wait_time_seconds: 99\n", "sqs.wait_time_seconds"),
        ("redis: 5\n", "redis"),
    ],
)
def test_from_yaml_wrong_types_name_the_field(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        Config.from_yaml(write(tmp_path, text))


def test_from_yaml_bogus_exchange_type_message(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"amqp\.exchange_type: expected one of direct, topic, fanout, headers"):
        Config.from_yaml(write(tmp_path, "amqp:\n  exchange_type: bogus\n"))


def test_from_yaml_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        Config.from_yaml(tmp_path / "missing.yml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(write(tmp_path, "a: [unclosed\n"))
    with pytest.raises(ConfigError, match="expected a mapping at the top level"):
        Config.from_yaml(write(tmp_path, "- a\n- b\n"))


def test_from_mapping() -> None:
    cnf = Config.from_mapping({"default_queue": "m", "redis": {"max_idle_timeout": 1}})
    assert cnf.default_queue == "m" and cnf.redis.idle_timeout == 1
    with pytest.raises(ConfigError, match="unknown config field 'x' in mapping"):
        Config.from_mapping({"x": 1})


# --- reloading ------------------------------------------------------------------------------------


def replace(path: Path, text: str) -> None:
    """Swap the file's content atomically, so the reloader never reads a half-written file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _wait_for(predicate: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def test_keep_reloading_rereads_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(config_module._Reloader, "interval", 0.01)
    path = write(tmp_path, "default_queue: first\nredis:\n  max_idle: 1\n")
    cnf = Config.from_yaml(path, keep_reloading=True)
    try:
        assert cnf.default_queue == "first"
        replace(path, "default_queue: second\nredis:\n  max_idle: 2\n")
        assert _wait_for(lambda: cnf.default_queue == "second" and cnf.redis.max_idle == 2)
        # a broken file is logged and skipped: the live values stay
        with caplog.at_level(logging.WARNING, logger="machinery"):
            replace(path, "default_queue: [broken\n")
            assert _wait_for(lambda: "keeping the old values" in caplog.text), "the broken file was never read"
        assert cnf.default_queue == "second"
        replace(path, "default_queue: third\n")
        assert _wait_for(lambda: cnf.default_queue == "third" and cnf.redis.max_idle == 3)
    finally:
        cnf.stop_reloading()


def test_stop_reloading_stops_the_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module._Reloader, "interval", 0.01)
    path = write(tmp_path, "default_queue: first\n")
    cnf = Config.from_yaml(path, keep_reloading=True)
    reloader = cnf.__dict__["_reloader"]
    cnf.stop_reloading()
    assert reloader.thread is not None
    reloader.thread.join(timeout=5)
    assert not reloader.thread.is_alive()
    replace(path, "default_queue: second\n")
    time.sleep(0.1)
    assert cnf.default_queue == "first"
    cnf.stop_reloading()  # twice is fine
    Config().stop_reloading()  # and on a config that never reloaded


def test_without_keep_reloading_nothing_rereads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(config_module._Reloader, "interval", 0.01)
    path = write(tmp_path, "default_queue: first\n")
    cnf = Config.from_yaml(path)
    replace(path, "default_queue: second\n")
    time.sleep(0.1)
    assert cnf.default_queue == "first"


def test_reload_interval_default_is_ten_seconds() -> None:
    assert config_module._Reloader.interval == 10.0


# --- broker URLs ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("broker", "sep", "urls"),
    [
        ("redis://a", "", ["redis://a"]),
        ("redis://a,redis://b", "", ["redis://a,redis://b"]),
        ("redis://a,redis://b", ",", ["redis://a", "redis://b"]),
        ("redis://a , redis://b,", ",", ["redis://a", "redis://b"]),
        ("amqp://a|amqp://b|amqp://c", "|", ["amqp://a", "amqp://b", "amqp://c"]),
    ],
)
def test_broker_urls(broker: str, sep: str, urls: list[str]) -> None:
    assert Config(broker=broker, multiple_broker_separator=sep).broker_urls() == urls


# --- registry -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kind", "scheme"),
    [
        ("redis://localhost:6379", "broker", "redis"),
        ("REDIS://localhost:6379", "broker", "redis"),
        ("rediss://localhost:6379", "backend", "rediss"),
        ("redis+socket:///tmp/redis.sock", "broker", "redis+socket"),
        ("amqp://guest:guest@localhost:5672/", "broker", "amqp"),
        ("amqps://localhost", "backend", "amqps"),
        ("https://sqs.us-east-1.amazonaws.com/123456789012/q", "broker", "sqs"),
        ("https://dynamodb.us-east-1.amazonaws.com", "backend", "dynamodb"),
        ("gcppubsub://project/topic", "broker", "gcppubsub"),
        ("mongodb://localhost:27017", "backend", "mongodb"),
        ("mongodb+srv://cluster.example.com", "backend", "mongodb+srv"),
        ("memcache://localhost:11211", "backend", "memcache"),
        ("sqlite:///machinery.sqlite3", "broker", "sqlite"),
        ("eager", "broker", "eager"),
        ("eager", "backend", "eager"),
        ("null", "backend", "null"),
        ("memory", "lock", "memory"),
    ],
)
def test_scheme_of(url: str, kind: registry.Kind, scheme: str) -> None:
    assert registry.scheme_of(url, kind) == scheme


def test_https_that_is_not_sqs_is_unknown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DISABLE_STRICT_SQS_CHECK", raising=False)
    assert registry.scheme_of("https://example.com/queue", "broker") == "https"
    with pytest.raises(UnknownSchemeError, match="unknown broker URL scheme 'https'"):
        registry.driver_class("https://example.com/queue", "broker")
    monkeypatch.setenv("DISABLE_STRICT_SQS_CHECK", "yes")
    assert registry.scheme_of("https://localhost:4566/000000000000/q", "broker") == "sqs"


def test_unknown_scheme_lists_known_schemes() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        registry.driver_class("kafka://localhost:9092", "broker")
    message = str(info.value)
    assert "config field broker" in message and "'kafka'" in message
    for scheme in ("amqp", "redis", "sqs", "sqlite", "gcppubsub", "eager"):
        assert scheme in message
    with pytest.raises(UnknownSchemeError, match=r"config field result_backend.*known schemes:.*memcache"):
        registry.driver_class("cassandra://x", "backend")
    with pytest.raises(UnknownSchemeError, match="config field lock"):
        registry.driver_class("zookeeper://x", "lock")


def test_unknown_scheme_hides_the_password() -> None:
    with pytest.raises(UnknownSchemeError) as info:
        registry.driver_class("kafka://user:s3cret@host:9092/x", "broker")
    assert "s3cret" not in str(info.value)
    assert "kafka://***@host:9092/x" in str(info.value)


@pytest.mark.parametrize("url", ["localhost:6379", "redis", "/tmp/x.sock", "user:s3cret@host:6379"])
def test_non_url_is_a_config_error(url: str) -> None:
    with pytest.raises(ConfigError, match=r"config field broker: .* is not a URL; expected SCHEME://") as info:
        registry.driver_class(url, "broker")
    assert not isinstance(info.value, UnknownSchemeError)
    assert "known schemes" in str(info.value)
    assert "s3cret" not in str(info.value)


def test_memory_drivers_resolve() -> None:
    from machinery.drivers.memory.backend import MemoryBackend
    from machinery.drivers.memory.broker import MemoryBroker
    from machinery.drivers.memory.lock import MemoryLock

    assert registry.driver_class("memory://", "broker") is MemoryBroker
    assert registry.driver_class("eager", "broker") is MemoryBroker
    assert registry.driver_class("memory://", "backend") is MemoryBackend
    assert registry.driver_class("eager", "lock") is MemoryLock


@pytest.mark.parametrize(
    ("url", "kind", "module", "extra"),
    [
        ("redis://localhost", "broker", "redis", "redis"),
        ("redis://localhost", "backend", "redis", "redis"),
        ("rediss://localhost", "lock", "redis", "redis"),
        ("amqp://localhost", "broker", "aiormq", "amqp"),
        ("https://sqs.eu-west-1.amazonaws.com/1/q", "broker", "aiobotocore", "sqs"),
        ("https://dynamodb.eu-west-1.amazonaws.com", "backend", "aiobotocore", "dynamodb"),
        ("mongodb://localhost", "backend", "pymongo", "mongodb"),
        ("memcache://localhost", "backend", "aiomcache", "memcache"),
        ("gcppubsub://p/t", "broker", "google.cloud.pubsub_v1", "gcppubsub"),
    ],
)
def test_missing_driver_names_the_extra(
    url: str, kind: registry.Kind, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a None entry in sys.modules makes `import module` raise ImportError, as if it were not installed
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(DriverMissingError, match=rf"pip install 'machinery\[{extra}\]'") as info:
        registry.driver_class(url, kind)
    assert "\n" not in str(info.value)


def test_missing_third_party_module_inside_a_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver module that itself fails to import a dependency also names the extra."""
    real_import = importlib.import_module

    def fake_import(name: str, package: str | None = None) -> Any:
        if name == "machinery.drivers.redis.broker":
            raise ModuleNotFoundError("No module named 'hiredis'", name="hiredis")
        if name == "redis":
            return object()
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(DriverMissingError, match=r"'hiredis' module: pip install 'machinery\[redis\]'"):
        registry.driver_class("redis://localhost", "broker")


def test_missing_machinery_module_is_not_blamed_on_an_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = importlib.import_module

    def fake_import(name: str, package: str | None = None) -> Any:
        if name == "machinery.drivers.redis.broker":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        if name == "redis":
            return object()
        return real_import(name, package)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    with pytest.raises(UnknownSchemeError, match="not available in this version") as info:
        registry.driver_class("redis://localhost", "broker")
    assert not isinstance(info.value, DriverMissingError)


def test_missing_driver_via_builtins_import(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def fake_import(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "pymongo" or name.startswith("pymongo."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "pymongo", raising=False)
    monkeypatch.setattr(builtins, "__import__", fake_import)
    expected = r"mongodb:// backend needs an extra: pip install 'machinery\[mongodb\]'"
    with pytest.raises(DriverMissingError, match=expected):
        registry.driver_class("mongodb://localhost", "backend")


# --- importing machinery loads no driver -------------------------------------------------------------

DRIVER_MODULES = ("redis", "hiredis", "aio_pika", "aiormq", "pamqp", "aiobotocore", "botocore", "boto3",
                  "pymongo", "motor", "bson", "google", "grpc", "aiomcache", "pymemcache")


@pytest.mark.parametrize(
    "statement",
    [
        "import machinery",
        "import machinery.tasks, machinery.tasks.signature, machinery.tasks.state, machinery.tasks.workflow",
        "import machinery.config; machinery.config.Config()",
        "import machinery.drivers.registry",
        "import machinery.errors, machinery.tasks.gotypes, machinery.tasks.gojson",
        "from machinery import Config, Signature, Group, Chord, Chain",
    ],
)
def test_import_loads_no_driver(statement: str) -> None:
    code = textwrap.dedent(f"""
        import sys
        {statement}
        drivers = {DRIVER_MODULES!r}
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in drivers)
        print(",".join(loaded))
    """)
    env = dict(os.environ)
    env["PYTHONPATH"] = str(SRC) + os.pathsep + env.get("PYTHONPATH", "")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"{statement!r} imported driver modules: {out.stdout.strip()}"


def test_event_loop_choice() -> None:
    assert Config().event_loop == "auto"
    assert Config.from_env({"EVENT_LOOP": "asyncio"}).event_loop == "asyncio"
    with pytest.raises(ConfigError, match=r"event_loop.*tokio"):
        Config(event_loop="tokio")


def test_asyncio_loop_is_used_when_asked() -> None:
    import asyncio

    from machinery.loops import loop_factory, run

    assert loop_factory("asyncio") is asyncio.new_event_loop

    async def kind() -> str:
        return type(asyncio.get_running_loop()).__module__

    assert run(kind(), "asyncio").startswith("asyncio")
    assert run(kind(), "uvloop").startswith("uvloop")  # uvloop is a dependency on CPython/Linux
