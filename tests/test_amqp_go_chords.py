"""Chords on the AMQP result backend in a mixed Go and Python fleet, on the real RabbitMQ.

Go's side is played by `GoWorker`, which does exactly what Go Machinery's AMQP worker and result
backend do (machinery-spec.md §5 and §8): it stores each state in the queue `<task uuid>`, also
publishes a group member's final state to the queue `<group uuid>`, and after a member's success
fires the chord when that queue holds every member and `<group>_chord_triggered` does not exist,
taking the states with an exclusive consumer. A Go producer writes no group record.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiormq
import pytest
from aiormq import exceptions as amqp_exc
from aiormq.abc import AbstractChannel, DeliveredMessage
from pamqp import commands as spec

from amqp_support import AMQP_URL, Admin, make_cnf, require_rabbit
from machinery import Chord, Config, Group, Server, Signature, Worker
from machinery.tasks.signature import Arg, decode_signature, encode_signature
from machinery.tasks.state import FAILURE, SUCCESS, TaskResult, TaskState, decode_state, encode_state

pytestmark = pytest.mark.amqp


class GoWorker:
    """Go Machinery's AMQP worker and result backend, played with raw AMQP calls."""

    def __init__(self, cnf: Config, queue: str, fail: frozenset[str] = frozenset()) -> None:
        self.cnf = cnf
        self.queue = queue
        self.fail = fail
        self.fired: list[str] = []
        self.conn: aiormq.abc.AbstractConnection | None = None

    async def __aenter__(self) -> GoWorker:
        self.conn = await aiormq.connect(AMQP_URL)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn is not None:
            await self.conn.close()

    async def channel(self) -> AbstractChannel:
        assert self.conn is not None
        return await self.conn.channel()

    def _args(self) -> dict[str, Any]:
        ms = self.cnf.results_expire_in * 1000
        return {"x-message-ttl": ms, "x-expires": ms}

    async def run_all(self, expected: int, timeout: float = 30) -> None:
        """Take `expected` tasks from the Go queue, one at a time, acking each after its work."""
        ch = await self.channel()
        deadline = time.monotonic() + timeout
        done = 0
        while done < expected:
            assert time.monotonic() < deadline, f"the Go worker got {done} of {expected} tasks"
            msg = await ch.basic_get(self.queue, no_ack=False)
            if isinstance(msg.delivery, spec.Basic.GetEmpty):
                await asyncio.sleep(0.02)
                continue
            await self.process(msg.body)
            await ch.basic_ack(msg.delivery.delivery_tag)
            done += 1
        await ch.close()

    async def process(self, body: bytes) -> None:
        sig = decode_signature(body)
        if sig.uuid in self.fail:
            state = TaskState(sig.uuid, FAILURE, error="go says no")
        else:
            total = sum(int(a.value) for a in sig.args)
            state = TaskState(sig.uuid, SUCCESS, results=[TaskResult("int64", total)])
        await self.update_state(sig.uuid, state)
        if sig.group_uuid and sig.group_task_count:
            await self.update_state(sig.group_uuid, state)  # markTaskCompleted
        if state.state == SUCCESS and sig.group_uuid and sig.chord_callback is not None:
            await self.chord(sig)

    async def update_state(self, queue: str, state: TaskState) -> None:
        ch = await self.channel()
        await ch.queue_declare(queue, durable=False, auto_delete=True, arguments=self._args())
        await ch.queue_bind(queue, self.cnf.amqp.exchange, routing_key=queue)
        await ch.confirm_delivery()
        await ch.basic_publish(encode_state(state), exchange=self.cnf.amqp.exchange, routing_key=queue,
                               properties=spec.Basic.Properties(content_type="application/json", delivery_mode=2))
        await ch.close()

    async def inspect(self, queue: str) -> int | None:
        """QueueInspect: the message count, or None when the queue does not exist."""
        ch = await self.channel()
        try:
            ok = await ch.queue_declare(queue, passive=True)
            return int(ok.message_count or 0)
        except amqp_exc.ChannelNotFoundEntity:
            return None
        finally:
            if not ch.is_closed:
                await ch.close()

    async def chord(self, sig: Signature) -> None:
        group, total = sig.group_uuid, sig.group_task_count
        if await self.inspect(group) != total:  # GroupCompleted
            return
        if await self.inspect(f"{group}_chord_triggered") is not None:  # TriggerChord
            return
        states = await self.group_task_states(group, total)
        if states is None:
            return
        callback = sig.chord_callback
        assert callback is not None
        if not callback.immutable:
            for s in states:
                callback.args.extend(Arg(r.type, r.value) for r in s.results or [])
        callback.routing_key = callback.routing_key or self.cnf.amqp.binding_key
        ch = await self.channel()
        await ch.confirm_delivery()
        await ch.basic_publish(encode_signature(callback), exchange=self.cnf.amqp.exchange,
                               routing_key=callback.routing_key,
                               properties=spec.Basic.Properties(content_type="application/json", delivery_mode=2))
        await ch.queue_delete(group)  # PurgeGroupMeta, deferred by Go's worker
        await ch.queue_delete(f"{group}_chord_triggered")
        await ch.close()
        self.fired.append(group)

    async def group_task_states(self, group: str, total: int) -> list[TaskState] | None:
        if await self.inspect(group) != total:
            return None  # "Already consumed"
        ch = await self.channel()
        got: asyncio.Queue[DeliveredMessage] = asyncio.Queue()
        try:
            await ch.basic_consume(group, got.put, exclusive=True)
        except amqp_exc.ChannelAccessRefused:
            return None
        states = []
        try:
            for _ in range(total):
                msg = await asyncio.wait_for(got.get(), 5)
                states.append(decode_state(msg.body))
                await ch.basic_ack(msg.delivery.delivery_tag)
        except TimeoutError:
            return None  # a Go worker would hang here; this one gives up
        finally:
            await ch.close()
        return states


