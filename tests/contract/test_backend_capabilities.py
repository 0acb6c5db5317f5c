"""Backend capabilities: each interface checked on every backend that declares it (declared.py).

BlockingReads is checked through the backend contract itself: its reads and waits run through
both faces (see Face in test_backend_contract.py).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import TypeVar

import pytest

from machinery.drivers.backend import Backend
from machinery.drivers.capabilities import BlockingReads, ConditionalPending, ResultWakeups
from machinery.tasks.state import PENDING, RECEIVED, STARTED, TaskResult, TaskState

from .conftest import Driver
from .declared import backends_with
from .test_backend_contract import PROMPT, new_uuid, success

C = TypeVar("C")


def cap(backend: Backend, kind: type[C]) -> C:
    impl = backend.capability(kind)
    assert impl is not None, f"{type(backend).__name__} declares {kind.__name__} in declared.py"
    return impl


# --- ConditionalPending ----------------------------------------------------------------------


@pytest.mark.parametrize("backend_of", backends_with(ConditionalPending), indirect=True)
async def test_set_pending_stores_pending_for_a_new_task(backend_of: Driver[Backend]) -> None:
    backend = await backend_of.open()
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    fresh = [TaskState(new_uuid(), PENDING, task_name=f"t{i}", created_at=created) for i in range(3)]
    await cap(backend, ConditionalPending).set_pending(fresh)
    assert await backend.get_states([s.task_uuid for s in fresh]) == fresh


@pytest.mark.parametrize("backend_of", backends_with(ConditionalPending), indirect=True)
async def test_set_pending_never_replaces_a_later_state(backend_of: Driver[Backend]) -> None:
    backend = await backend_of.open()
    done, fresh = success(new_uuid(), TaskResult("int64", 1)), new_uuid()
    await backend.set_state(done)
    await cap(backend, ConditionalPending).set_pending(
        [TaskState(done.task_uuid, PENDING, task_name="t"), TaskState(fresh, PENDING, task_name="t")])
    after, pending = await backend.get_states([done.task_uuid, fresh])
    assert after == done
    assert pending is not None and pending.state == PENDING


@pytest.mark.parametrize("backend_of", backends_with(ConditionalPending), indirect=True)
async def test_pending_stored_after_the_workers_first_state_adds_its_created_at(backend_of: Driver[Backend]) -> None:
    """A send stores PENDING while it publishes, so the worker's RECEIVED may land first: PENDING
    must not replace it, but still hands it the CreatedAt only PENDING has, where the store can."""
    backend = await backend_of.open()
    task = new_uuid()
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    await backend.set_state(TaskState(task, RECEIVED, task_name="add"))
    await cap(backend, ConditionalPending).set_pending([TaskState(task, PENDING, task_name="add", created_at=created)])
    got = await backend.get_state(task)
    assert got is not None and got.state == RECEIVED
    # "no_pending_fill": the store keeps the worker's state exactly as it is (Redis: SET NX)
    assert got.created_at == (None if "no_pending_fill" in backend_of.caps else created)


# --- ResultWakeups ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend_of", backends_with(ResultWakeups), indirect=True)
async def test_a_completed_state_stored_here_wakes_its_waiters_at_once(backend_of: Driver[Backend]) -> None:
    backend = await backend_of.open()
    wakeups = cap(backend, ResultWakeups)
    assert wakeups.poll_cap is None or wakeups.poll_cap > 0
    task, other = new_uuid(), new_uuid()
    woken, not_ours = wakeups.waiters.register(task), wakeups.waiters.register(other)
    try:
        await backend.set_state(TaskState(task, STARTED, task_name="add"))
        await asyncio.sleep(0)
        assert not woken.done(), "a state that is not final wakes nobody"
        await backend.set_states([success(task, TaskResult("int64", 1))])
        await asyncio.wait_for(asyncio.shield(woken), PROMPT)
        assert not not_ours.done()
    finally:
        wakeups.waiters.discard(task, woken)
        wakeups.waiters.discard(other, not_ours)


@pytest.mark.parametrize("backend_of", backends_with(ResultWakeups), indirect=True)
async def test_remote_wakeups_wake_waiters_on_another_clients_write(backend_of: Driver[Backend]) -> None:
    """Inside remote_wakeups(), when it yields True, another client's (process's) write wakes
    this client's waiters too; when False, the generic wait re-reads instead (the contract)."""
    backend = await backend_of.open()
    other = await backend_of.open()
    wakeups = cap(backend, ResultWakeups)
    task = new_uuid()
    with wakeups.remote_wakeups() as pushed:
        assert isinstance(pushed, bool)
        woken = wakeups.waiters.register(task)
        try:
            await asyncio.sleep(0.05)  # the doorbell's listener is up before the write
            await other.set_state(success(task, TaskResult("int64", 2)))
            if pushed:
                await asyncio.wait_for(asyncio.shield(woken), PROMPT)
        finally:
            wakeups.waiters.discard(task, woken)
    assert (await backend.get_state(task)) == success(task, TaskResult("int64", 2))


# --- BlockingReads ---------------------------------------------------------------------------


@pytest.mark.parametrize("backend_of", backends_with(BlockingReads), indirect=True)
async def test_blocking_reads_need_no_event_loop(backend_of: Driver[Backend]) -> None:
    """The sync facade calls them from plain threads: no loop, no portal."""
    backend = await backend_of.open()
    reads = cap(backend, BlockingReads)
    final = success(new_uuid(), TaskResult("int64", 4))
    await backend.set_state(final)

    def in_a_plain_thread() -> tuple[TaskState | None, TaskState | None]:
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return reads.get_state(final.task_uuid), reads.wait_completed(final.task_uuid, 5.0)
        raise AssertionError("to_thread runs without an event loop")

    assert await asyncio.to_thread(in_a_plain_thread) == (final, final)
