"""The Broker contract: what the worker and server rely on, checked against every driver."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from typing import Any, TypeVar

from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import DelayedListing, Leases
from machinery.tasks.signature import Signature

from .conftest import Driver

T = TypeVar("T")

PROMPT = 2.0  # "promptly": far below the waits used, far above scheduling noise on a busy CI box


def message(i: int, queue: str = "", eta_ns: int | None = None, tag: str = "m") -> tuple[Signature, bytes]:
    sig = Signature("contract_task", [i], uuid=f"{tag}-{i}", routing_key=queue)
    if eta_ns is not None:
        sig.eta = datetime.fromtimestamp(eta_ns / 1e9, UTC)
    return sig, sig.to_json()


async def publish(broker: Broker, i: int, queue: str = "", eta_ns: int | None = None, tag: str = "m") -> bytes:
    sig, body = message(i, queue, eta_ns, tag)
    await broker.publish(sig, body, eta_ns)
    return body


def default_queue(broker: Broker) -> str:
    return broker.cnf.default_queue


def other_queue(driver: Driver[Broker], name: str = "other") -> str:
    return f"{driver.env.namespace}_{name}"


async def drain(broker: Broker, queue: str, expect: int, deadline_s: float, batch: int = 100) -> list[Delivery]:
    """Fetch until `expect` deliveries arrived or the deadline passed."""
    out: list[Delivery] = []
    deadline = time.monotonic() + deadline_s
    while len(out) < expect:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        out.extend(await broker.fetch(queue, batch, min(left, 0.5)))
    return out


async def in_other_loop(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on a fresh event loop in another thread."""
    return await asyncio.to_thread(lambda: asyncio.run(fn()))


def bodies(ds: list[Delivery]) -> list[bytes]:
    return [d.body for d in ds]


def listed(driver: Driver[Broker], expected: list[T]) -> list[T]:
    """What pending() returns: `expected`, or [] for a broker with the "no_listing" cap."""
    return [] if "no_listing" in driver.caps else expected


# --- publish / fetch -------------------------------------------------------------------------


async def test_publish_then_fetch_returns_body(broker: Broker) -> None:
    body = await publish(broker, 1)
    got = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(got) == [body]
    d = got[0]
    assert d.queue == default_queue(broker)
    assert d.redelivered is False
    assert d.attempts == 1
    await broker.ack(got)


async def test_fifo_order_per_queue(broker: Broker) -> None:
    sent = [await publish(broker, i) for i in range(20)]
    got: list[bytes] = []
    while len(got) < 20:
        batch = await broker.fetch(default_queue(broker), 7, 2.0)
        assert batch, f"queue ran dry after {len(got)} of 20"
        assert len(batch) <= 7
        got.extend(bodies(batch))
        await broker.ack(batch)
    assert got == sent


async def test_routing_key_selects_queue_and_empty_key_uses_default(
    broker_driver: Driver[Broker], broker: Broker
) -> None:
    q2 = other_queue(broker_driver)
    routed = await publish(broker, 1, queue=q2)
    default = await publish(broker, 2)
    got_default = await broker.fetch(default_queue(broker), 10, 1.0)
    assert bodies(got_default) == [default]
    got_q2 = await broker.fetch(q2, 10, 1.0)
    assert bodies(got_q2) == [routed]
    assert got_q2[0].queue == q2
    await broker.ack(got_default + got_q2)


async def test_fetch_respects_max_count(broker: Broker) -> None:
    sent = [await publish(broker, i) for i in range(10)]
    first = await broker.fetch(default_queue(broker), 3, 1.0)
    assert bodies(first) == sent[:3]
    rest = await drain(broker, default_queue(broker), 7, 3.0)
    assert bodies(rest) == sent[3:]
    assert await broker.fetch(default_queue(broker), 100, 0.1) == []


async def test_fetch_returns_empty_after_wait_when_empty(broker: Broker) -> None:
    start = time.monotonic()
    assert await broker.fetch(default_queue(broker), 10, 0.4) == []
    elapsed = time.monotonic() - start
    assert 0.35 <= elapsed < 0.4 + PROMPT
    start = time.monotonic()
    assert await broker.fetch(default_queue(broker), 10, 0.0) == []
    assert time.monotonic() - start < PROMPT


async def test_fetch_wakes_on_publish_from_another_task(broker: Broker) -> None:
    async def later() -> bytes:
        await asyncio.sleep(0.2)
        return await publish(broker, 7)

    task = asyncio.create_task(later())
    start = time.monotonic()
    got = await broker.fetch(default_queue(broker), 10, 10.0)
    elapsed = time.monotonic() - start
    assert bodies(got) == [await task]
    assert elapsed < PROMPT
    await broker.ack(got)