@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    await require_rabbit()
    async with Admin() as a:
        yield a


@pytest.fixture
def cnf(admin: Admin) -> Config:
    cnf = make_cnf()
    admin.track(cnf)
    return cnf


class Fleet:
    """A Python producer and worker; `runs` counts each task's runs by UUID."""

    def __init__(self, cnf: Config) -> None:
        self.server = Server(cnf)
        self.runs: Counter[str] = Counter()

        @self.server.task
        async def add(x: int, y: int) -> int:
            await asyncio.sleep(random.uniform(0, 0.02))
            return x + y

        @self.server.task
        async def collect(*values: int) -> int:
            return sum(values)

        @self.server.task
        async def noted(error: str) -> str:
            return error

    def worker(self) -> Worker:
        worker = self.server.new_worker("py", concurrency=4)

        def count(sig: Signature) -> None:
            self.runs[sig.uuid] += 1

        worker.set_pre_task_handler(count)
        worker.launch_async()
        return worker


@pytest.fixture
def fleet(cnf: Config) -> Iterator[Fleet]:
    f = Fleet(cnf)
    try:
        yield f
    finally:
        f.server.close()


def go_member(group: str, count: int, value: int, callback: Signature, routing_key: str) -> bytes:
    return encode_signature(Signature(
        "add", args=[Arg("int64", value), Arg("int64", value)], uuid=f"task_{uuid.uuid4()}",
        routing_key=routing_key, headers={}, group_uuid=group, group_task_count=count, chord_callback=callback))


async def wait_state(server: Server, task_uuid: str, timeout: float = 30) -> TaskState:
    backend = server.get_backend()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = await asyncio.to_thread(server.portal.run, backend.get_state(task_uuid))
        if state is not None and state.is_completed():
            return state
        await asyncio.sleep(0.05)
    raise AssertionError(f"no final state for {task_uuid}")


