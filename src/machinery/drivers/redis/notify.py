"""The asyncio face of Redis result waits: one pub/sub connection per event loop (the Notifier)
wakes the waiters of each task's `machinery:done:<uuid>` channel, and AsyncWaits runs the wait
protocol of waits.py over it (blocking.py runs the same protocol in the caller's thread)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

from machinery.drivers.redis.client import cancel_requested
from machinery.drivers.redis.waits import LAST_LOOK, Caller, Step, Wait, channel_of
from machinery.loops import PerLoop
from machinery.tasks.state import decode_state

if TYPE_CHECKING:
    from machinery.drivers.redis.client import Client, Lane, LuaScript
    from machinery.tasks.state import TaskState


class Waiter:
    """What happened on one channel since the waiter last looked."""

    __slots__ = ("confirmations", "data", "event", "interruptions")

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.data: bytes | None = None  # the last message
        self.confirmations = 0  # subscribe confirmations (or found confirmed)
        self.interruptions = 0  # connection trouble: something may have been missed

    def message(self, data: bytes) -> None:
        self.data = data
        self.event.set()

    def confirmed(self) -> None:
        self.confirmations += 1
        self.event.set()

    def interrupted(self) -> None:
        self.interruptions += 1
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

    Every subscribe confirmation (first subscribe, and the resubscribe after a reconnect) is told
    to the channel's waiters, which then re-read the state, so a completion published while not
    subscribed is still seen. A channel left without waiters stays subscribed for a moment and is then
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
                waiter.confirmed()
            return
        self._channels[channel] = {waiter}
        if channel in self._idle:  # still subscribed: no new SUBSCRIBE
            self._idle.discard(channel)
            if channel in self._confirmed:
                waiter.confirmed()
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
                        w.interrupted()
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
                    w.message(msg["data"])
            elif kind == "subscribe":
                self._confirmed.add(channel)
                for w in waiters:
                    w.confirmed()

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


class AsyncWaits:
    """The wait protocol (waits.py) on the asyncio face: result waits woken by the Notifier of
    the current event loop, and one-task sends that subscribe ahead for a caller that waits for
    what it sends. A caller is an asyncio task."""

    def __init__(self, client: Callable[[], Awaitable[Client]]) -> None:
        self._client = client  # (not the backend's method: no cycle keeps a backend alive)
        self._notifiers: PerLoop[Notifier] = PerLoop()
        #: the current asyncio task's Caller (a child task inherits its parent's context: it is
        #: given a Caller of its own, not its parent's)
        self._callers: ContextVar[tuple[object, Caller] | None] = ContextVar(
            f"machinery-redis-waits-{id(self)}", default=None)

    async def _read(self, task_uuid: str) -> TaskState | None:
        raw = await (await self._client()).get(task_uuid)
        return None if raw is None else decode_state(raw)

    async def _notifier(self) -> Notifier:
        client = await self._client()
        return self._notifiers.get(lambda: Notifier(client))

    def _caller(self) -> Caller:
        task = asyncio.current_task()
        mine = self._callers.get()
        if mine is not None and mine[0] is task:
            return mine[1]
        caller = Caller()
        self._callers.set((task, caller))
        return caller

    async def send(self, lane: Lane, script: LuaScript, keys: Sequence[Any], args: Sequence[Any]) -> None:
        """Run the send script on `lane` (KEYS[1] the task's uuid; an extra ARGV, the channel,
        makes it return the channel's subscriber count), subscribed ahead when this caller waits
        for what it sends."""
        caller = self._caller()
        channel = channel_of(keys[0])
        self._drop_ahead(caller)
        if not caller.before_send(channel):
            await lane.script(script, keys, args)
            return
        notifier = await self._notifier()
        waiter = Waiter()
        try:
            await notifier.add(channel, waiter)
        except Exception:  # the send goes out all the same; its wait subscribes again
            await lane.script(script, keys, args)
            return
        caller.ahead = (channel, waiter)
        caller.after_send(channel, int(await lane.script(script, keys, [*args, channel])))

    def _drop_ahead(self, caller: Caller) -> None:
        """Unsubscribe (soon) from what the last send subscribed ahead and no wait took."""
        ahead, caller.ahead = caller.ahead, None
        if ahead is not None:
            notifier = self._notifiers.current()
            if notifier is not None:
                notifier.remove(*ahead)

    async def wait(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        """Wait for SUCCESS or FAILURE; None when `timeout` seconds pass first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        try:  # also bounds a hung connection, leaving the last look its time
            async with asyncio.timeout(None if timeout is None else timeout + LAST_LOOK):
                return await self._wait(task_uuid, deadline)
        except TimeoutError:
            return None

    async def _wait(self, task_uuid: str, deadline: float | None) -> TaskState | None:
        caller = self._caller()
        channel = channel_of(task_uuid)
        ahead = caller.ahead if caller.ahead is not None and caller.ahead[0] == channel else None
        watched = caller.before_wait(channel)
        notifier = await self._notifier()
        if ahead is not None:  # subscribed (or subscribing) with its send
            caller.ahead = None
            waiter: Waiter = ahead[1]
        else:
            self._drop_ahead(caller)
            waiter = Waiter()
            await notifier.add(channel, waiter)
        # seen subscribed counts only while the waiter that subscribed with the send is still on
        wait = Wait(deadline, time.monotonic(), watched and ahead is not None)
        try:
            return await self._follow(task_uuid, waiter, wait)
        finally:
            notifier.remove(channel, waiter)

    async def _follow(self, task_uuid: str, waiter: Waiter, wait: Wait) -> TaskState | None:
        confirmations = interruptions = 0
        while True:
            step, seconds = wait.next(time.monotonic())
            if step is Step.LAST_LOOK:
                try:
                    async with asyncio.timeout(seconds):
                        return Wait.outcome(await self._read(task_uuid))
                except TimeoutError:
                    if cancel_requested():  # the caller's own timeout or cancel
                        raise
                    return None
            if step is Step.READ:
                if (state := Wait.outcome(await self._read(task_uuid))) is not None:
                    return state
                continue
            if not waiter.event.is_set():
                try:
                    async with asyncio.timeout(seconds):  # a timer; wait_for would add a Task per wait
                        await waiter.event.wait()
                except TimeoutError:
                    if cancel_requested():  # the caller's own timeout or cancel, not our step
                        raise
            waiter.event.clear()
            data, waiter.data = waiter.data, None
            if data is not None and (state := Wait.published(data)) is not None:
                return state
            for _ in range(waiter.confirmations - confirmations):
                wait.confirmation()
            if waiter.interruptions != interruptions:
                wait.interrupted()
            confirmations, interruptions = waiter.confirmations, waiter.interruptions
            if cancel_requested():
                raise asyncio.CancelledError

    async def close(self) -> None:
        """Close the current loop's pub/sub connection."""
        notifier = self._notifiers.pop_current()
        if notifier is not None:
            await notifier.close()
