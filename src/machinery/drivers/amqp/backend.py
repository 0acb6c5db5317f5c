"""RabbitMQ result backend in Go Machinery's layout, with reads that do not destroy states.

Layout (what a Go AsyncResult and a Go worker read and write):

* Every state change is a message in the queue named by the task UUID: non-durable, auto-delete,
  `x-message-ttl` and `x-expires` = results_expire_in x 1000, bound to the broker exchange with the
  UUID as key. States go through that exchange (direct or topic, as Go does); with a fanout or headers
  exchange they go through the default exchange instead, so they never land in task queues.
  Being Go's transient queues, states do not survive a RabbitMQ restart.
* Reading takes every message with basic.get (no ack), answers with the latest state (see _latest),
  acks the older messages and puts the rest back at their positions (basic.nack, requeue): reading
  twice gives the same answer and the queue stays short. Go's GetState consumed the oldest state per
  call. Two readers of one task in different processes may briefly see no state while the other
  holds it; readers in one process share a single read.
* wait_completed binds one exclusive queue per connection to the exchange with the UUID as key and
  wakes on the completing state (Go workers' writes included), re-checking every few seconds.

Groups and chords (Go's AMQP chord relied on an exclusive consume and could fire twice or never):
a group's record is `<group>_meta`, its progress `<group>_progress`, its chord flag
`<group>_chord_triggered` (Go's name). Changes happen under a per-group mutex: the exclusive queue
`<group>_lock`. RabbitMQ lets one connection at a time hold it and deletes it when that connection
dies, and every write inside goes over the same connection, so the chord fires exactly once (a crash
between the flag and the callback's send loses the chord, as with Redis).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Final
from uuid import uuid4

import msgspec
from aiormq import exceptions as amqp_exc
from aiormq.abc import AbstractChannel, DeliveredMessage

from machinery.drivers.amqp import go_groups
from machinery.drivers.amqp.connection import (
    TRANSIENT_ERRORS,
    AMQPLink,
    clamp_ms,
    delivery_tag,
    get_all,
    properties,
    publish,
    split_urls,
)
from machinery.drivers.backend import Backend, GroupProgress
from machinery.errors import BackendError, DecodeError
from machinery.log import get_logger
from machinery.loops import PerLoop
from machinery.tasks import gojson
from machinery.tasks.state import (
    FAILURE,
    PENDING,
    SUCCESS,
    GroupMeta,
    TaskState,
    decode_group_meta,
    decode_state,
    encode_group_meta,
)

if TYPE_CHECKING:
    from machinery.config import Config

READERS: Final = 8
LOCK_TIMEOUT: Final = 30.0
RECHECK: Final = 5.0


class _Progress(msgspec.Struct):
    done: dict[str, bool] = {}  # task uuid -> failed


class _Watcher:
    """One exclusive queue per connection, bound per awaited task UUID, that wakes waiters."""

    def __init__(self, channel: AbstractChannel, queue: str) -> None:
        self.channel = channel
        self.queue = queue
        self.waiters: dict[str, list[asyncio.Future[TaskState | None]]] = {}

    def usable(self) -> bool:
        return not self.channel.is_closed

    async def on_message(self, msg: DeliveredMessage) -> None:
        key = getattr(msg.delivery, "routing_key", "") or ""
        try:
            state = decode_state(msg.body)
        except DecodeError:
            return
        if state.is_completed():
            for fut in self.waiters.get(key, ()):
                if not fut.done():
                    fut.set_result(state)

    def wake_all(self, _fut: Any = None) -> None:
        for futs in self.waiters.values():
            for fut in futs:
                if not fut.done():
                    fut.set_result(None)


class _LoopState:
    def __init__(self, link: AMQPLink) -> None:
        self.link = link
        self.pool: list[AbstractChannel] = []
        self.pool_slots = asyncio.Semaphore(READERS)
        self.inflight: dict[str, asyncio.Future[TaskState | None]] = {}
        self.group_locks: dict[str, list[Any]] = {}  # group -> [asyncio.Lock, users]
        self.watcher: _Watcher | None = None
        self.watcher_lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()


class AMQPBackend(Backend):
    """States as messages in per-task queues; group progress and chord flags under a queue mutex."""

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.result_backend)
        self.urls = split_urls(self.url, cnf.multiple_broker_separator, "result_backend")
        self._states: PerLoop[_LoopState] = PerLoop()
        #: seconds an operation keeps reconnecting (trying every URL in order) before it fails
        self.retry_window = 30.0

    def _state(self) -> _LoopState:
        return self._states.get(
            lambda: _LoopState(AMQPLink(self.urls, tls=self.cnf.tls, error=BackendError, role="backend",
                                        retry_window=self.retry_window))
        )

    # --- layout ----------------------------------------------------------------------------

    @property
    def _routed(self) -> bool:
        """States go through the broker exchange (Go's layout) only where keys route exactly."""
        return self.cnf.amqp.exchange_type in ("direct", "topic")

    def _args(self) -> dict[str, Any]:
        ms = clamp_ms(self.expire_in * 1000)
        return {"x-message-ttl": ms, "x-expires": ms}

    async def _declare_state_queue(self, st: _LoopState, ch: AbstractChannel, uuid: str, bind: bool) -> None:
        """Declare `<uuid>` exactly as Go does (and bind it for writes)."""
        await ch.queue_declare(uuid, durable=False, auto_delete=True, arguments=self._args())
        if bind and self._routed and not st.link.fresh(f"b:{uuid}", self.expire_in / 2):
            a = self.cnf.amqp
            if not st.link.fresh("x"):
                await ch.exchange_declare(a.exchange, exchange_type=a.exchange_type, durable=True)
                st.link.mark("x")
            await ch.queue_bind(uuid, a.exchange, routing_key=uuid)
            st.link.mark(f"b:{uuid}")
        if bind:
            st.link.mark(f"q:{uuid}")

    async def _group_queue(self, ch: AbstractChannel, name: str) -> list[DeliveredMessage]:
        """Declare one of a group's queues and read all of it (unacked; released with the lock)."""
        await ch.queue_declare(name, durable=True, arguments=self._args())
        return await get_all(ch, name)

    # --- states ----------------------------------------------------------------------------

    async def set_states(self, states: Sequence[TaskState]) -> None:
        if not states:
            return
        st = self._state()
        pending = list(states)
        returned: set[str] = set()
        missing: list[BaseException] = []

        async def attempt() -> None:
            await st.link.connection()  # reconnect (maybe to another URL) before trusting the cache
            todo = {s.task_uuid for s in pending if not st.link.fresh(f"q:{s.task_uuid}", self.expire_in / 2)}
            await asyncio.gather(*(self._declare_pooled(st, uuid) for uuid in todo))
            pub = await st.link.channel("publish", confirms=True)
            exchange = self.cnf.amqp.exchange if self._routed else ""
            results = await asyncio.gather(
                *(publish(pub, s.to_json(), exchange=exchange, routing_key=s.task_uuid,
                          props=properties(headers=None)) for s in pending),
                return_exceptions=True,
            )
            failed = []
            error: BaseException | None = None
            for s, res in zip(pending, results, strict=True):
                if isinstance(res, amqp_exc.PublishError):
                    if s.task_uuid in returned:
                        raise BackendError(f"store state of {s.task_uuid}: its queue keeps disappearing")
                    returned.add(s.task_uuid)
                    st.link.forget(f"q:{s.task_uuid}")  # expired or purged meanwhile: declare again
                    st.link.forget(f"b:{s.task_uuid}")
                    failed.append(s)
                    error = error or ConnectionError("state returned as unroutable")
                elif isinstance(res, amqp_exc.ChannelNotFoundEntity) and not missing:
                    missing.append(res)  # the exchange vanished (or a new node lacks it): declare again
                    st.link.declared.clear()
                    failed.append(s)
                    error = error or ConnectionError(str(res))
                elif isinstance(res, BaseException):
                    failed.append(s)
                    error = error or res
            pending[:] = failed
            if error is not None:
                raise error

        await st.link.call(attempt, what="store task states")

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        unique = list(dict.fromkeys(task_uuids))
        found = dict(zip(unique, await asyncio.gather(*(self._read_shared(u) for u in unique)), strict=True))
        return [found[u] for u in task_uuids]

    async def _read_shared(self, uuid: str) -> TaskState | None:
        """One read per task at a time in this process: concurrent readers would hide messages
        from each other."""
        st = self._state()
        fut = st.inflight.get(uuid)
        if fut is not None:
            try:
                return await asyncio.shield(fut)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if fut.cancelled() and (task is None or not task.cancelling()):
                    return await self._read_shared(uuid)  # the leading reader was cancelled, not us
                raise
        fut = asyncio.get_running_loop().create_future()
        st.inflight[uuid] = fut
        try:
            state = await st.link.call(lambda: self._read(st, uuid), what=f"read state of {uuid}")
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            elif not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved here; other waiters re-raise it
            raise
        else:
            fut.set_result(state)
            return state
        finally:
            st.inflight.pop(uuid, None)

    @asynccontextmanager
    async def _pooled(self, st: _LoopState) -> AsyncIterator[AbstractChannel]:
        """A channel from a small pool; closed rather than reused after an error, so nothing a
        failed read left unacked can be acked by the next one."""
        async with st.pool_slots:
            ch = None
            while st.pool and ch is None:
                candidate = st.pool.pop()
                ch = None if candidate.is_closed else candidate
            if ch is None:
                ch = await st.link.open_channel(confirms=False)
            try:
                yield ch
            except BaseException:
                if not ch.is_closed:
                    st.tasks.add(task := asyncio.get_running_loop().create_task(ch.close()))
                    task.add_done_callback(st.tasks.discard)
                raise
            if not ch.is_closed:
                st.pool.append(ch)

    async def _declare_pooled(self, st: _LoopState, uuid: str) -> None:
        async with self._pooled(st) as ch:
            await self._declare_state_queue(st, ch, uuid, bind=True)

    async def _read(self, st: _LoopState, uuid: str) -> TaskState | None:
        async with self._pooled(st) as ch:
            if not (st.link.fresh(f"q:{uuid}", self.expire_in / 2) or st.link.fresh(f"r:{uuid}", self.expire_in / 2)):
                # Go declares on read too; once the queue is known, basic.get alone is enough
                # (a declare of an existing queue is a transaction in RabbitMQ).
                await self._declare_state_queue(st, ch, uuid, bind=False)
                st.link.mark(f"r:{uuid}")
            try:
                msgs = await get_all(ch, uuid)
            except amqp_exc.ChannelNotFoundEntity:  # purged or expired meanwhile
                for kind in "qbr":
                    st.link.forget(f"{kind}:{uuid}")
                return None
            if not msgs:
                return None
            states: list[TaskState] = []
            for m in msgs:
                try:
                    states.append(decode_state(m.body))
                except DecodeError as exc:
                    get_logger().warning("ignoring an undecodable state in queue %s: %s", uuid, exc)
                    states.append(TaskState(uuid, ""))
            pick = _latest(states)
            if pick > 0:  # older states are of no further use: keep the queue short
                await ch.basic_ack(delivery_tag(msgs[pick - 1]), multiple=True, wait=False)
            # Requeued at their original positions; the channel handles the nack before its next get.
            await ch.basic_nack(delivery_tag(msgs[-1]), multiple=True, requeue=True)
            return states[pick] if states[pick].state else None

    async def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        if not self._routed:
            return await super().wait_completed(task_uuid, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        st = self._state()

        def left() -> float | None:
            return None if deadline is None else max(0.0, deadline - time.monotonic())

        try:
            state = await asyncio.wait_for(self._read_shared(task_uuid), left())
        except TimeoutError:
            return None
        if state is not None and state.is_completed():
            return state  # finished already: nothing to watch
        fut: asyncio.Future[TaskState | None] = asyncio.get_running_loop().create_future()
        watcher: _Watcher | None = None
        try:
            while True:
                try:
                    if watcher is None:
                        watcher = await asyncio.wait_for(self._watch(st, task_uuid, fut), left())
                    state = await asyncio.wait_for(self._read_shared(task_uuid), left())
                except TimeoutError:
                    return None
                if state is not None and state.is_completed():
                    return state
                remaining = left()
                if remaining is not None and remaining <= 0:
                    return None
                try:  # woken by the completing state; re-read now and then in case a wake-up was missed
                    woke = await asyncio.wait_for(asyncio.shield(fut), min(RECHECK, remaining or RECHECK))
                except TimeoutError:
                    continue
                if woke is not None:
                    return woke
                self._unwatch(st, watcher, task_uuid, fut)  # its connection died: watch again
                watcher, fut = None, asyncio.get_running_loop().create_future()
        finally:
            if watcher is not None:
                self._unwatch(st, watcher, task_uuid, fut)

    async def _watch(self, st: _LoopState, uuid: str, fut: asyncio.Future[TaskState | None]) -> _Watcher:
        async def bind() -> _Watcher:
            watcher = await self._watcher(st)
            futs = watcher.waiters.setdefault(uuid, [])
            futs.append(fut)
            if len(futs) == 1:
                try:
                    await watcher.channel.queue_bind(watcher.queue, self.cnf.amqp.exchange, routing_key=uuid)
                except BaseException:
                    futs.remove(fut)
                    raise
            return watcher

        return await st.link.call(bind, what=f"watch task {uuid}")

    async def _watcher(self, st: _LoopState) -> _Watcher:
        w = st.watcher
        if w is not None and w.usable():
            return w
        async with st.watcher_lock:
            w = st.watcher
            if w is not None and w.usable():
                return w
            ch = await st.link.open_channel(confirms=False)
            a = self.cnf.amqp
            await ch.exchange_declare(a.exchange, exchange_type=a.exchange_type, durable=True)
            ok = await ch.queue_declare("", exclusive=True, auto_delete=True)
            w = _Watcher(ch, str(ok.queue))
            ch.closing.add_done_callback(w.wake_all)
            await ch.basic_consume(w.queue, w.on_message, no_ack=True)
            st.watcher = w
            return w

    def _unwatch(self, st: _LoopState, w: _Watcher, uuid: str, fut: asyncio.Future[TaskState | None]) -> None:
        futs = w.waiters.get(uuid, [])
        if fut in futs:
            futs.remove(fut)
        if futs or not w.usable():
            return
        w.waiters.pop(uuid, None)

        async def unbind() -> None:  # off the waiter's path, on a channel of its own
            if not w.waiters.get(uuid) and w.usable():
                try:
                    ch = await st.link.channel("unbind", confirms=False)
                    await ch.queue_unbind(w.queue, self.cnf.amqp.exchange, routing_key=uuid)
                except (*TRANSIENT_ERRORS, asyncio.CancelledError):
                    pass

        task = asyncio.get_running_loop().create_task(unbind())
        st.tasks.add(task)
        task.add_done_callback(st.tasks.discard)

    async def purge_state(self, task_uuid: str) -> None:
        await self._delete([task_uuid], f"purge state of {task_uuid}")

    async def _delete(self, queues: Sequence[str], what: str) -> None:
        st = self._state()

        async def delete() -> None:
            ch = await st.link.channel("declare", confirms=False)
            for q in queues:
                await ch.queue_delete(q)
                for kind in "qbr":
                    st.link.forget(f"{kind}:{q}")

        await st.link.call(delete, what=what)

    # --- groups ----------------------------------------------------------------------------

    @asynccontextmanager
    async def _group_lock(self, st: _LoopState, group: str) -> AsyncIterator[AbstractChannel]:
        """Hold `<group>_lock` (an exclusive queue) and yield a channel of the same connection."""
        entry = st.group_locks.setdefault(group, [asyncio.Lock(), 0])
        local: asyncio.Lock = entry[0]
        entry[1] += 1
        try:
            async with local:
                ch = await self._acquire(st, f"{group}_lock")
                try:
                    yield ch
                finally:
                    await asyncio.shield(self._release(ch, f"{group}_lock"))
        finally:
            entry[1] -= 1
            if entry[1] == 0:  # nobody holds or waits for it (a count: locked() is False between holders)
                del st.group_locks[group]

    @staticmethod
    async def _release(ch: AbstractChannel, name: str) -> None:
        """Put back what the holder read (before the next holder can look), then unlock."""
        if ch.is_closed:
            return  # the connection died: RabbitMQ dropped the lock and requeued the reads itself
        try:
            await ch.basic_recover(requeue=True)
            await ch.queue_delete(name)
        finally:
            await ch.close()

    async def _acquire(self, st: _LoopState, name: str) -> AbstractChannel:
        deadline = time.monotonic() + LOCK_TIMEOUT
        delay = 0.002
        while True:
            ch = await st.link.open_channel(confirms=False)
            try:
                await ch.queue_declare(name, exclusive=True, auto_delete=True)
                return ch
            except amqp_exc.ChannelLockedResource:
                pass  # another connection holds it; RabbitMQ closed this channel
            except BaseException:
                if not ch.is_closed:
                    await ch.close()
                raise
            if time.monotonic() > deadline:
                raise BackendError(f"could not lock {name} within {LOCK_TIMEOUT:g}s")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)

    async def _grouped(self, group: str, what: str, op: Any) -> Any:
        st = self._state()

        async def run() -> Any:
            async with self._group_lock(st, group) as ch:
                return await op(st, ch)

        return await st.link.call(run, what=f"{what} of group {group}")

    async def _publish_state(self, st: _LoopState, ch: AbstractChannel, queue: str, body: bytes) -> None:
        """Publish a TaskState to a queue of Go's state layout (a task's, or Go's group queue)."""
        await self._declare_state_queue(st, ch, queue, bind=True)
        pub = await st.link.channel("publish", confirms=True)
        await publish(pub, body, exchange=self.cnf.amqp.exchange if self._routed else "", routing_key=queue,
                      props=properties(headers=None))

    async def _publish(self, st: _LoopState, queue: str, body: bytes, headers: dict[str, Any] | None = None) -> None:
        pub = await st.link.channel("publish", confirms=True)
        await publish(pub, body, exchange="", routing_key=queue, props=properties(headers=headers))

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Write the record; an existing group (sent again by a redelivered parent) keeps its
        progress and chord flag, and its record is refreshed with the members given now."""
        name = f"{group_uuid}_meta"

        async def op(st: _LoopState, ch: AbstractChannel) -> None:
            old = await self._group_queue(ch, name)
            try:
                created = decode_group_meta(old[-1].body).created_at if old else None
            except DecodeError:
                created = None
            meta = GroupMeta(group_uuid, list(task_uuids), created_at=created or gojson.now())
            await self._publish(st, name, encode_group_meta(meta))
            if old:
                await ch.basic_ack(delivery_tag(old[-1]), multiple=True)

        await self._grouped(group_uuid, "init", op)

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        async def op(st: _LoopState, ch: AbstractChannel) -> GroupMeta | None:
            msgs = await self._group_queue(ch, f"{group_uuid}_meta")
            if msgs:
                meta = decode_group_meta(msgs[-1].body)
            else:  # a Go producer's group has no record: its members in Go's order (completion)
                await go_groups.declare(ch, group_uuid, self._args())
                held = await go_groups.read(ch, group_uuid)
                if not held:
                    return None
                meta = GroupMeta(group_uuid, [state.task_uuid for _, state in held])
            meta.chord_triggered = bool(await self._group_queue(ch, f"{group_uuid}_chord_triggered"))
            return meta

        result: GroupMeta | None = await self._grouped(group_uuid, "read", op)
        return result

    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        """Count the member in `<group>_progress` (once per task) and publish its final state to
        Go's group queue, then report the larger of the two counts: Go workers count in the queue
        only. Once the queue holds every member, its states also tell which failed on Go."""
        name = f"{group_uuid}_progress"
        stored = await self.get_state(task_uuid)  # the final state just stored: Go counts it

        async def op(st: _LoopState, ch: AbstractChannel) -> GroupProgress:
            msgs = await self._group_queue(ch, name)
            done: dict[str, bool] = {}
            for m in msgs:  # a crash between publish and ack can leave two records: merge them
                try:
                    done.update(msgspec.json.decode(m.body, type=_Progress).done)
                except msgspec.DecodeError:
                    continue
            counted = task_uuid not in done
            if counted or len(msgs) > 1:
                done.setdefault(task_uuid, failed)
                await self._publish(st, name, msgspec.json.encode(_Progress(done)))
                if msgs:
                    await ch.basic_ack(delivery_tag(msgs[-1]), multiple=True)
            if counted:
                final = stored if stored is not None and stored.is_completed() else TaskState(
                    task_uuid, FAILURE if failed else SUCCESS)
                await self._publish_state(st, ch, group_uuid, final.to_json())
            done_n, failed_n = len(done), sum(done.values())
            waiting = await go_groups.declare(ch, group_uuid, self._args())
            if waiting >= total:  # complete by Go's count: its states show members failed on Go
                states = [state for _, state in await go_groups.read(ch, group_uuid)]
                done_n, failed_n = max(done_n, len(states)), max(failed_n, go_groups.failures(states))
            else:
                done_n = max(done_n, waiting)
            return GroupProgress(done_n, failed_n, counted)

        result: GroupProgress = await self._grouped(group_uuid, "count a member", op)
        return result

    async def trigger_chord(self, group_uuid: str) -> bool:
        # Our own token in the flag tells a retry after a lost confirm that this call set it.
        token = uuid4().hex.encode()
        flag = f"{group_uuid}_chord_triggered"

        async def op(st: _LoopState, ch: AbstractChannel) -> bool:
            flags = await self._group_queue(ch, flag)
            if flags:
                return any(m.body == token for m in flags)
            try:  # hold Go's group queue while deciding: a Go worker counting now sees it short
                await go_groups.declare(ch, group_uuid, self._args())
                held = await go_groups.read(ch, group_uuid)
            except amqp_exc.ChannelAccessRefused:
                return False  # a Go worker's GroupTaskStates consumes it: that worker fires the chord
            metas = await self._group_queue(ch, f"{group_uuid}_meta")
            if not (metas or held or await self._group_queue(ch, f"{group_uuid}_progress")):
                return False
            await self._publish(st, flag, token)  # Go's TriggerChord now says no
            if not metas and held:  # a Go producer's chord: its callback takes results in completion order
                meta = GroupMeta(group_uuid, [state.task_uuid for _, state in held], created_at=gojson.now())
                await self._publish(st, f"{group_uuid}_meta", encode_group_meta(meta))
            for msg, _ in held:  # taken, as Go's GroupTaskStates takes them
                await ch.basic_ack(delivery_tag(msg))
            return True

        result: bool = await self._grouped(group_uuid, "trigger the chord", op)
        return result

    async def purge_group_meta(self, group_uuid: str) -> None:
        await self._delete([f"{group_uuid}{s}" for s in ("", "_meta", "_progress", "_chord_triggered")],
                           f"purge group {group_uuid}")

    async def close(self) -> None:
        st = self._states.pop_current()
        if st is not None:
            await st.link.close()


def _latest(states: Sequence[TaskState]) -> int:
    """Index of the state to report: the last completed one of the latest run, else the last one.

    A redelivered task may write RECEIVED after its SUCCESS: that must not hide the result. A run
    starts at PENDING (only a send writes it), so a task sent again with the same UUID starts over.
    """
    start = max((i for i, s in enumerate(states) if s.state == PENDING), default=0)
    done = [i for i in range(start, len(states)) if states[i].is_completed()]
    return done[-1] if done else len(states) - 1
