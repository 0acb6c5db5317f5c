"""The blocking face of the Redis result backend: send one task, read a state, wait for a result,
in the caller's thread.

Other sync calls hand their coroutine to the portal's event-loop thread. For one short command
that hand-over (two thread wake-ups, two GIL hand-overs) costs more CPU than the command itself:
in our measurements it halves the cost of a sync send and cuts a third of the client's CPU per
send-and-wait. These calls use redis-py's blocking client in the caller's thread instead, with
the same scripts, keys and encodings as the asyncio face, and the same wait protocol (waits.py),
so either face reads what the other wrote. Standalone Redis only (TCP, Unix socket, TLS);
Sentinel and Cluster take the asyncio path.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from machinery.drivers.capabilities import BlockingReads
from machinery.drivers.redis import internals
from machinery.drivers.redis.client import (
    UNLIMITED_CONNECTIONS,
    Client,
    LuaScript,
    client_options,
    reworded,
    wrap_blocking_errors,
)
from machinery.drivers.redis.waits import Caller, Step, Wait, channel_of
from machinery.errors import BackendError
from machinery.tasks.state import TaskState, decode_state

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.drivers.redis.url import RedisTarget

def create_blocking_client(t: RedisTarget, cnf: Config) -> Client:
    """A blocking (thread-safe, pooled) redis-py client for a standalone server, for the sync
    facade's direct calls (Sentinel and Cluster take the asyncio path)."""
    import redis
    from redis.retry import Retry

    kwargs: dict[str, Any] = dict(client_options(t, cnf, Retry), db=t.db,
                                  max_connections=cnf.redis.max_active or UNLIMITED_CONNECTIONS)
    if t.socket_path:
        pool = redis.ConnectionPool(connection_class=redis.UnixDomainSocketConnection, path=t.socket_path,
                                    **kwargs)
    else:
        host, port = t.hosts[0]
        base, tls_options = internals.blocking_tls_class(cnf.tls) if t.tls else (redis.Connection, {})
        pool = redis.ConnectionPool(host=host, port=port, connection_class=base, **kwargs, **tls_options)
    return redis.Redis(connection_pool=pool)


class BlockingClient:
    """Blocking calls on one standalone server for the sync facade's direct calls, made on first
    use. Each thread keeps its own connection: one command costs a write and a read, without
    redis-py's per-command pool checkout (half the cost of a small command). Raises redis-py's
    errors; callers word them for their driver."""

    def __init__(self, target: RedisTarget, cnf: Config) -> None:
        self._target = target
        self._cnf = cnf
        self._client: Client | None = None
        self._made = threading.Lock()
        self._local = threading.local()
        self._conns: weakref.WeakSet[Any] = weakref.WeakSet()  # to close them all; a dead thread's go with it

    @property
    def available(self) -> bool:
        """False for Sentinel and Cluster: their callers take the asyncio path."""
        return not self._target.cluster and not self._target.master_name

    def get(self) -> Client:
        """The pooled client (its pool's settings make the per-thread connections)."""
        if self._client is None:
            with self._made:
                if self._client is None:
                    self._client = create_blocking_client(self._target, self._cnf)
        return self._client

    def call(self, *args: Any) -> Any:
        """One command on this thread's connection, retried on connection errors as configured."""
        conn = self._conn()
        return conn.retry.call_with_retry(lambda: _round_trip(conn, args), lambda _error: conn.disconnect())

    def script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return script.run_blocking(self.call, keys, args)

    def _conn(self) -> Any:
        local = self._local
        conn = getattr(local, "conn", None)
        if conn is None or local.pid != os.getpid():
            pool = self.get().connection_pool
            conn = local.conn = pool.connection_class(**pool.connection_kwargs)
            local.pid = os.getpid()
            self._conns.add(conn)
        return conn

    def close(self) -> None:
        """Close every connection; the next call opens new ones."""
        client, self._client = self._client, None
        if client is not None:
            client.connection_pool.disconnect()
        for conn in list(self._conns):
            conn.disconnect()


def _round_trip(conn: Any, args: tuple[Any, ...]) -> Any:
    conn.send_packed_command(conn.pack_command(*args))
    return conn.read_response()


_wrap = wrap_blocking_errors(BackendError, "redis backend")


class _Late(Exception):
    """No reply within the wait's deadline."""


