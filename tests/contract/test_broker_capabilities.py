"""Broker capabilities: each interface checked on every broker that declares it (declared.py)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

import pytest

from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import (
    BlockingPublish,
    DeadLetterListing,
    DelayedListing,
    EarlyHandout,
    Leases,
)

from .conftest import Driver
from .declared import brokers_with, brokers_without
from .test_broker_contract import PROMPT, bodies, default_queue, drain, message, other_queue, publish

C = TypeVar("C")


def cap(broker: Broker, kind: type[C]) -> C:
    impl = broker.capability(kind)
    assert impl is not None, f"{type(broker).__name__} declares {kind.__name__} in declared.py"
    return impl


async def eventually(condition: Callable[[], bool], seconds: float) -> bool:
    """Whether `condition()` holds within `seconds` (checked every 10 ms)."""
    deadline = time.monotonic() + seconds
    for _ in range(int(seconds * 100) + 1):
        if condition() or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.01)
    return condition()


# --- Leases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("broker_of", brokers_with(Leases), indirect=True)
async def test_unrenewed_lease_expires_and_renewed_one_does_not(broker_of: Driver[Broker]) -> None:
    broker_of.configure(lease_seconds=0.8)
    broker = await broker_of.open()
    leases = cap(broker, Leases)
    lease = leases.lease_seconds
    assert 0 < lease <= 0.8, "the factory must honour env.lease_seconds"
    dropped = await publish(broker, 1)
    kept = await publish(broker, 2)
    before_claim = time.monotonic()
    got = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(got) == [dropped, kept]
    keep = [d for d in got if d.body == kept]

    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            await leases.renew(keep)
            await asyncio.sleep(lease / 4)

    beat = asyncio.create_task(heartbeat())
    try:
        other = await broker_of.open()
        early = await other.fetch(default_queue(broker), 10, lease / 3)
        if time.monotonic() < before_claim + lease:  # (a stalled test runner may get here later)
            assert early == [], "taken before its lease ended"
        again = early or await other.fetch(default_queue(broker), 10, lease + 3.0)
        assert bodies(again) == [dropped]
        assert again[0].redelivered is True
        assert again[0].attempts == 2
        await other.ack(again)
        # The renewed message stays claimed well past several lease lengths.
        assert await other.fetch(default_queue(broker), 10, lease * 2.5) == []
    finally:
        stop.set()
        await beat
    await broker.ack(keep)
    assert await broker.fetch(default_queue(broker), 10, lease + 0.5) == []
    assert await broker.pending(default_queue(broker)) == []


@pytest.mark.parametrize("broker_of", brokers_with(Leases), indirect=True)
async def test_acked_message_does_not_come_back_after_lease(broker_of: Driver[Broker]) -> None:
    broker_of.configure(lease_seconds=0.5)
    broker = await broker_of.open()
    leases = cap(broker, Leases)
    await publish(broker, 1)
    got = await broker.fetch(default_queue(broker), 10, 2.0)
    assert len(got) == 1
    await broker.ack(got)
    assert await broker.fetch(default_queue(broker), 10, leases.lease_seconds + 0.8) == []


@pytest.mark.parametrize("broker_of", brokers_with(Leases), indirect=True)
async def test_renewing_an_acked_delivery_does_not_revive_it(broker_of: Driver[Broker]) -> None:
    broker_of.configure(lease_seconds=0.5)
    broker = await broker_of.open()
    leases = cap(broker, Leases)
    await publish(broker, 1)
    got = await broker.fetch(default_queue(broker), 10, 2.0)
    await broker.ack(got)
    await leases.renew(got)
    assert await broker.fetch(default_queue(broker), 10, leases.lease_seconds + 0.8) == []
    assert await broker.pending(default_queue(broker)) == []


# --- EarlyHandout ----------------------------------------------------------------------------


async def handed_out(broker: Broker, i: int = 1, tag: str = "m") -> Delivery:
    """A message published while a fetch waits: what an EarlyHandout broker hands out before its claim."""

    async def later() -> None:
        await asyncio.sleep(0.2)
        await publish(broker, i, tag=tag)

    sender = asyncio.create_task(later())
    got = await broker.fetch(default_queue(broker), 10, 5.0)
    await sender
    assert len(got) == 1
    return got[0]


@pytest.mark.parametrize("broker_of", brokers_with(EarlyHandout), indirect=True)
async def test_a_message_arriving_during_a_fetch_is_handed_out_before_its_claim_and_settles(
    broker_of: Driver[Broker],
) -> None:
    broker_of.configure(lease_seconds=1.0)
    broker = await broker_of.open()
    early = cap(broker, EarlyHandout)
    d = await handed_out(broker)
    assert early.unclaimed(d), "handed out before its claim"
    await early.settle([d])
    assert not early.unclaimed(d)
    assert d.receipt is not None and d.attempts == 1 and d.redelivered is False
    await early.settle([d])  # settled: no-op
    await broker.ack([d])
    assert await broker.fetch(default_queue(broker), 10, 1.5) == []


@pytest.mark.parametrize("broker_of", brokers_with(EarlyHandout), indirect=True)
async def test_claim_soon_claims_without_being_awaited(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    early = cap(broker, EarlyHandout)
    d = await handed_out(broker)
    assert early.unclaimed(d)
    early.claim_soon(d)
    assert early.hold(d) is False, "its claim is under way: no joint commit may take it now"
    assert await eventually(lambda: not early.unclaimed(d), PROMPT), "the claim did not run by itself"
    assert d.receipt is not None
    assert early.hold(d) is True, "claimed: a joint commit acks it by its receipt"
    await broker.ack([d])


@pytest.mark.parametrize("broker_of", brokers_with(EarlyHandout), indirect=True)
async def test_requeue_and_ack_of_a_handed_out_delivery_settle_by_themselves(broker_of: Driver[Broker]) -> None:
    broker_of.configure(lease_seconds=1.0)
    broker = await broker_of.open()
    d = await handed_out(broker)
    await broker.requeue([d])  # no settle() first
    again = await broker.fetch(default_queue(broker), 10, 2.0)
    assert bodies(again) == [d.body]
    await cap(broker, EarlyHandout).settle(again)  # it may be handed out early again
    assert again[0].redelivered is True and again[0].attempts == 2
    await broker.ack(again)
    d2 = await handed_out(broker, 2)
    await broker.ack([d2])  # no settle() first
    assert await broker.fetch(default_queue(broker), 10, 1.5) == []
    assert await broker.pending(default_queue(broker)) == []


@pytest.mark.parametrize("broker_of", brokers_with(EarlyHandout), indirect=True)
async def test_a_delivery_claimed_by_its_fetch_is_not_unclaimed(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    early = cap(broker, EarlyHandout)
    await publish(broker, 1)
    got = await broker.fetch(default_queue(broker), 10, 2.0)  # waiting in the queue: claimed at once
    assert len(got) == 1 and got[0].receipt is not None
    assert not early.unclaimed(got[0])
    assert early.hold(got[0]) is True
    await broker.ack(got)


# --- BlockingPublish -------------------------------------------------------------------------


@pytest.mark.parametrize("broker_of", brokers_with(BlockingPublish), indirect=True)
async def test_publish_blocking_in_the_callers_thread(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    publisher = cap(broker, BlockingPublish)
    sig, body = message(1)
    other_sig, other_body = message(2, queue=other_queue(broker_of))
    assert await asyncio.to_thread(publisher.publish_blocking, (sig, body, None)) is True
    assert await asyncio.to_thread(publisher.publish_blocking, (other_sig, other_body, None)) is True
    assert bodies(await broker.fetch(default_queue(broker), 10, 2.0)) == [body]
    assert bodies(await broker.fetch(other_queue(broker_of), 10, 2.0)) == [other_body]


@pytest.mark.parametrize("broker_of", brokers_with(BlockingPublish), indirect=True)
async def test_publish_blocking_leaves_a_delayed_message_to_the_asyncio_path(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    publisher = cap(broker, BlockingPublish)
    eta_ns = time.time_ns() + 30_000_000_000
    sig, body = message(1, eta_ns=eta_ns)
    assert await asyncio.to_thread(publisher.publish_blocking, (sig, body, eta_ns)) is False
    assert await broker.pending(default_queue(broker)) == []
    listing = broker.capability(DelayedListing)
    assert listing is None or await listing.delayed() == []


# --- DelayedListing --------------------------------------------------------------------------


@pytest.mark.parametrize("broker_of", brokers_with(DelayedListing), indirect=True)
async def test_delayed_lists_a_held_message_until_it_is_due(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    listing = cap(broker, DelayedListing)
    eta_ns = time.time_ns() + 1_500_000_000
    body = await publish(broker, 1, eta_ns=eta_ns)
    assert await listing.delayed() == [body]
    got = await broker.fetch(default_queue(broker), 10, 5.0)
    assert bodies(got) == [body]
    assert await listing.delayed() == []
    await broker.ack(got)


@pytest.mark.parametrize("broker_of", brokers_with(DelayedListing), indirect=True)
async def test_delayed_lists_held_messages_by_eta_and_not_ready_ones(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    listing = cap(broker, DelayedListing)
    now = time.time_ns()
    late = await publish(broker, 1, eta_ns=now + 30_000_000_000)
    soon = await publish(broker, 2, eta_ns=now + 10_000_000_000, queue=other_queue(broker_of))
    mid = await publish(broker, 3, eta_ns=now + 20_000_000_000)
    await publish(broker, 4)
    await publish(broker, 5, eta_ns=now - 5_000_000_000)  # due already: never held
    assert await listing.delayed() == [soon, mid, late]


@pytest.mark.parametrize("broker_of", brokers_with(DelayedListing), indirect=True)
async def test_delayed_lists_what_publish_many_held(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    listing = cap(broker, DelayedListing)
    eta_ns = time.time_ns() + 30_000_000_000
    ready = [message(i) for i in range(3)]
    held = [message(i, eta_ns=eta_ns + i) for i in range(10, 13)]
    await broker.publish_many([(s, b, None) for s, b in ready] + [(s, b, eta_ns + i) for i, (s, b) in enumerate(held)])
    assert await listing.delayed() == [b for _, b in held]
    got = await drain(broker, default_queue(broker), 3, 3.0)
    assert bodies(got) == [b for _, b in ready]
    await broker.ack(got)


@pytest.mark.parametrize("broker_of", brokers_with(DelayedListing), indirect=True)
async def test_get_delayed_tasks_decodes_the_listing(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    await publish(broker, 7, eta_ns=time.time_ns() + 30_000_000_000)
    assert [s.uuid for s in await broker.aget_delayed_tasks()] == ["m-7"]


@pytest.mark.parametrize("broker_of", brokers_without(DelayedListing), indirect=True)
async def test_without_delayed_listing_get_delayed_tasks_is_empty(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    assert broker.capability(DelayedListing) is None
    await publish(broker, 7, eta_ns=time.time_ns() + 30_000_000_000)
    assert await broker.aget_delayed_tasks() == []


# --- DeadLetterListing -----------------------------------------------------------------------


@pytest.mark.parametrize("broker_of", brokers_with(DeadLetterListing), indirect=True)
async def test_dead_letters_keep_body_and_reason(broker_of: Driver[Broker]) -> None:
    broker = await broker_of.open()
    listing = cap(broker, DeadLetterListing)
    first, second = await publish(broker, 1), await publish(broker, 2)
    got = await drain(broker, default_queue(broker), 2, 3.0)
    assert bodies(got) == [first, second]
    await broker.dead_letter(got[0], "undecodable: bad JSON")
    assert await listing.dead_letters() == [(first, "undecodable: bad JSON")]
    await broker.dead_letter(got[1], "malformed signature: no Name")
    expected = sorted([(first, "undecodable: bad JSON"), (second, "malformed signature: no Name")])
    assert sorted(await listing.dead_letters()) == expected
    assert sorted(await listing.dead_letters()) == expected, "listing does not consume"
    assert await broker.fetch(default_queue(broker), 10, 0.3) == []
