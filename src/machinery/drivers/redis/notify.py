"""Result waits on Redis: one pub/sub connection per event loop wakes the waiters of each task's
`machinery:done:<uuid>` channel (the result backend PUBLISHes a completed state there)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from machinery.drivers.redis.client import Client


class Waiter:
    __slots__ = ("data", "event")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.data: bytes | None = None

    def wake(self, data: bytes | None) -> None:
        if data is not None:
            self.data = data
        self.event.set()


def _pubsub(client: Client) -> Any:
    """A pub/sub on the client; on a cluster before redis-py 8, whose asyncio cluster client has
    none, a plain connection to one node (Redis Cluster relays every PUBLISH to all nodes)."""
    if hasattr(client, "pubsub"):
        return client.pubsub()
    import redis.asyncio as aioredis

    node: Any = client.get_default_node()  # type: ignore[union-attr,unused-ignore]
    pool = aioredis.ConnectionPool(connection_class=node.connection_class, **node.connection_kwargs)
    return aioredis.Redis(connection_pool=pool).pubsub()


class Notifier:
    """One pub/sub connection per event loop, shared by all waiters on it.

    Every subscribe confirmation (first subscribe, and the resubscribe after a reconnect) wakes the
    channel's waiters to re-read the state, so a completion published while not subscribed is
    still seen. A channel left without waiters stays subscribed for a moment and is then
    unsubscribed together with others in one command: no extra write and reply per wait.
    """

    #: seconds an unwatched channel stays subscribed; more than this many are dropped at once
    linger = 0.05
    max_idle = 500

    def __init__(self, client: Client) -> None:
        self._pubsub = _pubsub(client)
        self._channels: dict[bytes, set[Waiter]] = {}
        self._confirmed: set[bytes] = set()
        self._idle: set[bytes] = set()  # subscribed, nobody waiting: dropped by the next sweep
        self._sweep: asyncio.TimerHandle | None = None
        self._lock = asyncio.Lock()  # orders SUBSCRIBE / UNSUBSCRIBE on the connection
        self._reader: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def add(self, channel: bytes, waiter: Waiter) -> None:
        waiters = self._channels.get(channel)
        if waiters is not None:
            waiters.add(waiter)
            if channel in self._confirmed:
                waiter.wake(None)
            return
        self._channels[channel] = {waiter}
        if channel in self._idle:  # still subscribed: no new SUBSCRIBE
            self._idle.discard(channel)
            if channel in self._confirmed:
                waiter.wake(None)
            return
        self._confirmed.discard(channel)
        try:
            async with self._lock:
                await self._pubsub.subscribe(channel)
        except BaseException:
            self.remove(channel, waiter)
            raise
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    def remove(self, channel: bytes, waiter: Waiter) -> None:
        waiters = self._channels.get(channel)
        if waiters is None:
            return
        waiters.discard(waiter)
        if waiters:
            return
        del self._channels[channel]
        self._idle.add(channel)
        if len(self._idle) >= self.max_idle:
            self._start_sweep()
        elif self._sweep is None:
            self._sweep = asyncio.get_running_loop().call_later(self.linger, self._start_sweep)

    def _start_sweep(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        channels = [c for c in self._idle if c not in self._channels]
        self._idle.clear()
        if not channels:
            return
        self._confirmed.difference_update(channels)
        task = asyncio.get_running_loop().create_task(self._unsubscribe(channels))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _unsubscribe(self, channels: list[bytes]) -> None:
        async with self._lock:
            gone = [c for c in channels if c not in self._channels]  # not taken up again meanwhile
            if gone:
                with contextlib.suppress(Exception):
                    await self._pubsub.unsubscribe(*gone)

    async def _read(self) -> None:
        backoff = 0.05
        while True:
            try:
                msg = await self._pubsub.get_message(timeout=None)
            except asyncio.CancelledError:
                raise
            except Exception:  # connection trouble: redis-py reconnects and resubscribes
                for group in list(self._channels.values()):
                    for w in group:
                        w.wake(None)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if not msg:
                continue
            kind, channel = msg["type"], msg["channel"]
            waiters = self._channels.get(channel)
            if waiters is None:
                continue
            if kind == "message":
                for w in waiters:
                    w.wake(msg["data"])
            elif kind == "subscribe":
                self._confirmed.add(channel)
                for w in waiters:
                    w.wake(None)

    async def close(self) -> None:
        if self._sweep is not None:
            self._sweep.cancel()
            self._sweep = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(BaseException):
                await self._reader
        with contextlib.suppress(Exception):
            await self._pubsub.aclose()
