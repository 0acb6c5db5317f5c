"""Redis plumbing shared by the Redis broker, backend and lock: asyncio clients, connections of
their own (Lane), pipelined batches, scripts, key tags and error wording.

Nothing here imports redis-py at module level, so importing it is free; the clients are created
per event loop by the drivers (redis.asyncio clients are bound to the loop that made them). URLs
are parsed in url.py; the blocking client of the sync facade is in blocking.py.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from machinery.drivers.redis import internals
from machinery.drivers.redis.url import RedisTarget
from machinery.errors import MachineryError

if TYPE_CHECKING:
    from machinery.config import Config

P = ParamSpec("P")
R = TypeVar("R")

#: a redis.asyncio Redis or RedisCluster; typed loosely because redis-py's sync/async overloads
#: do not narrow well under mypy --strict
Client = Any


# --- clients -------------------------------------------------------------------------------


def client_options(t: RedisTarget, cnf: Config, retry_class: type[Any]) -> dict[str, Any]:
    """Client options both kinds of client share (timeouts, credentials, retries)."""
    from redis.backoff import ExponentialWithJitterBackoff
    from redis.exceptions import ConnectionError as RConnectionError
    from redis.exceptions import TimeoutError as RTimeoutError

    r = cnf.redis
    return {
        "username": t.username,
        "password": t.password,
        "socket_timeout": float(r.read_timeout) or None,
        "socket_connect_timeout": float(r.connect_timeout) or None,
        "client_name": r.client_name or None,
        "retry": retry_class(ExponentialWithJitterBackoff(base=0.05, cap=1.0), 5,
                             supported_errors=(RConnectionError, RTimeoutError)),
    }


#: a pool size that never binds (redis-py 5's own default)
UNLIMITED_CONNECTIONS = 2**31


def create_client(t: RedisTarget, cnf: Config) -> Client:
    """A redis.asyncio client (standalone, socket, Sentinel master or Cluster) for the current loop."""
    import redis.asyncio as aioredis
    from redis.asyncio.retry import Retry

    r = cnf.redis
    common = client_options(t, cnf, Retry)
    if t.cluster:
        from redis.asyncio.cluster import ClusterNode, RedisCluster

        if t.tls:
            common.update(ssl=True, **internals.ssl_options(cnf.tls))
        return RedisCluster(startup_nodes=[ClusterNode(h, p) for h, p in t.hosts],
                            max_connections=r.max_active or 1000, **common)
    if t.master_name:
        from redis.asyncio.sentinel import Sentinel

        sentinel_kwargs = {"password": t.sentinel_password, "socket_timeout": common["socket_timeout"],
                           "socket_connect_timeout": common["socket_connect_timeout"]}
        if t.tls:
            common.update(ssl=True)
        sentinel_class: Any = Sentinel  # typed in some redis-py releases, not in others
        sentinel = sentinel_class(list(t.hosts), sentinel_kwargs=sentinel_kwargs, db=t.db, **common)
        return sentinel.master_for(t.master_name, max_connections=r.max_active or UNLIMITED_CONNECTIONS)
    # As Go's MaxActive and Wait: 0 = no limit (redis-py 8's pools default to 100 and then raise,
    # so 200 sends gathered on one loop failed); at the limit, wait for a connection when `wait`
    # is set, else fail with "Too many connections".
    pool_kwargs: dict[str, Any] = dict(common, db=t.db, max_connections=r.max_active or UNLIMITED_CONNECTIONS)
    pool_class: Any = aioredis.ConnectionPool
    if r.max_active and r.wait:
        pool_class = aioredis.BlockingConnectionPool
        pool_kwargs["timeout"] = None
    if t.socket_path:
        pool: Any = pool_class(
            connection_class=_timer_bounded(aioredis.UnixDomainSocketConnection), path=t.socket_path,
            **pool_kwargs)
    else:
        host, port = t.hosts[0]
        base, tls_options = internals.async_tls_class(cnf.tls) if t.tls else (aioredis.Connection, {})
        pool = pool_class(host=host, port=port, connection_class=_timer_bounded(base), **pool_kwargs, **tls_options)
    return aioredis.Redis(connection_pool=pool)


def _hiredis_pack() -> Any:
    """hiredis's own packer (a C function of one tuple), or None without hiredis."""
    try:
        import hiredis
    except ImportError:
        return None
    return hiredis.pack_command