async def test_fetch_wakes_on_publish_from_another_loop(broker: Broker) -> None:
    async def later() -> bytes:
        await asyncio.sleep(0.2)
        try:
            return await publish(broker, 8)
        finally:
            await broker.close()  # this loop's connections

    publisher = asyncio.create_task(in_other_loop(later))
    start = time.monotonic()
    got = await broker.fetch(default_queue(broker), 10, 10.0)
    elapsed = time.monotonic() - start
    assert bodies(got) == [await publisher]
    assert elapsed < PROMPT
    await broker.ack(got)


async def test_fetch_wakes_on_publish_from_another_client(broker_driver: Driver[Broker], broker: Broker) -> None:
    producer = await broker_driver.open()

    async def later() -> bytes:
        await asyncio.sleep(0.2)
        return await publish(producer, 9)

    task = asyncio.create_task(later())
    start = time.monotonic()
    got = await broker.fetch(default_queue(broker), 10, 10.0)
    elapsed = time.monotonic() - start
    assert bodies(got) == [await task]
    assert elapsed < PROMPT
    await broker.ack(got)


async def test_fetch_in_another_loop_sees_messages(broker: Broker) -> None:
    body = await publish(broker, 3)

    async def consume() -> list[bytes]:
        try:
            got = await broker.fetch(default_queue(broker), 10, 2.0)
            await broker.ack(got)
            return bodies(got)
        finally:
            await broker.close()

    assert await in_other_loop(consume) == [body]
    assert await broker.fetch(default_queue(broker), 10, 0.2) == []


# --- claims, requeue, ack --------------------------------------------------------------------


async def test_fetched_message_is_invisible_until_requeued(broker: Broker) -> None:
    body = await publish(broker, 1)
    first = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(first) == [body]
    assert await broker.fetch(default_queue(broker), 10, 0.3) == []
    assert await broker.pending(default_queue(broker)) == []
    await broker.requeue(first)
    again = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(again) == [body]
    assert again[0].redelivered is True
    assert again[0].attempts == 2
    await broker.ack(again)


async def test_claimed_message_is_invisible_to_another_client(broker_driver: Driver[Broker], broker: Broker) -> None:
    other = await broker_driver.open()
    body = await publish(broker, 1)
    first = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(first) == [body]
    assert await other.fetch(default_queue(broker), 10, 0.3) == []
    await broker.requeue(first)
    if "push_consumer" in broker_driver.caps:
        # The broker pushes the requeued message to a live consumer with room: either client.
        await asyncio.sleep(0.2)
        holder = other if await broker.pending(default_queue(broker)) == [] else broker
        again = await holder.fetch(default_queue(broker), 10, 2.0)
        assert bodies(again) == [body]
        await holder.ack(again)
        return
    again = await other.fetch(default_queue(broker), 10, 2.0)
    assert bodies(again) == [body]
    await other.ack(again)


async def test_requeue_with_delay(broker: Broker) -> None:
    body = await publish(broker, 1)
    first = await broker.fetch(default_queue(broker), 10, 2.0)
    delay = 0.8
    requeued_at = time.monotonic()
    await broker.requeue(first, delay=delay)
    early = await broker.fetch(default_queue(broker), 10, 0.3)
    if early:  # only a test runner stalled past the delay gets here
        assert time.monotonic() - requeued_at >= delay - 0.05, "redelivered before its delay"
    again = early or await broker.fetch(default_queue(broker), 10, 5.0)
    assert bodies(again) == [body]
    assert time.monotonic() - requeued_at >= delay - 0.05
    assert again[0].redelivered is True
    await broker.ack(again)


async def test_ack_removes(broker_driver: Driver[Broker], broker: Broker) -> None:
    a = await publish(broker, 1)
    b = await publish(broker, 2)
    got = await broker.fetch(default_queue(broker), 1, 2.0)
    assert bodies(got) == [a]
    await broker.ack(got)
    assert await broker.pending(default_queue(broker)) == listed(broker_driver, [b])
    rest = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(rest) == [b]
    await broker.ack(rest)
    assert await broker.pending(default_queue(broker)) == []
    assert await broker.fetch(default_queue(broker), 10, 0.3) == []


# --- delayed messages ------------------------------------------------------------------------