class _Subscriber:
    """A thread's own two connections for waits: one subscribed, one for GETs. They do not retry
    on their own (the wait retries within its deadline), so a dead server cannot stretch a wait.

    A finished wait stays subscribed to its channel: the next wait unsubscribes from it in the
    same write as its own SUBSCRIBE, one write per wait instead of two. Messages of that old
    channel (a task whose state is stored again) are read and skipped by the next wait.

    `ahead` is the channel a send subscribed to ahead of itself, until its wait takes it."""

    __slots__ = ("ahead", "conn", "pid", "stale", "sub")

    def __init__(self, shared: Client) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        base = shared.connection_pool
        # RESP2: pub/sub replies are plain arrays here (RESP3 pushes go through redis-py's push
        # handlers, which differ between its versions; so do its RESP3-only maintenance hooks)
        kwargs = {k: v for k, v in base.connection_kwargs.items() if not k.startswith("maint_notifications")}
        kwargs.update(retry=Retry(NoBackoff(), 0), protocol=2)
        pool = redis.ConnectionPool(connection_class=base.connection_class, max_connections=2, **kwargs)
        self.pid = os.getpid()
        self.sub: Any = pool.get_connection()
        self.conn: Any = pool.get_connection()
        self.stale: bytes | None = None  # the channel the last wait left subscribed
        self.ahead: bytes | None = None

    def subscribe(self, channel: bytes) -> None:
        conn = self.sub
        packed = conn.pack_command("UNSUBSCRIBE", self.stale) if self.stale is not None else []
        self.stale = self.ahead = None  # unknown until the write is through
        conn.send_packed_command([*packed, *conn.pack_command("SUBSCRIBE", channel)])
        self.stale = channel

    def take_ahead(self, channel: bytes) -> bool:
        """True once if a send subscribed to this channel ahead of itself (its confirmation is
        on its way or unread)."""
        ahead, self.ahead = self.ahead == channel, None
        return ahead

    def message(self, timeout: float) -> tuple[bytes, bytes, Any] | None:
        """The next pub/sub reply (kind, channel, data) within `timeout` seconds, or None."""
        conn = self.sub
        if not conn.can_read(timeout=timeout):
            return None
        reply = conn.read_response()
        if not isinstance(reply, list) or len(reply) != 3:
            return None
        kind, channel, data = reply
        return kind, channel, data

    def read(self, key: str, budget: float | None) -> TaskState | None:
        """GET `key`, giving up (_Late) when no reply comes within `budget` seconds."""
        conn = self.conn
        if budget is not None and not internals.is_connected(conn):
            _connect_within(conn, budget)
        conn.send_command("GET", key)
        if budget is not None and not conn.can_read(timeout=max(budget, 0.0)):
            conn.disconnect()  # the late reply must not be read as the next command's
            raise _Late
        raw = conn.read_response()
        return decode_state(raw) if raw is not None else None

    def close(self) -> None:
        try:
            self.sub.disconnect()
        finally:
            self.conn.disconnect()


def _connect_within(conn: Any, budget: float) -> None:
    """Connect (again, after a late reply dropped the connection) within `budget` seconds; the
    configured timeouts (15 s by default) would stretch a wait past its deadline on a stalled
    server. A refused connection is raised as it is: the wait retries those."""
    from redis.exceptions import TimeoutError as RTimeoutError

    saved = conn.socket_timeout, conn.socket_connect_timeout
    conn.socket_timeout = conn.socket_connect_timeout = max(budget, 0.001)
    try:
        conn.connect()
    except RTimeoutError:
        conn.disconnect()
        raise _Late from None
    finally:
        conn.socket_timeout, conn.socket_connect_timeout = saved
    internals.restore_socket_timeout(conn, saved[0])