def _timer_bounded(base: type[Any]) -> type[Any]:
    """`base` with each write bounded by asyncio.timeout instead of redis-py's asyncio.wait_for,
    which on Python 3.11 wraps every write in a new Task: a tenth of a round trip's wall time
    in our latency runs. Same bound (socket_timeout), same error, same disconnect."""
    from redis.exceptions import TimeoutError as RTimeoutError

    class TimerBounded(base):  # type: ignore[misc]
        socket_timeout: float | None
        _packer = internals.hiredis_serializer()
        _pack = _hiredis_pack()  # a builtin: not bound as a method
        _utf8: bool | None = None

        def pack_command(self, *args: Any) -> list[bytes]:
            """hiredis packs in C (the blocking client does too): the same bytes, a fraction of
            the time for a batch's tens of thousands of arguments. Called straight for the usual
            arguments (str, bytes, int, float; no space in the command name); redis-py's wrapper,
            which converts the rest and splits names like "SCRIPT LOAD", costs as much again."""
            utf8 = self._utf8
            if utf8 is None:
                utf8 = self._utf8 = self.encoder.encoding.lower().replace("-", "") == "utf8"
            if self._packer is None or self._pack is None or not utf8:
                return list(super().pack_command(*args))
            first = args[0]
            if not (b" " in first if isinstance(first, bytes) else " " in first):
                try:
                    return [self._pack(args)]
                except TypeError:  # a memoryview or bytearray: the wrapper converts it
                    pass
            packed: list[bytes] = self._packer.pack(*args)
            return packed

        async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
            timeout = self.socket_timeout
            if not timeout:
                await super().send_packed_command(command, check_health)
                return
            self.socket_timeout = None  # the parent then writes inline; the timer below bounds it
            try:
                async with asyncio.timeout(timeout):
                    await super().send_packed_command(command, check_health)
            except TimeoutError:
                await self.disconnect(nowait=True)
                raise RTimeoutError("Timeout writing to socket") from None
            finally:
                self.socket_timeout = timeout

    TimerBounded.__name__ = TimerBounded.__qualname__ = f"TimerBounded{base.__name__}"
    return TimerBounded


class Clients:
    """One client per event loop, made ready before its first command.

    A fresh redis-py RedisCluster that receives many commands at once can hand some of them a
    connection its own initialization is closing (AttributeError on `writelines`); initializing it
    once, alone, avoids that.
    """

    def __init__(self, target: RedisTarget, cnf: Config) -> None:
        from machinery.loops import PerLoop

        self.target = target
        self.cnf = cnf
        self._items: PerLoop[_Entry] = PerLoop()

    async def get(self) -> Client:
        entry = self._items.get(lambda: _Entry(create_client(self.target, self.cnf)))
        if not entry.ready:
            async with entry.lock:
                if not entry.ready:
                    if self.target.cluster:
                        await entry.client.initialize()
                    entry.ready = True
        return entry.client

    async def close(self) -> None:
        """Close the current loop's client."""
        entry = self._items.pop_current()
        if entry is not None:
            await entry.client.aclose()


class _Entry:
    __slots__ = ("client", "lock", "ready")

    def __init__(self, client: Client) -> None:
        self.client = client
        self.lock = asyncio.Lock()
        self.ready = False


# --- keys ----------------------------------------------------------------------------------


def tagged(key: str, suffix: str) -> str:
    """An auxiliary key that lands in the same Redis Cluster hash slot as `key`.

    Go's keys (queue names, task UUIDs) carry no hash tag, so ours wrap the whole key in one:
    the slot of "{machinery_tasks}:x" is the slot of "machinery_tasks".
    """
    start = key.find("{")
    if start >= 0:
        end = key.find("}", start + 1)
        if end > start + 1:
            return key + suffix
    return "{" + key + "}" + suffix


