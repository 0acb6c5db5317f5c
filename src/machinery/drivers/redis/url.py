"""Redis URLs as Go Machinery reads them (redis://, rediss://, redis+socket://, several hosts for a
Cluster, cnf.redis.master_name for Sentinel), parsed into where and how to connect."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import unquote

from machinery.errors import ConfigError

if TYPE_CHECKING:
    from machinery.config import Config

SCHEMES = ("redis", "rediss", "redis+socket")


@dataclass(frozen=True, slots=True)
class RedisTarget:
    """Where and how to connect, parsed from a Go Machinery style Redis URL plus cnf.redis."""

    scheme: str
    hosts: tuple[tuple[str, int], ...] = ()
    db: int = 0
    username: str | None = None
    password: str | None = None
    socket_path: str = ""
    tls: bool = False
    cluster: bool = False
    master_name: str = ""
    sentinel_password: str | None = None


# --- URL parsing ---------------------------------------------------------------------------


def parse_redis_url(url: str, cnf: Config, field: str) -> RedisTarget:
    """Parse redis://, rediss:// or redis+socket:// as Go Machinery does (userinfo without ':' is the password).

    Several comma-separated hosts (or cnf.redis.cluster_mode) mean Redis Cluster; with
    cnf.redis.master_name they are Sentinels instead. Errors name the config field.
    """
    scheme, sep, rest = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in SCHEMES:
        raise ConfigError(f"config field {field}: expected a redis://, rediss:// or redis+socket:// URL, got {url!r}")
    if "?" in rest or "#" in rest:
        raise ConfigError(f"config field {field}: query strings and fragments are not supported in {_redact(url)}")
    if scheme == "redis+socket":
        return _parse_socket(rest, url, cnf, field)
    parts = [p.strip() for p in rest.split(",")]
    hosts: list[tuple[str, int]] = []
    username: str | None = None
    password: str | None = None
    db = 0
    for i, raw in enumerate(parts):
        part = raw
        if "://" in raw:
            other, _, part = raw.partition("://")
            if other.lower() != scheme:
                raise ConfigError(f"config field {field}: mixed schemes in {_redact(url)}")
        userinfo, at, hostpart = part.rpartition("@")
        if at:
            user, pw = _userinfo(userinfo)
            username = username if user is None else user
            password = password if pw is None else pw
        hostport, slash, path = hostpart.partition("/")
        if slash and path:
            if i != len(parts) - 1 and len(parts) > 1:
                raise ConfigError(f"config field {field}: the /db goes after the last host in {_redact(url)}")
            db = _db(path, url, field)
        hosts.append(_host_port(hostport, url, field))
    master = cnf.redis.master_name
    cluster = cnf.redis.cluster_mode or (len(hosts) > 1 and not master)  # with Sentinel: several sentinels
    if cnf.redis.cluster_mode and master:
        raise ConfigError(
            f"config field redis.master_name: Sentinel ({master!r}) and Redis Cluster cannot be combined "
            f"({field} = {_redact(url)})"
        )
    if cluster and db:
        raise ConfigError(f"config field {field}: Redis Cluster has only db 0, got /{db} in {_redact(url)}")
    return RedisTarget(
        scheme=scheme, hosts=tuple(hosts), db=db, username=username, password=password,
        tls=scheme == "rediss", cluster=cluster, master_name=master,
        sentinel_password=cnf.redis.sentinel_password or None,
    )


def _parse_socket(rest: str, url: str, cnf: Config, field: str) -> RedisTarget:
    at = rest.rfind("@/")
    username = password = None
    if at >= 0:
        username, password = _userinfo(rest[:at])
        path = rest[at + 1:]
    elif rest.startswith("/"):
        path = rest
    else:
        raise ConfigError(
            f"config field {field}: expected redis+socket://[password@]/path/to.sock[:/db], got {_redact(url)}"
        )
    db = 0
    head, colon, tail = path.rpartition(":/")
    if colon and tail.isdigit():
        path, db = head, _db(tail, url, field)
    if not path or path == "/":
        raise ConfigError(f"config field {field}: missing socket path in {_redact(url)}")
    if cnf.redis.cluster_mode or cnf.redis.master_name:
        raise ConfigError(f"config field {field}: a unix socket cannot be a Redis Cluster or a Sentinel")
    return RedisTarget(scheme="redis+socket", db=db, username=username, password=password, socket_path=path)


def _userinfo(text: str) -> tuple[str | None, str | None]:
    if ":" in text:
        user, _, pw = text.partition(":")
        return (unquote(user) or None), unquote(pw)
    return None, (unquote(text) if text else None)


def _host_port(text: str, url: str, field: str) -> tuple[str, int]:
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"config field {field}: unclosed '[' in {_redact(url)}")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ConfigError(f"config field {field}: bad host {text!r} in {_redact(url)}")
    else:
        host, _, port_text = text.partition(":")
    if not host:
        raise ConfigError(f"config field {field}: missing host in {_redact(url)}")
    if not port_text:
        return host, 6379
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"config field {field}: port must be 1..65535, got {port_text!r} in {_redact(url)}")
    return host, int(port_text)


def _db(text: str, url: str, field: str) -> int:
    if not text.isdigit():
        raise ConfigError(f"config field {field}: the database must be a number, got {text!r} in {_redact(url)}")
    return int(text)


def _redact(url: str) -> str:
    scheme, sep, rest = url.partition("://")
    if "@" not in rest:
        return url
    return f"{scheme}{sep}***@{rest.rpartition('@')[2]}"
