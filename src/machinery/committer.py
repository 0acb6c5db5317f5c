"""Write-behind batching of state writes and acks: the worker's hot path to the stores.

Everything queued while a flush is in flight goes out together in the next one, so batch size
follows load: one round trip per task when idle, one per hundreds of tasks when busy. States are
coalesced per task (STARTED queued but not yet written is replaced by SUCCESS). An ack goes out
only once its task's final state is stored: queued by the worker after that state was flushed, or
paired with the state (store(state, ack)). A pair goes in one atomic call when broker and backend
share a server (their pairing's JointCommit) and its claim has settled; otherwise its ack goes with
the next flush, alongside that flush's states.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import TYPE_CHECKING

from machinery.drivers.capabilities import EarlyHandout
from machinery.errors import UsageError
from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.drivers.backend import Backend
    from machinery.drivers.broker import Broker, Delivery
    from machinery.drivers.capabilities import JointCommit, Send
    from machinery.tasks.state import TaskState


class Committer:
    """Runs as one background task per worker; call put_state/ack from the worker's event loop."""

    #: seconds lone acks wait for a state write to ride with, when both go in one round trip
    #: (a joint commit): when tasks trickle in, each task then costs one write less
    ack_linger = 0.02

    def __init__(self, backend: Backend, broker: Broker, joint: JointCommit | None = None) -> None:
        self._backend = backend
        self._broker = broker
        self._states: dict[str, TaskState] = {}
        self._futures: list[asyncio.Future[None]] = []
        self._acks: list[Delivery] = []
        #: task uuid -> the deliveries to ack once that task's state is stored (several when
        #: deliveries share a UUID: a Signature sent twice, a redelivery beside its original)
        self._paired: dict[str, list[Delivery]] = {}
        self._sends: list[Send] = []  # follow-up tasks, sent after the states of this flush
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._state_queued = asyncio.Event()
        self._draining = False
        self._closed = False
        self._joint = joint
        self._early = broker.capability(EarlyHandout)
        #: store() takes follow-up sends (one round trip with the state they follow)
        self.carries_sends = self._joint is not None

    def put_state(self, state: TaskState) -> None:
        """Queue a state write; a later state of the same task replaces it if not yet written."""
        self._states.pop(state.task_uuid, None)
        self._states[state.task_uuid] = state
        self._idle.clear()
        self._wake.set()
        self._state_queued.set()

    async def store(self, state: TaskState, ack: Delivery | None = None, send: Send | None = None) -> None:
        """Queue a state and wait until it (or a later one) is stored; with `ack`, that delivery
        is acked once the state is stored (for a task with nothing left to do; see the module doc);
        with `send` (only where carries_sends), those follow-up tasks are sent right after it,
        in the same round trip."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._futures.append(fut)
        if ack is not None:
            self._paired.setdefault(state.task_uuid, []).append(ack)
        if send is not None:
            if not self.carries_sends:
                raise UsageError("this committer cannot send follow-up tasks")
            self._sends.append(send)
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
            if (self._joint is not None and self._acks and not self._states and not self._draining
                    and not self._unclaimed(self._acks)):
                self._state_queued.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.ack_linger):
                        await self._state_queued.wait()
            self._wake.clear()
            states, futures, acks, paired = self._states, self._futures, self._acks, self._paired
            self._states, self._futures, self._acks, self._paired = {}, [], [], {}
            sends, self._sends = self._sends, []
            pairs: list[tuple[TaskState, Delivery]] = []
            deferred: list[Delivery] = []  # acked with the next flush, alongside its states
            for uuid, ds in paired.items():
                st = states.get(uuid)
                if st is None:
                    acks.extend(ds)
                    continue
                d, *more = ds
                deferred.extend(more)  # one pair per state: the others are acked once it is stored
                if self._joint is not None and (self._early is None or self._early.hold(d)):
                    pairs.append((st, d))
                else:  # two stores (acking now would add a round trip to this flush), or a
                    deferred.append(d)  # claim still running (waiting for it would hold the state back)
            in_pairs = {st.task_uuid for st, _ in pairs}
            plain = [st for uuid, st in states.items() if uuid not in in_pairs]
            # The acks queued here belong to tasks whose final states an earlier flush stored, so
            # both writes go out at once: one round trip per flush, not two.
            if self._joint is not None and (states or acks):
                stored, acked, unsent = await self._joint.commit(plain, acks, pairs, sends)
                sends = [sends[i] for i in unsent]  # those that went out are not sent again
            elif states and acks:
                stored, acked = await asyncio.gather(self._store(states), self._ack(acks))
            else:
                stored, acked = await self._store(states), await self._ack(acks)
            if stored is None and deferred:
                self._acks.extend(deferred)
                self._wake.set()
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
                              acks if acked is not None else [], paired if stored is not None else {},
                              sends if stored is not None else [])
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                continue
            delay = 0.05
            if not self._states and not self._acks and not self._paired:
                self._idle.set()

    def _unclaimed(self, acks: list[Delivery]) -> bool:
        early = self._early
        return early is not None and any(early.unclaimed(d) for d in acks)

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
                 acks: list[Delivery], paired: dict[str, list[Delivery]], sends: list[Send]) -> None:
        """Put a failed batch back in front of anything queued since (newer states win; a pair
        stays a pair, so its ack still waits for its state; sends that may not have gone out go
        again, after their states: after a lost connection one may go twice, at least once)."""
        merged = dict(states)
        for uuid, st in self._states.items():
            merged.pop(uuid, None)
            merged[uuid] = st
        self._states = merged
        self._futures = futures + self._futures
        self._acks = acks + self._acks
        for uuid, ds in self._paired.items():
            paired[uuid] = paired.get(uuid, []) + ds
        self._paired = paired
        self._sends = sends + self._sends
        self._wake.set()

    async def drain(self) -> None:
        """Wait until everything queued so far is written and acked."""
        self._draining = True
        self._state_queued.set()
        try:
            await self._idle.wait()
        finally:
            self._draining = False
