"""The Backend contract: states, group progress and the chord latch, checked against every driver."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import BlockingReads, ConditionalPending
from machinery.tasks.state import FAILURE, PENDING, RECEIVED, STARTED, SUCCESS, TaskResult, TaskState

from .conftest import BACKEND_DRIVERS, Driver
from .declared import BACKEND_DECLARES

PROMPT = 2.0


def new_uuid() -> str:
    return f"task_{uuid.uuid4()}"


async def store_pending(backend: Backend, states: list[TaskState]) -> None:
    """Store PENDING as a send does: set_pending() with ConditionalPending, else set_states()."""
    conditional = backend.capability(ConditionalPending)
    await (backend.set_states(states) if conditional is None else conditional.set_pending(states))


def success(task_uuid: str, *results: TaskResult) -> TaskState:
    return TaskState(
        task_uuid, SUCCESS, task_name="add", results=list(results),
        created_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
    )


# --- states ----------------------------------------------------------------------------------


async def test_set_get_state_round_trips_typed_results(backend: Backend) -> None:
    states = [
        success(new_uuid(), TaskResult("int64", 42)),
        success(new_uuid(), TaskResult("string", "héllo <&>"), TaskResult("float64", 1.5)),
        success(new_uuid(), TaskResult("bool", True), TaskResult("[]string", ["a", "b"])),
        success(new_uuid(), TaskResult("[]int64", [1, -2, 3]), TaskResult("uint8", 255)),
        success(new_uuid()),
        TaskState(new_uuid(), FAILURE, task_name="div", error="ZeroDivisionError: division by zero"),
        TaskState(new_uuid(), PENDING, task_name="later"),
    ]
    await backend.set_states(states)
    got = await backend.get_states([s.task_uuid for s in states])
    assert got == states
    for want, have in zip(states, got, strict=True):
        assert have is not None
        assert have.values() == want.values()
    assert got[5] is not None and got[5].error == "ZeroDivisionError: division by zero"


async def test_set_state_and_get_state_single(backend: Backend) -> None:
    state = success(new_uuid(), TaskResult("int64", 2))
    await backend.set_state(state)
    assert await backend.get_state(state.task_uuid) == state
    assert await backend.get_state(new_uuid()) is None


async def test_get_states_keeps_order_with_none_for_unknown(backend: Backend) -> None:
    a, b = success(new_uuid(), TaskResult("int64", 1)), success(new_uuid(), TaskResult("int64", 2))
    await backend.set_states([a, b])
    unknown = new_uuid()
    got = await backend.get_states([b.task_uuid, unknown, a.task_uuid, b.task_uuid])
    assert got == [b, None, a, b]
    assert await backend.get_states([]) == []


async def test_later_state_replaces_earlier(backend: Backend) -> None:
    task = new_uuid()
    for state in (PENDING, RECEIVED, STARTED):
        await backend.set_state(TaskState(task, state, task_name="t"))
        got = await backend.get_state(task)
        assert got is not None and got.state == state
    final = success(task, TaskResult("int64", 5))
    await backend.set_state(final)
    assert await backend.get_state(task) == final


async def test_later_states_keep_created_at(backend_driver: Driver[Backend], backend: Backend) -> None:
    """Only PENDING carries CreatedAt (Go's workers write none): every later state keeps it, unless
    the later state brings its own. The whole lifecycle, and a batch mixing tasks with and without
    a stored PENDING, as the worker's committer writes them."""
    task, lone = new_uuid(), new_uuid()
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    # drivers that store states as given (see "no_state_merge" in conftest) read back no CreatedAt
    kept = None if "no_state_merge" in backend_driver.caps else created
    await store_pending(backend, [TaskState(task, PENDING, task_name="add", created_at=created)])
    pending = await backend.get_state(task)
    assert pending is not None and pending.created_at == created
    await backend.set_states([TaskState(lone, RECEIVED, task_name="add"), TaskState(task, RECEIVED, task_name="add")])
    got = await backend.get_states([task, lone])
    assert got[0] is not None and got[0].state == RECEIVED and got[0].created_at == kept
    assert got[1] is not None and got[1].state == RECEIVED and got[1].created_at is None
    for later in (TaskState(task, STARTED, task_name="add"),
                  TaskState(task, SUCCESS, task_name="add", results=[TaskResult("int64", 3)])):
        await backend.set_state(later)
        state = await backend.get_state(task)
        assert state is not None and state.state == later.state and state.created_at == kept
    assert state.values() == [3]
    own = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    await backend.set_state(TaskState(task, FAILURE, task_name="add", error="boom", created_at=own))
    state = await backend.get_state(task)
    assert state is not None and state.state == FAILURE and state.created_at == own


async def test_states_are_visible_to_another_client(backend_driver: Driver[Backend], backend: Backend) -> None:
    other = await backend_driver.open()
    state = success(new_uuid(), TaskResult("string", "x"))
    await backend.set_state(state)
    assert await other.get_state(state.task_uuid) == state


async def test_purge_state(backend: Backend) -> None:
    keep, drop = success(new_uuid()), success(new_uuid())
    await backend.set_states([keep, drop])
    await backend.purge_state(drop.task_uuid)
    assert await backend.get_states([keep.task_uuid, drop.task_uuid]) == [keep, None]
    await backend.purge_state(new_uuid())  # unknown: no error


# --- groups ----------------------------------------------------------------------------------


async def test_init_group_and_get_group_meta(backend: Backend) -> None:
    group = new_uuid()
    members = [new_uuid() for _ in range(5)]
    before = datetime.now(UTC)
    await backend.init_group(group, members)
    meta = await backend.get_group_meta(group)
    assert meta is not None
    assert meta.group_uuid == group
    assert meta.task_uuids == members
    assert meta.chord_triggered is False
    assert meta.created_at is not None
    assert abs((meta.created_at - before).total_seconds()) < 60
    assert await backend.get_group_meta(new_uuid()) is None


async def test_group_member_done_counts_once_per_task(backend: Backend) -> None:
    group = new_uuid()
    members = [new_uuid() for _ in range(3)]
    await backend.init_group(group, members)
    assert await backend.group_member_done(group, members[0], 3, False) == GroupProgress(1, 0, True)
    assert await backend.group_member_done(group, members[0], 3, False) == GroupProgress(1, 0, False)
    assert await backend.group_member_done(group, members[1], 3, True) == GroupProgress(2, 1, True)
    assert await backend.group_member_done(group, members[1], 3, True) == GroupProgress(2, 1, False)
    assert await backend.group_member_done(group, members[2], 3, False) == GroupProgress(3, 1, True)
    assert await backend.group_member_done(group, members[2], 3, False) == GroupProgress(3, 1, False)


async def test_groups_are_counted_separately(backend: Backend) -> None:
    g1, g2, task = new_uuid(), new_uuid(), new_uuid()
    await backend.init_group(g1, [task])
    await backend.init_group(g2, [task])
    assert await backend.group_member_done(g1, task, 1, False) == GroupProgress(1, 0, True)
    assert await backend.group_member_done(g2, task, 1, True) == GroupProgress(1, 1, True)


async def test_concurrent_group_member_done_has_one_finisher(backend_driver: Driver[Backend]) -> None:
    """Many workers finishing at once (with redeliveries): exactly one sees done == total, counted."""
    clients = [await backend_driver.open() for _ in range(4)]
    group, total = new_uuid(), 40
    members = [new_uuid() for _ in range(total)]
    await clients[0].init_group(group, members)
    results: list[GroupProgress] = []
    lock = threading.Lock()

    def worker(client: Backend, mine: list[str]) -> None:
        async def run() -> list[GroupProgress]:
            try:
                # Every member is reported twice, as after a redelivery.
                calls = [client.group_member_done(group, t, total, t.endswith(("0", "5"))) for t in mine * 2]
                return list(await asyncio.gather(*calls))
            finally:
                await client.close()

        out = asyncio.run(run())
        with lock:
            results.extend(out)

    threads = [threading.Thread(target=worker, args=(c, members[i::4])) for i, c in enumerate(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 2 * total
    assert sum(r.counted for r in results) == total
    finishers = [r for r in results if r.counted and r.done == total]
    assert len(finishers) == 1
    expected_failed = sum(t.endswith(("0", "5")) for t in members)
    assert finishers[0].failed == expected_failed
    assert sorted(r.done for r in results if r.counted) == list(range(1, total + 1))


async def test_trigger_chord_is_true_exactly_once_under_concurrency(backend_driver: Driver[Backend]) -> None:
    clients = [await backend_driver.open() for _ in range(4)]
    group = new_uuid()
    await clients[0].init_group(group, [new_uuid(), new_uuid()])
    wins: list[bool] = []
    lock = threading.Lock()

    def worker(client: Backend) -> None:
        async def run() -> list[bool]:
            try:
                return list(await asyncio.gather(*(client.trigger_chord(group) for _ in range(10))))
            finally:
                await client.close()

        out = asyncio.run(run())
        with lock:
            wins.extend(out)

    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 40
    assert wins.count(True) == 1
    meta = await clients[0].get_group_meta(group)
    assert meta is not None and meta.chord_triggered is True
    assert await clients[0].trigger_chord(group) is False


async def test_trigger_chord_same_loop_concurrency(backend: Backend) -> None:
    group = new_uuid()
    await backend.init_group(group, [new_uuid()])
    wins = await asyncio.gather(*(backend.trigger_chord(group) for _ in range(25)))
    assert wins.count(True) == 1


async def test_purge_group_meta(backend: Backend) -> None:
    group, task = new_uuid(), new_uuid()
    await backend.init_group(group, [task])
    await backend.group_member_done(group, task, 1, False)
    await backend.purge_group_meta(group)
    assert await backend.get_group_meta(group) is None
    await backend.purge_group_meta(new_uuid())  # unknown: no error


async def test_init_group_again_keeps_progress(backend: Backend) -> None:
    """A redelivered parent task may send the same group again; that must not re-arm its chord."""
    group, task, other = new_uuid(), new_uuid(), new_uuid()
    await backend.init_group(group, [task, other])
    await backend.group_member_done(group, task, 2, False)
    await backend.init_group(group, [task, other])
    assert await backend.group_member_done(group, task, 2, False) == GroupProgress(1, 0, False)
    assert await backend.group_member_done(group, other, 2, False) == GroupProgress(2, 0, True)
    assert await backend.trigger_chord(group) is True
    await backend.init_group(group, [task, other])
    meta = await backend.get_group_meta(group)
    assert meta is not None and meta.chord_triggered is True and meta.task_uuids == [task, other]
    assert await backend.trigger_chord(group) is False


# --- expiry ----------------------------------------------------------------------------------


async def test_results_expire(backend_driver: Driver[Backend]) -> None:
    backend_driver.configure(results_expire_in=1)
    backend = await backend_driver.open()
    state = success(new_uuid(), TaskResult("int64", 1))
    group = new_uuid()
    await backend.set_state(state)
    await backend.init_group(group, [state.task_uuid])
    assert await backend.get_state(state.task_uuid) == state
    assert await backend.get_group_meta(group) is not None
    await asyncio.sleep(2.1)
    assert await backend.get_state(state.task_uuid) is None
    assert await backend.get_states([state.task_uuid]) == [None]
    assert await backend.get_group_meta(group) is None
    assert await backend.trigger_chord(group) is False


# --- reading and waiting, through each face ------------------------------------------------


class Face:
    """How a caller reads states: the asyncio face (the backend's coroutines), or the blocking one
    (BlockingReads, called in a thread of its own, as the sync facade calls it)."""

    def __init__(self, backend: Backend, name: str) -> None:
        self.name = name
        self._backend = backend
        self._blocking = backend.capability(BlockingReads)
        assert name == "asyncio" or self._blocking is not None

    async def get_state(self, task_uuid: str) -> TaskState | None:
        if self._blocking is None or self.name == "asyncio":
            return await self._backend.get_state(task_uuid)
        return await asyncio.to_thread(self._blocking.get_state, task_uuid)

    async def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        if self._blocking is None or self.name == "asyncio":
            return await self._backend.wait_completed(task_uuid, timeout)
        return await asyncio.to_thread(self._blocking.wait_completed, task_uuid, timeout)


FACES = [
    pytest.param((name, face), marks=spec.marks, id=f"{name}-{face}")
    for name, spec in BACKEND_DRIVERS.items()
    for face in ("asyncio", *(("blocking",) if BlockingReads in BACKEND_DECLARES[name] else ()))
]


@pytest.fixture(params=FACES)
async def faced(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[Driver[Backend], Backend, Face]]:
    """A backend driver, a client of it, and a face to read it through."""
    name, face = request.param
    driver = Driver(name, BACKEND_DRIVERS[name], tmp_path)
    backend = await driver.open()
    yield driver, backend, Face(backend, face)
    await driver.aclose()


async def test_get_state_reads_what_was_stored(faced: tuple[Driver[Backend], Backend, Face]) -> None:
    driver, _, face = faced
    other = await driver.open()
    state = success(new_uuid(), TaskResult("int64", 2), TaskResult("string", "héllo <&>"))
    await other.set_state(state)
    assert await face.get_state(state.task_uuid) == state
    assert await face.get_state(new_uuid()) is None


async def test_wait_completed_returns_promptly_on_completion(faced: tuple[Driver[Backend], Backend, Face]) -> None:
    _, backend, face = faced
    task = new_uuid()
    final = success(task, TaskResult("int64", 3))

    async def finish() -> None:
        await asyncio.sleep(0.1)
        await backend.set_state(TaskState(task, STARTED, task_name="add"))
        await asyncio.sleep(0.1)
        await backend.set_state(final)

    writer = asyncio.create_task(finish())
    start = time.monotonic()
    got = await face.wait_completed(task, 10.0)
    assert got == final
    assert time.monotonic() - start < PROMPT
    await writer


async def test_wait_completed_sees_another_clients_write(faced: tuple[Driver[Backend], Backend, Face]) -> None:
    driver, _, face = faced
    other = await driver.open()
    task = new_uuid()
    final = TaskState(task, FAILURE, task_name="boom", error="boom")

    async def finish() -> None:
        await asyncio.sleep(0.2)
        await other.set_state(final)

    writer = asyncio.create_task(finish())
    start = time.monotonic()
    assert await face.wait_completed(task, 10.0) == final
    assert time.monotonic() - start < PROMPT
    await writer


async def test_wait_completed_returns_existing_final_state(faced: tuple[Driver[Backend], Backend, Face]) -> None:
    _, backend, face = faced
    final = success(new_uuid(), TaskResult("int64", 1))
    await backend.set_state(final)
    start = time.monotonic()
    assert await face.wait_completed(final.task_uuid, 5.0) == final
    assert time.monotonic() - start < PROMPT


async def test_wait_completed_without_timeout(faced: tuple[Driver[Backend], Backend, Face]) -> None:
    _, backend, face = faced
    task = new_uuid()
    final = success(task, TaskResult("int64", 9))

    async def finish() -> None:
        await asyncio.sleep(0.2)
        await backend.set_state(final)

    writer = asyncio.create_task(finish())
    assert await asyncio.wait_for(face.wait_completed(task, None), 10.0) == final
    await writer


async def test_wait_completed_times_out_with_none(faced: tuple[Driver[Backend], Backend, Face]) -> None:
    _, backend, face = faced
    task = new_uuid()
    await backend.set_state(TaskState(task, STARTED, task_name="slow"))
    start = time.monotonic()
    assert await face.wait_completed(task, 0.4) is None
    elapsed = time.monotonic() - start
    assert 0.35 <= elapsed < 0.4 + 1.0
    start = time.monotonic()
    assert await face.wait_completed(new_uuid(), 0.0) is None
    assert time.monotonic() - start < 1.0