async def wait_until(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def declare_go_queue(admin: Admin, cnf: Config, queue: str) -> None:
    """The queue a Go worker with a custom queue consumes (only the Go side reads it)."""
    await admin.declare(queue, durable=True)
    ch = await admin.channel()
    await ch.exchange_declare(cnf.amqp.exchange, exchange_type=cnf.amqp.exchange_type, durable=True)
    await ch.queue_bind(queue, cnf.amqp.exchange, routing_key=queue)
    await ch.close()
    admin.queues.add(queue)


def track_group(admin: Admin, group: str) -> None:
    admin.queues.update({group, *(f"{group}{suffix}" for suffix in ("_chord_triggered", "_meta", "_progress"))})


async def test_a_go_producers_chord_fires_once_on_python_workers(fleet: Fleet, cnf: Config, admin: Admin) -> None:
    """Go's InitGroup writes nothing: the group is known by its members' states alone."""
    worker = fleet.worker()  # declares the exchange and the queue the Go producer publishes to
    try:
        await wait_until(lambda: admin.exists(cnf.default_queue))
        group, callback = f"group_{uuid.uuid4()}", Signature("collect", uuid=f"chord_{uuid.uuid4()}", headers={})
        for v in (1, 2, 3):
            await admin.publish(cnf.amqp.exchange, cnf.amqp.binding_key,
                                go_member(group, 3, v, callback, cnf.amqp.binding_key),
                                content_type="application/json", delivery_mode=2)
        state = await wait_state(fleet.server, callback.uuid)
        await asyncio.sleep(0.3)  # time for a second firing, had there been one
    finally:
        await asyncio.to_thread(worker.quit)
    assert state.state == SUCCESS and [r.value for r in state.results or []] == [12]
    assert fleet.runs[callback.uuid] == 1
    # a Go worker checking now would not fire it: the flag it inspects exists
    assert await admin.exists(f"{group}_chord_triggered")
    track_group(admin, group)


async def test_python_producers_chords_fire_once_whichever_side_finishes_last(
        fleet: Fleet, cnf: Config, admin: Admin) -> None:
    go_queue, later = cnf.default_queue + "_go", cnf.default_queue + "_later"
    await declare_go_queue(admin, cnf, go_queue)
    admin.queues.add(later)
    server = fleet.server

    def chord(python_queue: str = "") -> tuple[Group, Signature]:
        members = [Signature("add", args=[i, i], routing_key=go_queue if i % 2 else python_queue) for i in range(4)]
        group, callback = Group(*members), Signature("collect")
        server.send_chord(Chord(group, callback))
        return group, callback

    async with GoWorker(cnf, go_queue) as go:
        # Go finishes last: the Python members are done before Go runs its own
        go_last = [chord() for _ in range(3)]
        worker = fleet.worker()
        try:
            for group, _ in go_last:
                for sig in group.signatures[::2]:
                    await wait_state(server, sig.uuid)
            await go.run_all(6)
            # Python finishes last: Go runs its members before any Python worker reads theirs
            python_last = [chord(later) for _ in range(3)]
            await go.run_all(6)
            late_worker = server.new_worker("py-later", concurrency=4, queue=later)
            late_worker.launch_async()
            # both at once
            together = [chord() for _ in range(6)]
            await go.run_all(12)
            chords = go_last + python_last + together
            states = [await wait_state(server, cb.uuid) for _, cb in chords]
            await asyncio.sleep(0.5)  # time for a second firing, had there been one
        finally:
            await asyncio.to_thread(worker.quit)
            await asyncio.to_thread(late_worker.quit)
    assert [(s.state, [r.value for r in s.results or []]) for s in states] == [(SUCCESS, [12])] * len(chords)
    assert [fleet.runs[cb.uuid] for _, cb in chords] == [1] * len(chords)
    assert {g.group_uuid for g, _ in go_last} <= set(go.fired)  # Go fired these
    assert not {g.group_uuid for g, _ in python_last} & set(go.fired)  # Python fired these
    for group, _ in chords:
        track_group(admin, group.group_uuid)


async def test_go_producers_chords_split_across_both_fleets_fire_once(fleet: Fleet, cnf: Config, admin: Admin) -> None:
    go_queue = cnf.default_queue + "_go"
    await declare_go_queue(admin, cnf, go_queue)
    worker = fleet.worker()
    try:
        await wait_until(lambda: admin.exists(cnf.default_queue))
        callbacks = []
        async with GoWorker(cnf, go_queue) as go:
            for _ in range(10):
                group, callback = f"group_{uuid.uuid4()}", Signature("collect", uuid=f"chord_{uuid.uuid4()}",
                                                                      headers={})
                for i in range(4):
                    key = go_queue if i % 2 else cnf.amqp.binding_key
                    await admin.publish(cnf.amqp.exchange, key, go_member(group, 4, i, callback, key),
                                        content_type="application/json", delivery_mode=2)
                callbacks.append((group, callback))
            await go.run_all(20)
            states = [await wait_state(fleet.server, cb.uuid) for _, cb in callbacks]
            await asyncio.sleep(0.5)
    finally:
        await asyncio.to_thread(worker.quit)
    assert [(s.state, [r.value for r in s.results or []]) for s in states] == [(SUCCESS, [12])] * len(callbacks)
    assert [fleet.runs[cb.uuid] for _, cb in callbacks] == [1] * len(callbacks)
    for group, _ in callbacks:
        track_group(admin, group)


async def test_a_member_failed_on_go_fails_the_chord_once(
        fleet: Fleet, cnf: Config, admin: Admin) -> None:
    srv, runs = fleet.server, fleet.runs
    go_queue = cnf.default_queue + "_go"
    await declare_go_queue(admin, cnf, go_queue)
    on_error = Signature("noted", uuid=f"task_{uuid.uuid4()}")
    callback = Signature("collect", uuid=f"chord_{uuid.uuid4()}", on_error=[on_error])
    go_member_sig = Signature("add", args=[1, 1], routing_key=go_queue)
    group = Group(go_member_sig, Signature("add", args=[2, 2]), Signature("add", args=[3, 3]))
    srv.send_chord(Chord(group, callback))
    async with GoWorker(cnf, go_queue, fail=frozenset({go_member_sig.uuid})) as go:
        await go.run_all(1)  # Go fails its member first; the Python members finish the group
        worker = fleet.worker()
        try:
            state = await wait_state(srv, callback.uuid)
            await wait_state(srv, on_error.uuid)
            await asyncio.sleep(0.3)
        finally:
            await asyncio.to_thread(worker.quit)
    assert state.state == FAILURE and go_member_sig.uuid in state.error and "go says no" in state.error
    assert runs[callback.uuid] == 0 and runs[on_error.uuid] == 1
    assert go.fired == []
    track_group(admin, group.group_uuid)
