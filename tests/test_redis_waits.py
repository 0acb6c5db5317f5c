"""The Redis wait protocol (machinery.drivers.redis.waits), once for both faces: its decisions
on their own, then the asyncio face's send-ahead against a real server (test_redis_blocking.py
checks the blocking face's)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from machinery import Config, Server, Signature
from machinery.drivers.redis.backend import RedisBackend
from machinery.drivers.redis.waits import LAST_LOOK, RECHECK_FIRST, RECHECK_MAX, Caller, Step, Wait, channel_of
from machinery.tasks.state import STARTED, SUCCESS, TaskResult, TaskState, encode_state
from redis_servers import redis_url

# --- the decisions -------------------------------------------------------------------------------


def reads_until(wait: Wait, start: float, end: float) -> list[float]:
    """When a wait left alone (no message, no confirmation) reads, from `start` to `end`."""
    at, now = [], start
    while now < end:
        step, seconds = wait.next(now)
        if step is Step.READ:
            at.append(round(now - start, 6))
            continue
        assert step is Step.LISTEN and seconds > 0
        now += seconds
    return at


def test_a_wait_rereads_on_a_doubling_schedule_up_to_its_cap() -> None:
    assert (RECHECK_FIRST, RECHECK_MAX) == (0.25, 1.0)
    assert reads_until(Wait(None, 100.0), 100.0, 104.0) == [0.25, 0.75, 1.75, 2.75, 3.75]


def test_a_confirmation_reads_at_once_without_moving_the_schedule() -> None:
    wait = Wait(None, 0.0)
    assert wait.next(0.01) == (Step.LISTEN, pytest.approx(0.24))
    wait.confirmation()
    assert wait.next(0.02) == (Step.READ, 0.0)
    assert wait.next(0.03) == (Step.LISTEN, pytest.approx(0.22))


def test_subscribed_ahead_skips_the_first_confirmation_only() -> None:
    wait = Wait(None, 0.0, subscribed_ahead=True)
    wait.confirmation()  # the send's own subscription: nothing stored unseen before it
    assert wait.next(0.01)[0] is Step.LISTEN
    wait.confirmation()  # a resubscription after a reconnect: a PUBLISH may have been missed
    assert wait.next(0.02)[0] is Step.READ


def test_an_interruption_reads_at_once() -> None:
    wait = Wait(None, 0.0, subscribed_ahead=True)
    wait.interrupted()
    assert wait.next(0.01)[0] is Step.READ


def test_the_deadline_ends_listening_and_asks_for_one_bounded_last_look() -> None:
    wait = Wait(10.3, 10.0)
    assert wait.next(10.1) == (Step.LISTEN, pytest.approx(0.15))  # the first re-read comes first
    assert wait.next(10.25)[0] is Step.READ
    assert wait.next(10.26) == (Step.LISTEN, pytest.approx(0.04))  # the deadline comes first
    assert wait.next(10.3) == (Step.LAST_LOOK, LAST_LOOK)


def test_only_a_completed_state_ends_a_wait() -> None:
    done = TaskState("t", SUCCESS, results=[TaskResult("int64", 1)])
    assert Wait.published(encode_state(done)) == done
    assert Wait.published(encode_state(TaskState("t", STARTED))) is None
    assert Wait.outcome(None) is None


def test_a_caller_that_waits_for_what_it_sent_subscribes_with_its_next_send() -> None:
    caller = Caller()
    a, b, c, d = (channel_of(f"task_{x}") for x in "abcd")
    assert caller.before_send(a) is False  # nothing known yet
    assert caller.before_wait(a) is False  # not subscribed ahead: subscribe, then read
    assert caller.before_send(b) is True  # it waited for what it sent: subscribe with this send
    caller.after_send(b, 1)
    assert caller.before_wait(b) is True  # the send saw the subscription: only the PUBLISH
    assert caller.before_send(c) is True
    caller.after_send(c, 0)  # the subscription was not in place when the task went out
    assert caller.before_wait(c) is False
    assert caller.before_send(d) is True
    assert caller.before_send(a) is False  # sent twice without waiting: a bulk sender
    assert caller.before_wait(d) is False  # (an earlier task: does not arm it again)
    assert caller.before_send(b) is False


# --- the asyncio face against a server --------------------------------------------------------


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url())  # this run's own server
    await client.flushdb()
    yield client
    await client.aclose()


@pytest.fixture
async def server(raw: aioredis.Redis) -> AsyncIterator[Server]:
    s = Server(Config(broker=redis_url(), result_backend=redis_url(), results_expire_in=120))
    yield s
    await s.aclose()
    s.portal.close()


async def store(task_uuid: str, value: int) -> None:
    """SUCCESS stored (and published) by another client, as a worker does."""
    other = RedisBackend(Config(broker=redis_url(), result_backend=redis_url()))
    try:
        await other.set_state(TaskState(task_uuid, SUCCESS, results=[TaskResult("int64", value)]))
    finally:
        await other.close()


def counted_reads(backend: Any) -> list[str]:
    reads: list[str] = []
    read = backend.waits._read

    async def counting(task_uuid: str) -> Any:
        reads.append(task_uuid)
        return await read(task_uuid)

    backend.waits._read = counting
    return reads


@pytest.mark.redis
async def test_asyncio_send_and_wait_subscribes_with_the_send_and_reads_no_state(
    server: Server, raw: aioredis.Redis
) -> None:
    reads = counted_reads(server.get_backend())
    first = await server.asend_task(Signature("add", args=[0, 0], uuid="task_0"))
    await store("task_0", 0)
    assert await first.aget(timeout=5) == 0  # the first wait: SUBSCRIBE, then a read
    assert reads == ["task_0"]
    for i in range(1, 6):
        res = await server.asend_task(Signature("add", args=[i, 0], uuid=f"task_{i}"))
        channel = f"machinery:done:task_{i}"
        assert await raw.pubsub_numsub(channel) == [(channel.encode(), 1)]  # subscribed with the send
        await store(f"task_{i}", i)  # done before the wait starts: only the PUBLISH tells it
        assert await res.aget(timeout=5) == i
    assert reads == ["task_0"], "waits subscribed with their sends read no state"


@pytest.mark.redis
async def test_asyncio_sends_without_waits_do_not_subscribe_ahead(server: Server, raw: aioredis.Redis) -> None:
    first = await server.asend_task(Signature("add", args=[0, 0], uuid="task_0"))
    await store("task_0", 0)
    assert await first.aget(timeout=5) == 0
    sent = [await server.asend_task(Signature("add", args=[i, 0], uuid=f"task_{i}")) for i in range(1, 6)]
    await asyncio.sleep(0.3)  # past the Notifier's linger: an unused subscription is dropped
    channels = [f"machinery:done:task_{i}" for i in range(1, 6)]
    assert [n for _, n in await raw.pubsub_numsub(*channels)] == [0] * 5
    await store("task_3", 3)
    assert await sent[2].aget(timeout=5) == 3  # an earlier task's wait: subscribes and reads


@pytest.mark.redis
async def test_concurrent_asyncio_sends_and_waits_each_get_their_result(server: Server) -> None:
    """Tasks of one caller's gather share no send-ahead state: each is a caller of its own."""

    async def rpc(i: int) -> Any:
        res = await server.asend_task(Signature("add", args=[i, 0], uuid=f"task_{i}"))
        await asyncio.sleep(0.05)
        await store(f"task_{i}", i)
        return await res.aget(timeout=5)

    assert await rpc(100) == 100
    assert await asyncio.gather(*(rpc(i) for i in range(20))) == list(range(20))