async def test_eta_in_future_is_held_until_due(broker: Broker) -> None:
    eta_ns = time.time_ns() + 1_500_000_000
    body = await publish(broker, 1, eta_ns=eta_ns)
    assert await broker.pending(default_queue(broker)) == []
    early = await broker.fetch(default_queue(broker), 10, 0.3)  # empty, unless the runner stalled past the ETA
    got = early or await broker.fetch(default_queue(broker), 10, 5.0)
    assert bodies(got) == [body]
    assert time.time_ns() >= eta_ns - 2_000_000, "fetched before its ETA"
    await broker.ack(got)


async def test_eta_in_past_is_fetched_at_once(broker: Broker) -> None:
    body = await publish(broker, 1, eta_ns=time.time_ns() - 5_000_000_000)
    got = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(got) == [body]
    await broker.ack(got)


async def test_many_due_delayed_messages_all_become_fetchable(broker: Broker) -> None:
    eta_ns = time.time_ns() + 300_000_000
    items = [message(i, eta_ns=eta_ns) for i in range(60)]
    await broker.publish_many([(sig, body, eta_ns) for sig, body in items])
    await asyncio.sleep(0.4)
    got = await drain(broker, default_queue(broker), 60, 3.0)
    assert sorted(bodies(got)) == sorted(body for _, body in items)
    await broker.ack(got)


# --- inspection and dead letters -------------------------------------------------------------


async def test_pending_lists_without_consuming_in_order(broker_driver: Driver[Broker], broker: Broker) -> None:
    sent = [await publish(broker, i) for i in range(5)]
    other = await publish(broker, 99, queue=other_queue(broker_driver))
    assert await broker.pending(default_queue(broker)) == listed(broker_driver, sent)
    assert await broker.pending(default_queue(broker)) == listed(broker_driver, sent)
    assert await broker.pending(other_queue(broker_driver)) == listed(broker_driver, [other])
    got = await drain(broker, default_queue(broker), 5, 3.0)
    assert bodies(got) == sent
    await broker.ack(got)


async def test_get_pending_and_delayed_tasks_decode_signatures(broker_driver: Driver[Broker], broker: Broker) -> None:
    await publish(broker, 1)
    await publish(broker, 2, eta_ns=time.time_ns() + 30_000_000_000)
    pending = await broker.aget_pending_tasks()
    delayed = await broker.aget_delayed_tasks()
    assert [s.uuid for s in pending] == listed(broker_driver, ["m-1"])
    # listed by brokers with DelayedListing, [] from the others
    assert [s.uuid for s in delayed] == (["m-2"] if broker.capability(DelayedListing) else [])


async def test_dead_letter_takes_the_message_out_of_its_queue(broker: Broker) -> None:
    await publish(broker, 1)
    got = await broker.fetch(default_queue(broker), 10, 2.0)
    await broker.dead_letter(got[0], "undecodable: bad JSON")
    assert await broker.pending(default_queue(broker)) == []
    assert await broker.fetch(default_queue(broker), 10, 0.3) == []


async def test_publish_many(broker_driver: Driver[Broker], broker: Broker) -> None:
    q2 = other_queue(broker_driver)
    eta_ns = time.time_ns() + 30_000_000_000
    items = [message(i) for i in range(50)] + [message(i, queue=q2) for i in range(50, 60)]
    held = message(100, eta_ns=eta_ns)
    await broker.publish_many([(s, b, None) for s, b in items] + [(held[0], held[1], eta_ns)])
    assert await broker.pending(default_queue(broker)) == listed(broker_driver, [b for _, b in items[:50]])
    assert await broker.pending(q2) == listed(broker_driver, [b for _, b in items[50:]])
    got = await drain(broker, default_queue(broker), 50, 3.0)
    assert bodies(got) == [b for _, b in items[:50]]


async def test_cancelled_fetch_loses_no_message(broker_driver: Driver[Broker]) -> None:
    broker_driver.configure(lease_seconds=1.0)
    broker = await broker_driver.open()
    sent = {await publish(broker, i) for i in range(10)}
    received: list[Delivery] = []
    for _ in range(20):
        task = asyncio.create_task(broker.fetch(default_queue(broker), 3, 1.0))
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        task.cancel()
        try:
            received.extend(await task)
        except asyncio.CancelledError:
            pass
    # Whatever a cancelled fetch had claimed must come back (at the latest when its lease ends).
    leases = broker.capability(Leases)
    lease = 0.0 if leases is None else leases.lease_seconds
    received.extend(await drain(broker, default_queue(broker), len(sent) - len(received), lease + 3.0))
    assert sorted(bodies(received)) == sorted(sent)