class BlockingRedis(BlockingReads):
    """Blocking calls on one Redis server, made lazily: nothing connects until first used. Each
    thread is a caller of the wait protocol (waits.py): it keeps its own send-ahead state and its
    own wait connections."""

    def __init__(self, target: RedisTarget, cnf: Config) -> None:
        self._shared = BlockingClient(target, cnf)
        self._local = threading.local()

    @property
    def available(self) -> bool:
        return self._shared.available

    def client(self) -> Client:
        return self._shared.get()

    @_wrap
    def script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._shared.script(script, keys, args)

    def _caller(self) -> Caller:
        caller: Caller | None = getattr(self._local, "caller", None)
        if caller is None:
            caller = self._local.caller = Caller()
        return caller

    @_wrap
    def send(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Run the send script (KEYS[1] the task's uuid; an extra ARGV, the channel, makes it
        return the channel's subscriber count), subscribed ahead when this thread waits for what
        it sends."""
        caller = self._caller()
        channel = channel_of(keys[0])
        sub = self._subscribe_ahead(channel) if caller.before_send(channel) else None
        if sub is None:
            self._shared.script(script, keys, args)
            return
        caller.after_send(channel, int(self._shared.script(script, keys, [*args, channel])))

    def _subscribe_ahead(self, channel: bytes) -> _Subscriber | None:
        from redis.exceptions import ConnectionError as RConnectionError
        from redis.exceptions import TimeoutError as RTimeoutError

        sub: _Subscriber | None = None
        try:
            sub = self._subscriber()
            sub.subscribe(channel)
        except (RConnectionError, RTimeoutError, OSError):
            self._drop(sub)  # the send goes out all the same; its wait subscribes again
            return None
        sub.ahead = channel
        return sub

    @_wrap
    def get_state(self, task_uuid: str) -> TaskState | None:
        raw = self._shared.call("GET", task_uuid)
        return decode_state(raw) if raw is not None else None

    def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        """Wait for SUCCESS or FAILURE; None when `timeout` passes first (waits.py says how).

        Connection errors are retried until the deadline; the last one is raised if the server
        never answered.
        """
        from redis.exceptions import ConnectionError as RConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RTimeoutError

        deadline = None if timeout is None else time.monotonic() + timeout
        channel = channel_of(task_uuid)
        watched = self._caller().before_wait(channel)
        backoff = 0.05
        while True:
            sub: _Subscriber | None = None
            try:
                sub = self._subscriber()
                state = self._wait(sub, channel, task_uuid, deadline, watched)
            except (RConnectionError, RTimeoutError, OSError) as exc:
                self._drop(sub)
                watched = False  # a new connection: subscribe again
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise reworded(BackendError, "redis backend wait_completed", exc) from exc
                time.sleep(backoff if left is None else min(backoff, left))
                backoff = min(backoff * 2, 1.0)
                continue
            except RedisError as exc:
                self._drop(sub)
                raise reworded(BackendError, "redis backend wait_completed", exc) from exc
            except BaseException:
                self._drop(sub)  # interrupted mid-read: the connections' state is unknown
                raise
            return state  # still subscribed: the next wait unsubscribes in its own SUBSCRIBE's write

    def _wait(self, sub: _Subscriber, channel: bytes, task_uuid: str, deadline: float | None,
              watched: bool) -> TaskState | None:
        ahead = sub.take_ahead(channel)
        if not ahead:
            sub.subscribe(channel)
        wait = Wait(deadline, time.monotonic(), watched and ahead)
        while True:
            step, seconds = wait.next(time.monotonic())
            if step is Step.LAST_LOOK:
                return Wait.outcome(self._read(sub, task_uuid, seconds))
            if step is Step.READ:
                budget = None if deadline is None else deadline - time.monotonic()
                if (state := Wait.outcome(self._read(sub, task_uuid, budget))) is not None:
                    return state
                continue
            msg = sub.message(max(seconds, 0.0))
            if msg is None or msg[1] != channel:
                continue  # nothing yet, or the previous wait's channel
            kind, _, data = msg
            if kind == b"message":
                if (state := Wait.published(data)) is not None:
                    return state
            elif kind == b"subscribe":
                wait.confirmation()

    @staticmethod
    def _read(sub: _Subscriber, task_uuid: str, budget: float | None) -> TaskState | None:
        try:
            return sub.read(task_uuid, budget)
        except _Late:
            return None  # the deadline came first; the wait returns at its next step

    def _subscriber(self) -> _Subscriber:
        sub: _Subscriber | None = getattr(self._local, "sub", None)
        if sub is None or sub.pid != os.getpid():
            sub = self._local.sub = _Subscriber(self.client())
        return sub

    def _drop(self, sub: _Subscriber | None) -> None:
        if sub is None:
            return
        try:
            sub.close()
        except Exception:
            pass
        if getattr(self._local, "sub", None) is sub:
            self._local.sub = None

    def close(self) -> None:
        """Close the shared pool's connections; threads' wait connections close with their
        threads, or on their next error."""
        self._shared.close()
