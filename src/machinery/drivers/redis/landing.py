"""Messages a blocked fetch BLMOVEd into its consumer's landing list, handed out before any claim.

While a message sits in the landing list it is guarded like the list itself: by the consumer's
deadline in the consumers zset, which every claim and every landed commit renews, and past which
any consumer's reaper puts the list back on the queue. So a task that finishes quickly needs no
claim at all: its final state and the removal of its message from the landing list go in one
script (the result backend's landed commit), one write on the worker for the whole task. Only a
task still running after a short delay, or one that needs its receipt (a TaskContext, a requeue, a
dead letter, a renew), is claimed into the in-flight hash under a lease, as any fetched message.

Each delivery is either waiting (its claim not started), held (a landed commit in flight: no
claim may start, or the claim would give it a second life in the in-flight hash), or claiming.
The fetch loop waits until every landed delivery is resolved (committed or claimed) before it
claims again, since a claim drains the landing list.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from typing import Any

from machinery.drivers.broker import Delivery

Claim = Callable[[], Coroutine[Any, Any, None]]


class _Landed:
    __slots__ = ("claim", "done", "held", "start", "timer")

    def __init__(self, start: Claim, done: asyncio.Future[None], timer: asyncio.TimerHandle) -> None:
        self.start = start
        self.done = done
        self.timer = timer
        self.held = False
        self.claim: asyncio.Task[None] | None = None


class Landings:
    """The landed deliveries of one broker, on the worker's event loop."""

    def __init__(self) -> None:
        self._entries: dict[Delivery, _Landed] = {}

    def __bool__(self) -> bool:
        return bool(self._entries)

    def __contains__(self, d: Delivery) -> bool:
        return d in self._entries

    def add(self, d: Delivery, start: Claim, delay: float) -> None:
        """Track `d`; `start()` claims it (and whatever else its landing list holds), which
        begins after `delay` seconds unless a landed commit or settle() comes first."""
        loop = asyncio.get_running_loop()
        timer = loop.call_later(delay, self.claim, d)
        self._entries[d] = _Landed(start, loop.create_future(), timer)

    def claim(self, d: Delivery) -> None:
        """Start the claim of `d` now (unless held or started)."""
        e = self._entries.get(d)
        if e is None or e.held or e.claim is not None:
            return
        e.timer.cancel()
        e.claim = asyncio.get_running_loop().create_task(e.start())
        e.claim.add_done_callback(lambda _: self._resolve(d))

    def _resolve(self, d: Delivery) -> None:
        e = self._entries.pop(d, None)
        if e is not None:
            e.timer.cancel()
            if not e.done.done():
                e.done.set_result(None)

    def hold(self, d: Delivery) -> bool:
        """Reserve `d` for a landed commit (True), unless its claim has started (False); True for
        a delivery not landed here (claimed in the ordinary way)."""
        e = self._entries.get(d)
        if e is None:
            return True
        if e.claim is not None:
            return False
        e.held = True
        e.timer.cancel()
        return True

    def held(self, d: Delivery) -> bool:
        e = self._entries.get(d)
        return e is not None and e.held

    def committed(self, deliveries: Sequence[Delivery]) -> None:
        """Their landed commit ran: state stored and message out of the landing list."""
        for d in deliveries:
            self._resolve(d)

    def failed(self, deliveries: Sequence[Delivery]) -> None:
        """Their landed commit failed (or its reply was lost): claim them now. A claim that no
        longer finds a message (the commit did run) leaves it without a receipt, which nothing acks."""
        for d in deliveries:
            e = self._entries.get(d)
            if e is not None:
                e.held = False
                self.claim(d)

    async def settle(self, deliveries: Sequence[Delivery]) -> None:
        """Claim these now (unless held) and wait for their claims."""
        tasks = []
        for d in deliveries:
            e = self._entries.get(d)
            if e is None or e.held:
                continue
            self.claim(d)
            if e.claim is not None:
                tasks.append(e.claim)
        if tasks:
            await asyncio.gather(*(asyncio.shield(t) for t in tasks))

    async def resolved(self) -> None:
        """Wait until every landed delivery is committed or claimed."""
        pending = [e.done for e in self._entries.values()]
        if pending:
            await asyncio.gather(*(asyncio.shield(f) for f in pending))

    def close(self) -> None:
        for e in self._entries.values():
            e.timer.cancel()
