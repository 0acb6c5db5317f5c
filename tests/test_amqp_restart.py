"""On a private RabbitMQ node: stopped and started mid-run, publishing and consuming carry on with
nothing lost and waiters still wake; a second URL takes over while the first is down; amqps://."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest

from amqp_support import AMQP_URL, Admin, PrivateRabbit, make_cnf, private_rabbit_node, require_rabbit, unavailable
from machinery.drivers.amqp.backend import AMQPBackend
from machinery.drivers.amqp.broker import AMQPBroker
from machinery.errors import BrokerError
from machinery.tasks.signature import Signature, decode_signature, encode_signature
from machinery.tasks.state import STARTED, SUCCESS, TaskResult, TaskState

pytestmark = [pytest.mark.amqp, pytest.mark.slow]


rabbit = pytest.fixture(scope="module", name="rabbit")(private_rabbit_node)


async def bounce(node: PrivateRabbit, after: float, down: float) -> None:
    await asyncio.sleep(after)
    await asyncio.to_thread(node.stop_app)
    await asyncio.sleep(down)
    await asyncio.to_thread(node.start_app)


async def test_broker_restart_mid_run_loses_nothing(rabbit: PrivateRabbit) -> None:
    cnf = make_cnf(url=rabbit.url)
    producer, consumer = AMQPBroker(cnf), AMQPBroker(cnf)
    total = 150
    sent: list[str] = []
    received: set[str] = set()

    async def produce() -> None:
        for i in range(total):
            s = Signature("add", [i], uuid=f"task_{i}")
            await producer.publish(s, encode_signature(s), None)
            sent.append(s.uuid)
            await asyncio.sleep(0.02)

    async def consume() -> None:
        deadline = time.monotonic() + 90
        while len(received) < total and time.monotonic() < deadline:
            got = await consumer.fetch(cnf.default_queue, 10, 0.5)
            received.update(decode_signature(d.body).uuid for d in got)
            await consumer.ack(got)

    try:
        await asyncio.gather(produce(), consume(), bounce(rabbit, after=0.8, down=2.0))
    finally:
        await producer.close()
        await consumer.close()
    assert len(sent) == total
    assert received == set(sent)


async def test_waiter_and_states_survive_a_restart(rabbit: PrivateRabbit) -> None:
    cnf = make_cnf(url=rabbit.url)
    backend, writer = AMQPBackend(cnf), AMQPBackend(cnf)
    task = f"task_{uuid.uuid4()}"
    try:
        await writer.set_state(TaskState(task, STARTED))
        waiter = asyncio.create_task(backend.wait_completed(task, 60))
        await asyncio.sleep(0.3)
        await bounce(rabbit, after=0, down=1.5)
        final = TaskState(task, SUCCESS, results=[TaskResult("int64", 1)])
        await writer.set_state(final)  # reconnects; Go's state queues are transient, declared again
        assert await asyncio.wait_for(waiter, 30) == final
        assert await backend.get_state(task) == final
    finally:
        await backend.close()
        await writer.close()


async def test_second_url_takes_over_while_the_first_is_down(rabbit: PrivateRabbit) -> None:
    await require_rabbit()
    cnf = make_cnf(url=f"{rabbit.url},{AMQP_URL}")
    cnf.multiple_broker_separator = ","
    broker = AMQPBroker(cnf)
    async with Admin(AMQP_URL) as main:
        main.track(cnf)
        try:
            first = Signature("add", [1], uuid="task_first")
            await broker.publish(first, encode_signature(first), None)
            state = broker._states.current()
            assert state is not None and state.link.url_index == 0
            await asyncio.to_thread(rabbit.stop_app)
            second = Signature("add", [2], uuid="task_second")
            await broker.publish(second, encode_signature(second), None)
            assert state.link.url_index == 1
            assert [decode_signature(m.body).uuid for m in await main.peek(cnf.default_queue)] == ["task_second"]
        finally:
            await asyncio.to_thread(rabbit.start_app)
            await broker.close()
    async with Admin(rabbit.url) as private:  # the first task waited on the first node, durable
        private.track(cnf)
        assert [decode_signature(m.body).uuid for m in await private.peek(cnf.default_queue)] == ["task_first"]


async def test_amqps_with_the_configured_tls_context(rabbit: PrivateRabbit) -> None:
    if not rabbit.tls_url:
        unavailable("openssl is not installed: no TLS listener on the private node")
    cnf = make_cnf(url=rabbit.tls_url)
    cnf.tls = rabbit.client_tls()
    broker, backend = AMQPBroker(cnf), AMQPBackend(cnf)
    try:
        s = Signature("add", [1], uuid="task_tls")
        await broker.publish(s, encode_signature(s), None)
        got = await broker.fetch(cnf.default_queue, 1, 5.0)
        assert [decode_signature(d.body).uuid for d in got] == ["task_tls"]
        await broker.ack(got)
        await backend.set_state(TaskState("task_tls", SUCCESS))
        assert await backend.wait_completed("task_tls", 5) == TaskState("task_tls", SUCCESS)
    finally:
        await broker.close()
        await backend.close()
    untrusted = make_cnf(url=rabbit.tls_url)  # the default context does not trust the test CA
    untrusted_broker = AMQPBroker(untrusted)
    start = time.monotonic()
    with pytest.raises(BrokerError, match=r"certificate not trusted .*CERTIFICATE_VERIFY_FAILED"):
        await untrusted_broker.publish(s, encode_signature(s), None)
    assert time.monotonic() - start < 5  # not retried for the 30 s window: retrying cannot help
    await untrusted_broker.close()
