"""The sync facade's direct Redis calls: send one task, read a state, wait for a result.

Other sync calls hand their coroutine to the portal's event-loop thread. For one short command
that hand-over (two thread wake-ups, two GIL hand-overs) costs more CPU than the command itself:
in our measurements it halves the cost of a sync send and cuts a third of the client's CPU per
send-and-wait. These calls use redis-py's blocking client in the caller's thread instead, with
the same scripts, keys, encodings and completion channel as the asyncio path, so either side
reads what the other wrote. Standalone Redis only (TCP, Unix socket, TLS); Sentinel and Cluster
take the asyncio path.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from machinery.drivers.capabilities import BlockingReads
from machinery.drivers.redis.client import BlockingClient, Client, LuaScript, wrap_blocking_errors
from machinery.errors import BackendError
from machinery.tasks.state import TaskState, decode_state

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.drivers.redis.client import RedisTarget

#: seconds between re-reads of a waited-for state: states written by Go are not published
RECHECK_FIRST, RECHECK_MAX = 0.25, 1.0
#: how long the last look at the deadline may take (a state stored just before it still counts)
LAST_LOOK = 0.1


_wrap = wrap_blocking_errors(BackendError, "redis backend")


class _Late(Exception):
    """No reply within the wait's deadline."""


class _Subscriber:
    """A thread's own two connections for waits: one subscribed, one for GETs. They do not retry
    on their own (the wait retries within its deadline), so a dead server cannot stretch a wait.

    A finished wait stays subscribed to its channel: the next wait unsubscribes from it in the
    same write as its own SUBSCRIBE, one write per wait instead of two. Messages of that old
    channel (a task whose state is stored again) are read and skipped by the next wait.

    `watched` is the channel a send subscribed to ahead of itself, once the send's script saw
    that subscription in place: its wait needs neither a SUBSCRIBE nor a GET."""

    __slots__ = ("conn", "pid", "stale", "sub", "watched")

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
        self.watched: bytes | None = None

    def subscribe(self, channel: bytes) -> None:
        conn = self.sub
        packed = conn.pack_command("UNSUBSCRIBE", self.stale) if self.stale is not None else []
        self.stale = self.watched = None  # unknown until the write is through
        conn.send_packed_command([*packed, *conn.pack_command("SUBSCRIBE", channel)])
        self.stale = channel

    def take_watched(self, channel: bytes) -> bool:
        """True once if a send proved this channel subscribed before the task went out."""
        watched, self.watched = self.watched == channel, None
        return watched

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
        if budget is not None and getattr(conn, "_sock", None) is None:
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
    conn._sock.settimeout(saved[0])  # the socket keeps the timeout it was made with


