"""In-process broker for unit tests and users' own tests; shared by threads and event loops."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING

from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import DeadLetterListing, DelayedListing
from machinery.tasks.signature import Signature
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config

_ANY = "*"


class MemoryBroker(Broker, DelayedListing, DeadLetterListing):
    """Queues in a dict; delayed messages in a heap; nothing survives the process."""

    def __init__(self, cnf: Config, url: str = "memory://") -> None:
        super().__init__(cnf, url)
        self._lock = threading.Lock()
        self._queues: dict[str, deque[tuple[int, bytes, int]]] = {}
        self._delayed: list[tuple[int, int, str, bytes, int]] = []  # (eta_ns, id, queue, body, attempts)
        self._inflight: dict[int, tuple[str, bytes, int]] = {}
        self._dead: list[tuple[bytes, str]] = []
        self._ids = itertools.count(1)
        self._waiters = Waiters()

    def _route(self, sig: Signature) -> str:
        return sig.routing_key or self.cnf.default_queue

    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        self._put(self._route(sig), body, eta_ns)

    async def publish_many(self, items: Sequence[tuple[Signature, bytes, int | None]]) -> None:
        for sig, body, eta_ns in items:
            self._put(self._route(sig), body, eta_ns)

    def _put(self, queue: str, body: bytes, eta_ns: int | None, attempts: int = 0) -> None:
        msg_id = next(self._ids)
        with self._lock:
            if eta_ns is not None and eta_ns > time.time_ns():
                heapq.heappush(self._delayed, (eta_ns, msg_id, queue, body, attempts))
            else:
                self._queues.setdefault(queue, deque()).append((msg_id, body, attempts))
        self._waiters.notify(queue)
        self._waiters.notify(_ANY)

    def _move_due(self) -> float | None:
        """Move due delayed messages to their queues; seconds until the next one, if any."""
        now = time.time_ns()
        moved: set[str] = set()
        while self._delayed and self._delayed[0][0] <= now:
            _, msg_id, queue, body, attempts = heapq.heappop(self._delayed)
            self._queues.setdefault(queue, deque()).append((msg_id, body, attempts))
            moved.add(queue)
        return (self._delayed[0][0] - now) / 1e9 if self._delayed else None

    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        deadline = time.monotonic() + wait
        while True:
            fut = self._waiters.register(queue)
            try:
                with self._lock:
                    next_due = self._move_due()
                    q = self._queues.get(queue)
                    out: list[Delivery] = []
                    while q and len(out) < max_count:
                        msg_id, body, attempts = q.popleft()
                        self._inflight[msg_id] = (queue, body, attempts + 1)
                        out.append(Delivery(body, queue, msg_id, attempts > 0, attempts + 1))
                if out:
                    return out
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                timeout = left if next_due is None else min(left, next_due)
                try:
                    await asyncio.wait_for(asyncio.shield(fut), timeout)
                except TimeoutError:
                    pass
            finally:
                self._waiters.discard(queue, fut)

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        with self._lock:
            for d in deliveries:
                self._inflight.pop(d.receipt, None)

    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        for d in deliveries:
            with self._lock:
                item = self._inflight.pop(d.receipt, None)
            if item is None:
                continue
            queue, body, attempts = item
            eta = time.time_ns() + int(delay * 1e9) if delay > 0 else None
            self._put(queue, body, eta, attempts)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        with self._lock:
            self._inflight.pop(delivery.receipt, None)
            self._dead.append((delivery.body, reason))

    async def pending(self, queue: str) -> list[bytes]:
        with self._lock:
            self._move_due()
            return [body for _, body, _ in self._queues.get(queue, ())]

    async def delayed(self) -> list[bytes]:
        with self._lock:
            return [body for _, _, _, body, _ in sorted(self._delayed)]

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        with self._lock:
            return list(self._dead)

    def inflight_count(self) -> int:
        with self._lock:
            return len(self._inflight)