def same_slot(key: str, other: str) -> bool:
    from redis.crc import key_slot

    return bool(key_slot(key.encode()) == key_slot(other.encode()))


# --- scripts -------------------------------------------------------------------------------


class LuaScript:
    """A Lua script run with EVALSHA, loaded on NOSCRIPT (also inside pipelines, without redis-py's
    per-pipeline SCRIPT EXISTS round trip)."""

    __slots__ = ("sha", "src")

    def __init__(self, src: str) -> None:
        self.src = src
        self.sha = hashlib.sha1(src.encode()).hexdigest()

    def evalsha(self, keys: Sequence[Any], args: Sequence[Any]) -> tuple[Any, ...]:
        """The command that runs this script."""
        return ("EVALSHA", self.sha, len(keys), *keys, *args)

    async def run(self, call: Callable[..., Awaitable[Any]], keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """EVALSHA through `call` (a connection's command call); on NOSCRIPT, load it and again."""
        from redis.exceptions import NoScriptError

        try:
            return await call(*self.evalsha(keys, args))
        except NoScriptError:
            await call("SCRIPT", "LOAD", self.src)
            return await call(*self.evalsha(keys, args))

    def run_blocking(self, call: Callable[..., Any], keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """run() for a blocking connection's command call."""
        from redis.exceptions import NoScriptError

        try:
            return call(*self.evalsha(keys, args))
        except NoScriptError:
            call("SCRIPT", "LOAD", self.src)
            return call(*self.evalsha(keys, args))

    async def __call__(self, client: Client, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        """Run on a pooled client (a cluster client routes the script, and loads it, by its keys)."""
        from redis.exceptions import NoScriptError

        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            await client.script_load(self.src)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


class Lane:
    """A connection of its own for one sequence of commands (a worker's fetch loop, its commit
    loop): a write and a read per command, without the pool's checkout and the client's
    per-command wrappers, which cost about as much CPU as the command. While busy (another caller
    on the same loop) and for Sentinel or Cluster, calls go through the pooled client instead.
    Connection errors are retried as the client retries them."""

    def __init__(self, client: Client, target: RedisTarget) -> None:
        self.client = client
        self._conn: Any = None
        if not target.cluster and not target.master_name:
            pool = client.connection_pool
            self._conn = pool.connection_class(**pool.connection_kwargs)
        self._busy = False

    @property
    def free(self) -> bool:
        """Whether calls can go on our own connection now."""
        return self._conn is not None and not self._busy

    async def _exclusive(self, run: Callable[[Any], Awaitable[Any]]) -> Any:
        """`run(connection)` on our own connection (check `free` first), retried as the client retries."""
        conn = self._conn
        self._busy = True
        try:
            return await conn.retry.call_with_retry(lambda: run(conn), lambda _error: conn.disconnect())
        finally:
            self._busy = False

    async def call(self, *args: Any) -> Any:
        if not self.free:
            return await self.client.execute_command(*args)
        return await self._exclusive(lambda conn: _lane_round_trip(conn, args))

    async def pipeline(self, commands: Sequence[tuple[Any, ...]]) -> list[Any] | None:
        """The commands in one write, their replies in order (an error reply in place of its
        result); None while busy or without a connection of our own: use the client's pipeline."""
        if not self.free:
            return None
        result: list[Any] = await self._exclusive(lambda conn: _lane_pipeline(conn, commands))
        return result

    async def script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        if self._conn is None:  # a cluster client routes scripts (and loads them) by their keys
            return await script(self.client, keys, args)
        return await script.run(self.call, keys, args)

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.disconnect()


async def _lane_round_trip(conn: Any, args: tuple[Any, ...]) -> Any:
    await conn.send_packed_command(conn.pack_command(*args))
    return await conn.read_response()


async def _lane_pipeline(conn: Any, commands: Sequence[tuple[Any, ...]]) -> list[Any]:
    from redis.exceptions import ResponseError

    packed: list[bytes] = []
    for args in commands:
        packed += conn.pack_command(*args)
    await conn.send_packed_command(packed)
    results: list[Any] = []
    for _ in commands:
        try:
            results.append(await conn.read_response())
        except ResponseError as exc:  # the reply was read whole: the connection stays in step
            results.append(exc)
    return results


class Batch:
    """Commands and scripts sent in one pipelined round trip (per node in a cluster)."""

    __slots__ = ("ops",)

    def __init__(self) -> None:
        self.ops: list[tuple[LuaScript | None, tuple[Any, ...]]] = []

    def command(self, *args: Any) -> None:
        self.ops.append((None, args))

    def script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        self.ops.append((script, script.evalsha(keys, args)))

    def __len__(self) -> int:
        return len(self.ops)

    async def run(self, client: Client, raise_errors: bool = True, lane: Lane | None = None) -> list[Any]:
        """Results in order; the first error is raised after every command has run (with
        raise_errors False, errors are returned in place of the results instead). With `lane`,
        the commands go on its connection when it is free, in one write (raw replies: no
        response callbacks)."""
        from redis.exceptions import NoScriptError, ResponseError

        if len(self.ops) == 1:  # no pipeline object: redis-py's pipelines cost more than a command
            script, args = self.ops[0]
            try:
                if script is not None:
                    keys, rest = args[3:3 + args[2]], args[3 + args[2]:]
                    return [await (lane.script(script, keys, rest) if lane else script(client, keys, rest))]
                return [await (lane.call(*args) if lane else client.execute_command(*args))]
            except ResponseError as exc:  # what a pipeline would return in place of the result
                if raise_errors:
                    raise
                return [exc]
        results = await _pipeline(client, [a for _, a in self.ops], lane)
        missing = [i for i, r in enumerate(results) if isinstance(r, NoScriptError)]
        if missing:  # a restarted or new node: load, then run only the commands that did not run
            for script in {id(s): s for s, _ in self.ops if s is not None}.values():
                await client.script_load(script.src)
            again = await _pipeline(client, [self.ops[i][1] for i in missing], lane)
            for i, r in zip(missing, again, strict=True):
                results[i] = r
        if not raise_errors:
            return results
        for r in results:
            if isinstance(r, Exception):
                raise r
        return results


async def _pipeline(client: Client, commands: list[tuple[Any, ...]], lane: Lane | None = None) -> list[Any]:
    if lane is not None:
        done = await lane.pipeline(commands)
        if done is not None:
            return done
    pipe = client.pipeline(transaction=False)
    for args in commands:
        pipe.execute_command(*args)
    result: list[Any] = await pipe.execute(raise_on_error=False)
    return result


def cancel_requested() -> bool:
    """True when the current task was cancelled but no CancelledError reached us.

    Python 3.11's asyncio.wait_for, which redis-py uses to send every command, returns the result
    and drops the cancellation when both happen at once; loops that wait call this after each
    command so that cancel() and asyncio.timeout() still stop them.
    """
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


# --- errors --------------------------------------------------------------------------------


Coro = Coroutine[Any, Any, R]


def reworded(error: type[MachineryError], what: str, exc: Exception) -> MachineryError:
    """A redis-py error in the library's own words: `what` says whose call it was."""
    return error(f"{what}: {type(exc).__name__}: {exc}")


def wrap_errors(
    error: type[MachineryError], what: str
) -> Callable[[Callable[P, Coro[R]]], Callable[P, Coro[R]]]:
    """Turn redis-py errors into the library's own (BrokerError / BackendError), keeping the cause."""

    def deco(fn: Callable[P, Coro[R]]) -> Callable[P, Coro[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            from redis.exceptions import RedisError

            try:
                return await fn(*args, **kwargs)
            except RedisError as exc:
                raise reworded(error, f"{what} {fn.__name__}", exc) from exc

        return wrapper

    return deco


def wrap_blocking_errors(error: type[MachineryError], what: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """wrap_errors for the blocking calls: the same wording, the same cause."""

    def deco(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            from redis.exceptions import RedisError

            try:
                return fn(*args, **kwargs)
            except RedisError as exc:
                raise reworded(error, f"{what} {fn.__name__}", exc) from exc

        return wrapper

    return deco
