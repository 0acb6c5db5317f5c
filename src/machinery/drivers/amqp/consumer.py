"""The consumer side of the AMQP broker: a channel's unacked deliveries, the fetch buffer, and how
a delivery (and a requeued copy) is described."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final
from uuid import uuid4

from aiormq.abc import AbstractChannel, DeliveredMessage

from machinery.drivers.amqp.connection import delivery_tag, int_header
from machinery.drivers.broker import Delivery

REQUEUES_HEADER: Final = "x-machinery-requeues"
BOUNCED_HEADER: Final = "x-machinery-bounced-by"
ETA_HEADER: Final = "x-machinery-eta"
_NOT_COPIED: Final = frozenset({
    "x-death", "x-first-death-exchange", "x-first-death-queue", "x-first-death-reason",
    "x-last-death-exchange", "x-last-death-queue", "x-last-death-reason", ETA_HEADER, BOUNCED_HEADER,
})


@dataclass(eq=False, slots=True)
class Chan:
    """One consumer channel; deliveries carry it so acks go to the channel that delivered them."""

    channel: AbstractChannel
    ident: str  # the consumer's, kept across channels
    outstanding: set[int] = field(default_factory=set)
    tag: str = ""
    dead: bool = False

    def usable(self) -> bool:
        return not self.dead and not self.channel.is_closed


class Consumer:
    """basic.consume on one queue; deliveries wait in `buffer` until fetch() takes them."""

    def __init__(self, queue: str) -> None:
        self.queue = queue
        self.ident = uuid4().hex[:16]
        self.chan: Chan | None = None
        self.prefetch = 0
        self.buffer: deque[tuple[Chan, DeliveredMessage]] = deque()
        self.arrived = asyncio.Event()
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()

    def alive(self) -> bool:
        return self.chan is not None and self.chan.usable()

    def wake(self) -> None:
        self.arrived.set()

    def close_later(self, channel: AbstractChannel) -> None:
        if channel.is_closed:
            return
        task = asyncio.get_running_loop().create_task(channel.close())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


def republish_headers(d: Delivery) -> dict[str, Any]:
    """Headers for a copy of `d`: RabbitMQ's dead-letter history and our routing notes dropped."""
    return {k: v for k, v in (d.extra.get("headers") or {}).items() if k not in _NOT_COPIED}


def to_delivery(queue: str, chan: Chan, msg: DeliveredMessage) -> Delivery:
    """Requeues through a delay queue count as redeliveries (RabbitMQ sees a new message)."""
    props = msg.header.properties
    headers = dict(props.headers or {})
    requeues = int_header(msg, REQUEUES_HEADER)
    redelivered = bool(getattr(msg.delivery, "redelivered", False))
    count = headers.get("x-delivery-count")  # quorum queues count deliveries
    attempts = count + 1 if isinstance(count, int) else 1 + requeues + int(redelivered)
    priority: int | None = props.priority
    extra = {"headers": headers, "priority": priority, "amqp_redelivered": redelivered,
             "bounced_by": headers.get(BOUNCED_HEADER)}
    return Delivery(msg.body, queue, (chan, delivery_tag(msg)), redelivered or requeues > 0, attempts, extra)