class BlockingRedis(BlockingReads):
    """Blocking calls on one Redis server, made lazily: nothing connects until first used.

    A thread that waits for each task it sends before sending the next (send-and-wait, the RPC
    pattern) gets its sends subscribed ahead: the send writes SUBSCRIBE on the thread's wait
    connection just before the task goes out on the other, and the send's script reports the
    channel's subscriber count. Seen subscribed, the wait only reads the PUBLISH: one round trip
    per send-and-wait instead of three. A thread that sends twice without waiting stops doing it,
    so bulk senders pay nothing; one that never subscribed in time falls back to SUBSCRIBE + GET.
    """

    def __init__(self, target: RedisTarget, cnf: Config, channel_prefix: str) -> None:
        self._shared = BlockingClient(target, cnf)
        self._prefix = channel_prefix
        self._local = threading.local()

    @property
    def available(self) -> bool:
        return self._shared.available

    def client(self) -> Client:
        return self._shared.get()

    @_wrap
    def script(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> Any:
        return self._shared.script(script, keys, args)

    @_wrap
    def send(self, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Run the send script (KEYS[1] the task's uuid; an extra ARGV, the channel, makes it
        return the channel's subscriber count), subscribed ahead when this thread is armed."""
        local = self._local
        channel = (self._prefix + keys[0]).encode()
        if getattr(local, "sent", None) is not None:
            local.armed = False  # the previous send was not waited for: not send-and-wait
        sub = self._subscribe_ahead(channel) if getattr(local, "armed", False) else None
        local.sent = channel
        if sub is None:
            self._shared.script(script, keys, args)
        elif self._shared.script(script, keys, [*args, channel]):
            sub.watched = channel

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
        return sub

    @_wrap
    def get_state(self, task_uuid: str) -> TaskState | None:
        raw = self._shared.call("GET", task_uuid)
        return decode_state(raw) if raw is not None else None

    def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        """Wait for SUCCESS or FAILURE; None when `timeout` passes first.

        Subscribes to the task's completion channel, reads the state once subscribed (one stored
        before is read, one stored after is published to us), then waits for the PUBLISH,
        re-reading on a back-off. Connection errors are retried until the deadline; the last one
        is raised if the server never answered.
        """
        from redis.exceptions import ConnectionError as RConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RTimeoutError

        deadline = None if timeout is None else time.monotonic() + timeout
        channel = (self._prefix + task_uuid).encode()
        local = self._local
        local.armed = getattr(local, "sent", None) == channel  # waits for what it just sent
        local.sent = None
        backoff = 0.05
        while True:
            sub: _Subscriber | None = None
            try:
                sub = self._subscriber()
                state = self._wait(sub, channel, task_uuid, deadline, sub.take_watched(channel))
            except (RConnectionError, RTimeoutError, OSError) as exc:
                self._drop(sub)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise BackendError(f"redis backend wait_completed: {type(exc).__name__}: {exc}") from exc
                time.sleep(backoff if left is None else min(backoff, left))
                backoff = min(backoff * 2, 1.0)
                continue
            except RedisError as exc:
                self._drop(sub)
                raise BackendError(f"redis backend wait_completed: {type(exc).__name__}: {exc}") from exc
            except BaseException:
                self._drop(sub)  # interrupted mid-read: the connections' state is unknown
                raise
            return state  # still subscribed: the next wait unsubscribes in its own SUBSCRIBE's write

    def _wait(self, sub: _Subscriber, channel: bytes, task_uuid: str, deadline: float | None,
              watched: bool) -> TaskState | None:
        if not watched:
            sub.subscribe(channel)
        confirmed = watched  # subscribed before the task went out: nothing stored to read first
        recheck = RECHECK_FIRST
        next_read = time.monotonic() + recheck
        while True:
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return self._last_look(sub, task_uuid)
            if confirmed and now >= next_read:
                stored = self._read(sub, task_uuid, deadline)
                if stored is not None and stored.is_completed():
                    return stored
                recheck = min(recheck * 2, RECHECK_MAX)
                next_read = time.monotonic() + recheck
                continue
            step = next_read - now
            if deadline is not None:
                step = min(step, deadline - now)
            msg = sub.message(max(step, 0.0))
            if msg is None or msg[1] != channel:
                continue  # nothing yet, or the previous wait's channel
            kind, _, data = msg
            if kind == b"message":
                published = decode_state(data)
                if published.is_completed():
                    return published
            elif kind == b"subscribe" and not confirmed:
                # Subscribed: read what was stored before.
                confirmed = True
                stored = self._read(sub, task_uuid, deadline)
                if stored is not None and stored.is_completed():
                    return stored

    def _read(self, sub: _Subscriber, task_uuid: str, deadline: float | None) -> TaskState | None:
        try:
            return sub.read(task_uuid, None if deadline is None else deadline - time.monotonic())
        except _Late:
            return None  # the deadline came first; the loop returns at its next check

    def _last_look(self, sub: _Subscriber, task_uuid: str) -> TaskState | None:
        try:
            stored = sub.read(task_uuid, LAST_LOOK)
        except _Late:
            return None
        return stored if stored is not None and stored.is_completed() else None

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
