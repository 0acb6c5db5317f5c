"""Write-behind batching of state writes and acks: the worker's hot path to the stores.

Everything queued while a flush is in flight goes out together in the next one, so batch size
follows load: one round trip per task when idle, one per hundreds of tasks when busy. States are
coalesced per task (STARTED queued but not yet written is replaced by SUCCESS), and an ack is
only queued by the worker after the task's final state has been flushed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.backends.base import Backend
    from machinery.brokers.base import Broker, Delivery
    from machinery.tasks.state import TaskState


class Committer:
    """Runs as one background task per worker; call put_state/ack from the worker's event loop."""

    def __init__(self, backend: Backend, broker: Broker) -> None:
        self._backend = backend
        self._broker = broker
        self._states: dict[str, TaskState] = {}
        self._futures: list[asyncio.Future[None]] = []
        self._acks: list[Delivery] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._joint = backend.joint_commit(broker)

    def put_state(self, state: TaskState) -> None:
        """Queue a state write; a later state of the same task replaces it if not yet written."""
        self._states.pop(state.task_uuid, None)
        self._states[state.task_uuid] = state
        self._idle.clear()
        self._wake.set()

    async def store(self, state: TaskState) -> None:
        """Queue a state and wait until it (or a later one) is stored."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        self.put_state(state)
        await fut

    def ack(self, delivery: Delivery) -> None:
        self._acks.append(delivery)
        self._idle.clear()
        self._wake.set()

    async def run(self) -> None:
        log = get_logger()
        delay = 0.05
        while True:
            await self._wake.wait()
            self._wake.clear()
            states, futures, acks = self._states, self._futures, self._acks
            self._states, self._futures, self._acks = {}, [], []
            # The acks queued here belong to tasks whose final states an earlier flush stored, so
            # both writes go out at once: one round trip per flush, not two.
            if self._joint is not None and (states or acks):
                stored, acked = await self._joint(list(states.values()), acks)
            elif states and acks:
                stored, acked = await asyncio.gather(self._store(states), self._ack(acks))
            else:
                stored, acked = await self._store(states), await self._ack(acks)
            if isinstance(stored, Exception):
                log.error("storing %d task states failed, retrying in %.2f s: %s", len(states), delay, stored)
            if isinstance(acked, Exception):
                log.error("acking %d messages failed, retrying in %.2f s: %s", len(acks), delay, acked)
            if stored is None:
                for fut in futures:
                    if not fut.done():
                        fut.set_result(None)
            if stored is not None or acked is not None:
                self._requeue(states if stored is not None else {}, futures if stored is not None else [],
                              acks if acked is not None else [])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            if not self._states and not self._acks:
                self._idle.set()

    async def _store(self, states: dict[str, TaskState]) -> Exception | None:
        if states:
            try:
                await self._backend.set_states(list(states.values()))
            except Exception as exc:
                return exc
        return None

    async def _ack(self, acks: list[Delivery]) -> Exception | None:
        if acks:
            try:
                await self._broker.ack(acks)
            except Exception as exc:
                return exc
        return None

    def _requeue(self, states: dict[str, TaskState], futures: list[asyncio.Future[None]],
                 acks: list[Delivery]) -> None:
        """Put a failed batch back in front of anything queued since (newer states win)."""
        merged = dict(states)
        for uuid, st in self._states.items():
            merged.pop(uuid, None)
            merged[uuid] = st
        self._states = merged
        self._futures = futures + self._futures
        self._acks = acks + self._acks
        self._wake.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is written and acked."""
        await self._idle.wait()
