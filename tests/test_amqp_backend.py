"""The RabbitMQ result backend against a real server: Go's state queues, non-destructive reads,
wake-ups, the chord mutex."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator

import pytest

from amqp_support import Admin, golden, make_cnf, require_rabbit
from machinery.config import Config
from machinery.drivers.amqp.backend import AMQPBackend
from machinery.errors import BackendError
from machinery.tasks.state import (
    FAILURE,
    PENDING,
    RECEIVED,
    STARTED,
    SUCCESS,
    TaskResult,
    TaskState,
    decode_state,
)
from timing import Calls

pytestmark = pytest.mark.amqp


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


@pytest.fixture
async def backend(cnf: Config) -> AsyncIterator[AMQPBackend]:
    b = AMQPBackend(cnf)
    yield b
    await b.close()


def task_id() -> str:
    return f"task_{uuid.uuid4()}"


def done(task: str, value: int = 2) -> TaskState:
    return TaskState(task, SUCCESS, task_name="add", results=[TaskResult("int64", value)])


async def test_go_layout_state_queue(backend: AMQPBackend, cnf: Config, admin: Admin) -> None:
    task = task_id()
    await backend.set_state(TaskState(task, PENDING, task_name="add"))
    # Go declares `<uuid>` exactly so (int32 TTLs): equivalent, no PRECONDITION_FAILED.
    ms = cnf.results_expire_in * 1000
    ok = await admin.declare(task, durable=False, auto_delete=True,
                             arguments={"x-message-ttl": ms, "x-expires": ms})
    assert ok.message_count == 1
    [msg] = await admin.peek(task)
    assert msg.body == TaskState(task, PENDING, task_name="add").to_json()
    assert msg.header.properties.content_type == "application/json"
    assert msg.header.properties.delivery_mode == 2
    assert msg.delivery.exchange == cnf.amqp.exchange and msg.delivery.routing_key == task


async def test_reads_a_go_workers_state(backend: AMQPBackend, cnf: Config, admin: Admin) -> None:
    raw = golden("state_success.json")
    task = decode_state(raw)
    await backend.set_state(TaskState(task.task_uuid, STARTED))  # declares and binds like a Go worker
    await admin.publish(cnf.amqp.exchange, task.task_uuid, raw, content_type="application/json", delivery_mode=2)
    got = await backend.get_state(task.task_uuid)
    assert got is not None and got.to_json() == raw


async def test_reading_twice_gives_the_latest_state_and_trims(backend: AMQPBackend, admin: Admin) -> None:
    task = task_id()
    for state in (PENDING, RECEIVED, STARTED):
        await backend.set_state(TaskState(task, state, task_name="add"))
    await backend.set_state(done(task))
    assert await admin.count(task) == 4
    for _ in range(3):
        got = await backend.get_state(task)
        assert got is not None and got.state == SUCCESS and got.values() == [2]
    assert await admin.count(task) == 1  # older states were dropped, the answer kept


async def test_a_late_stale_state_does_not_hide_the_final_one(backend: AMQPBackend) -> None:
    task = task_id()
    await backend.set_states([TaskState(task, FAILURE, error="boom")])
    await backend.set_states([TaskState(task, RECEIVED)])  # a redelivered copy starting again
    got = await backend.get_state(task)
    assert got is not None and got.state == FAILURE


async def test_a_task_sent_again_with_its_uuid_starts_over(backend: AMQPBackend) -> None:
    task = task_id()  # e.g. a periodic task with a preset UUID
    await backend.set_states([TaskState(task, PENDING), done(task, 1)])
    await backend.set_state(TaskState(task, PENDING))
    got = await backend.get_state(task)
    assert got is not None and got.state == PENDING
    assert await backend.wait_completed(task, 0.3) is None  # not the first run's result
    await backend.set_states([TaskState(task, STARTED), done(task, 2)])
    assert await backend.wait_completed(task, 5) == done(task, 2)


async def test_concurrent_readers_in_one_process_all_see_the_state(backend: AMQPBackend) -> None:
    task = task_id()
    await backend.set_state(done(task))
    got = await asyncio.gather(*(backend.get_state(task) for _ in range(20)))
    assert all(g is not None and g.state == SUCCESS for g in got)


async def test_wait_completed_wakes_on_a_go_workers_write(
    backend: AMQPBackend, cnf: Config, admin: Admin, monkeypatch: pytest.MonkeyPatch
) -> None:
    from machinery.drivers.amqp import backend as amqp_backend

    monkeypatch.setattr(amqp_backend, "RECHECK", 60.0)  # no re-read within the wait: only a wake-up ends it
    task = task_id()
    await backend.set_state(TaskState(task, STARTED))
    reads = Calls(monkeypatch, backend, "_read_shared")

    async def go_worker() -> None:
        await reads.reach(2)  # read before and after the watch started: the wait is watching now
        await admin.publish(cnf.amqp.exchange, task, done(task, 5).to_json(), delivery_mode=2)

    writer = asyncio.create_task(go_worker())
    got = await backend.wait_completed(task, 20)
    assert got is not None and got.values() == [5]
    assert reads.count == 2  # woken by the state's message, not found by a re-read
    await writer


async def test_wait_completed_honours_its_timeout_when_rabbitmq_is_down() -> None:
    backend = AMQPBackend(make_cnf(url="amqp://guest:guest@127.0.0.1:1/"))
    backend.retry_window = 30.0  # far longer than the wait: the wait's own timeout must win
    start = time.monotonic()
    assert await backend.wait_completed(task_id(), 0.5) is None
    assert time.monotonic() - start < 10.0
    with pytest.raises(BackendError, match="not reachable"):
        await backend.get_state(task_id())
    await backend.close()


async def test_fanout_exchange_keeps_states_out_of_task_queues(admin: Admin) -> None:
    cnf = make_cnf(exchange_type="fanout")
    admin.track(cnf)
    ch = await admin.channel()
    await ch.exchange_declare(cnf.amqp.exchange, exchange_type="fanout", durable=True)
    await ch.queue_declare(cnf.default_queue, durable=True)
    await ch.queue_bind(cnf.default_queue, cnf.amqp.exchange, routing_key="")
    await ch.close()
    backend = AMQPBackend(cnf)
    try:
        task = task_id()
        await backend.set_state(done(task))
        assert await admin.count(cnf.default_queue) == 0  # Go would have put the state in the task queue
        assert await backend.wait_completed(task, 5) == done(task)
    finally:
        await backend.close()


async def test_chord_lock_is_released_when_its_holder_dies(cnf: Config) -> None:
    holder, other = AMQPBackend(cnf), AMQPBackend(cnf)
    group = f"group_{uuid.uuid4()}"
    await holder.init_group(group, [task_id()])
    state = holder._state()
    ctx = holder._group_lock(state, group)
    await ctx.__aenter__()
    other.retry_window = 5
    blocked = asyncio.create_task(other.trigger_chord(group))
    await asyncio.sleep(0.5)
    assert not blocked.done()  # the mutex is held by another connection
    conn = await state.link.connection()
    await conn.close()  # the holder's process dies: RabbitMQ drops its exclusive queue
    assert await asyncio.wait_for(blocked, 10) is True
    assert await other.trigger_chord(group) is False
    await other.close()
    await holder.close()
