"""Redis URL parsing and key helpers (no server needed)."""

from __future__ import annotations

import pytest
from redis.crc import key_slot

from machinery.config import Config, RedisConfig
from machinery.drivers.redis.client import tagged
from machinery.drivers.redis.url import RedisTarget, parse_redis_url
from machinery.drivers.registry import make_backend, make_broker
from machinery.errors import ConfigError


def parse(url: str, **redis: object) -> RedisTarget:
    return parse_redis_url(url, Config(redis=RedisConfig(**redis)), "broker")  # type: ignore[arg-type]


def test_host_port_db() -> None:
    t = parse("redis://cache.local:6380/3")
    assert t.hosts == (("cache.local", 6380),)
    assert t.db == 3
    assert (t.username, t.password, t.tls, t.cluster) == (None, None, False, False)


def test_defaults() -> None:
    t = parse("redis://localhost")
    assert t.hosts == (("localhost", 6379),) and t.db == 0


def test_userinfo_without_colon_is_the_password() -> None:
    t = parse("redis://s3cret@localhost:6379/1")
    assert (t.username, t.password) == (None, "s3cret")


def test_user_and_password_percent_decoded() -> None:
    t = parse("redis://bob:p%40ss%3Aword@localhost/2")
    assert (t.username, t.password, t.db) == ("bob", "p@ss:word", 2)
    assert parse("redis://:only@localhost").password == "only"


def test_rediss_turns_tls_on() -> None:
    assert parse("rediss://localhost:6380").tls is True


def test_ipv6_host() -> None:
    assert parse("redis://[::1]:7000/0").hosts == (("::1", 7000),)


def test_unix_socket_forms() -> None:
    t = parse("redis+socket:///var/run/redis.sock")
    assert (t.socket_path, t.db, t.password) == ("/var/run/redis.sock", 0, None)
    t = parse("redis+socket://pw@/tmp/r.sock:/4")
    assert (t.socket_path, t.db, t.password) == ("/tmp/r.sock", 4, "pw")
    t = parse("redis+socket://user:pw@/tmp/r.sock")
    assert (t.username, t.password) == ("user", "pw")


def test_several_hosts_mean_cluster() -> None:
    t = parse("redis://a:7000,b:7001,redis://c:7002")
    assert t.cluster is True
    assert t.hosts == (("a", 7000), ("b", 7001), ("c", 7002))
    t = parse("redis://pw@a:7000,b:7001")
    assert t.password == "pw"


def test_cluster_mode_flag() -> None:
    assert parse("redis://a:7000", cluster_mode=True).cluster is True


def test_sentinel_master_name() -> None:
    t = parse("redis://pw@s1:26379,s2:26379/2", master_name="mymaster", sentinel_password="spw")
    assert (t.master_name, t.sentinel_password, t.db, t.password) == ("mymaster", "spw", 2, "pw")
    assert t.cluster is False and t.hosts == (("s1", 26379), ("s2", 26379))


@pytest.mark.parametrize(
    ("url", "redis", "fragment"),
    [
        ("redis://localhost:notaport", {}, "port"),
        ("redis://localhost:70000", {}, "port"),
        ("redis://localhost/abc", {}, "database must be a number"),
        ("redis://", {}, "missing host"),
        ("redis://a:1,b:2/3", {}, "only db 0"),
        ("redis://a:1", {"cluster_mode": True, "master_name": "m"}, "redis.master_name"),
        ("redis+socket://relative.sock", {}, "redis+socket://"),
        ("redis://localhost?db=1", {}, "query strings"),
        ("http://localhost", {}, "redis://"),
    ],
)
def test_bad_urls_name_the_field(url: str, redis: dict[str, object], fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(url, **redis)
    assert fragment in str(info.value)
    assert "broker" in str(info.value) or "redis." in str(info.value)


def test_password_is_not_echoed_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        parse("redis://user:hunter2@localhost:bad")
    assert "hunter2" not in str(info.value)


def test_registry_builds_drivers_without_connecting() -> None:
    cnf = Config(broker="redis://127.0.0.1:1/0", result_backend="rediss://127.0.0.1:1/0")
    broker = make_broker(cnf)
    backend = make_backend(cnf)
    assert type(broker).__name__ == "RedisBroker" and broker.lease_seconds
    assert type(backend).__name__ == "RedisBackend" and backend.target.tls  # type: ignore[attr-defined]
    with pytest.raises(ConfigError, match="result_backend"):
        make_backend(Config(result_backend="redis://localhost/x"))


@pytest.mark.parametrize("key", ["machinery_tasks", "delayed_tasks", "task_0c1f", "group_x", "q{tag}x"])
def test_tagged_keys_share_the_slot(key: str) -> None:
    aux = tagged(key, ":machinery:inflight")
    assert key_slot(aux.encode()) == key_slot(key.encode())


def test_cluster_broker_refuses_queue_names_it_cannot_colocate() -> None:
    from machinery.drivers.redis.broker import RedisBroker
    from machinery.errors import BrokerError

    broker = RedisBroker(Config(broker="redis://127.0.0.1:1,127.0.0.1:2"))
    broker._queue_keys("fine{tag}")
    with pytest.raises(BrokerError, match="hash tag"):
        broker._queue_keys("a}b{")


def test_connections_pack_commands_byte_for_byte_as_redis_py() -> None:
    import redis.asyncio as aioredis

    from machinery.drivers.redis.client import _timer_bounded

    ours, theirs = _timer_bounded(aioredis.Connection)(), aioredis.Connection()
    assert ours._packer is not None and ours._pack is not None  # hiredis is a dependency: its C packer runs
    big = b"x" * 100_000  # past redis-py's chunking cutoff
    commands = [
        ("BLMOVE", "q", "{q}:landing", "LEFT", "RIGHT", 0.499),
        ("EVALSHA", "ab" * 20, 2, "k1", "k2", 1795849668912605743, -3, 1e-05),
        ("SCRIPT LOAD", "return 1"),
        (b"CLIENT SETNAME", "n"),
        (b"GET", b"k"),
        ("RPUSH", "q", "é", big, memoryview(b"view"), bytearray(b"array")),
    ]
    from redis.exceptions import DataError

    packable = []
    for cmd in commands:
        try:
            expected = b"".join(theirs.pack_command(*cmd))
        except DataError:  # older redis-py with hiredis 3 refuses memoryview and bytearray: so must we
            with pytest.raises(DataError):
                ours.pack_command(*cmd)
            continue
        assert b"".join(ours.pack_command(*cmd)) == expected
        packable.append(cmd)
    assert len(packable) >= len(commands) - 1
    assert b"".join(ours.pack_commands(packable)) == b"".join(theirs.pack_commands(packable))
