"""Redis result backend on the real server: Go's keys and JSON, the merge, chords, waking waiters.

Uses db 15 of this run's own Redis (tests/redis_servers.py), flushed before each test.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from machinery.config import Config
from machinery.drivers.redis.backend import RedisBackend
from machinery.tasks.state import (
    RECEIVED,
    STARTED,
    SUCCESS,
    TaskResult,
    TaskState,
    decode_group_meta,
    decode_state,
)
from redis_servers import PrivateRedis, redis_url

pytestmark = pytest.mark.redis

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url())
    await client.flushdb()  # this run's own server: no other run has keys there
    yield client
    await client.aclose()


@pytest.fixture
async def backend(raw: aioredis.Redis) -> AsyncIterator[RedisBackend]:
    b = RedisBackend(Config(broker=redis_url(), result_backend=redis_url(), results_expire_in=120))
    yield b
    await b.close()


def golden(name: str) -> bytes:
    return (GOLDEN / name).read_bytes()


def new_uuid() -> str:
    return f"task_{uuid.uuid4()}"


# --- Go's shape --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [
    "state_pending.json", "state_success.json", "state_success_multi.json", "state_success_error_only.json",
    "state_failure.json", "state_received_no_pending.json",
])
async def test_stored_state_is_gos_json_under_the_task_uuid_with_ttl(
    backend: RedisBackend, raw: aioredis.Redis, name: str
) -> None:
    go = golden(name)
    state = decode_state(go)
    await backend.set_state(state)
    assert await raw.get(state.task_uuid) == go
    assert 110 <= await raw.ttl(state.task_uuid) <= 120
    assert await backend.get_state(state.task_uuid) == state


async def test_later_states_keep_gos_stored_name_and_created_at(backend: RedisBackend, raw: aioredis.Redis) -> None:
    pending = golden("state_pending.json")  # as a Go producer's SendTask stores it
    task = decode_state(pending).task_uuid
    await raw.set(task, pending)
    await backend.set_state(TaskState(task, RECEIVED))
    want = pending.replace(b'"PENDING"', b'"RECEIVED"')
    assert await raw.get(task) == want
    await backend.set_states([TaskState(task, STARTED), TaskState(task, SUCCESS, results=[TaskResult("int64", 2)])])
    stored = json.loads(await raw.get(task))
    assert (stored["TaskName"], stored["CreatedAt"], stored["State"]) == ("add", "2025-01-02T03:04:05.123456789Z",
                                                                         "SUCCESS")


async def test_merge_copies_escaped_names_byte_for_byte(backend: RedisBackend, raw: aioredis.Redis) -> None:
    task = new_uuid()
    odd = 'a<b>&"c"\\d\u2028'
    first = TaskState(task, "PENDING", task_name=odd, created_at=decode_state(golden("state_pending.json")).created_at)
    await backend.set_state(first)
    name_token = (await raw.get(task)).split(b'"TaskName":')[1].split(b',"State"')[0]
    assert name_token == b'"a\\u003cb\\u003e\\u0026\\"c\\"\\\\d\\u2028"'  # Go's HTML-safe escaping
    await backend.set_state(TaskState(task, STARTED))
    got = await backend.get_state(task)
    assert got is not None and got.task_name == odd and got.created_at == first.created_at
    assert name_token in await raw.get(task)


async def test_without_a_stored_state_the_zero_time_stays(backend: RedisBackend, raw: aioredis.Redis) -> None:
    task = new_uuid()
    await backend.set_state(TaskState(task, STARTED, task_name="x"))
    assert json.loads(await raw.get(task))["CreatedAt"] == "0001-01-01T00:00:00Z"


async def test_set_states_is_one_round_trip(backend: RedisBackend) -> None:
    client = await backend.client()
    calls: list[str] = []
    pipeline = client.pipeline
    execute = client.execute_command

    async def count(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return await execute(*args, **kwargs)

    def no_pipeline(*args: Any, **kwargs: Any) -> Any:
        calls.append("PIPELINE")
        return pipeline(*args, **kwargs)

    client.execute_command = count
    client.pipeline = no_pipeline
    states = [TaskState(new_uuid(), s) for s in (RECEIVED, STARTED) for _ in range(100)]
    await backend.set_states(states)
    assert calls in (["EVALSHA"], ["PIPELINE"])
    assert len(calls) == 1


# --- groups and chords -----------------------------------------------------------------------


async def test_group_meta_is_gos_json_and_the_chord_flag_flips_in_place(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    await backend.init_group("group_1", ["task_a", "task_b"])
    stored = await raw.get("group_1")
    assert list(json.loads(stored)) == ["GroupUUID", "TaskUUIDs", "ChordTriggered", "Lock", "CreatedAt", "TTL"]
    assert 110 <= await raw.ttl("group_1") <= 120
    meta = await backend.get_group_meta("group_1")
    assert meta is not None and meta.task_uuids == ["task_a", "task_b"] and not meta.chord_triggered
    assert await backend.trigger_chord("group_1") is True
    assert await raw.get("group_1") == stored.replace(b'"ChordTriggered":false', b'"ChordTriggered":true')
    assert await backend.trigger_chord("group_1") is False


async def test_trigger_chord_on_a_go_group(backend: RedisBackend, raw: aioredis.Redis) -> None:
    go = golden("group_meta.json")
    await raw.set("group_77a", go)
    assert await backend.trigger_chord("group_77a") is True
    assert decode_group_meta(await raw.get("group_77a")).chord_triggered
    await raw.set("group_fired", go.replace(b"false", b"true", 1))
    assert await backend.trigger_chord("group_fired") is False
    assert await backend.trigger_chord("group_unknown") is False


async def test_trigger_chord_waits_for_gos_mutex_and_sees_gos_flip(
    backend: RedisBackend, raw: aioredis.Redis
) -> None:
    """A Go worker holds TriggerChordMutex, reads the meta, stores ChordTriggered=true, unlocks."""
    await backend.init_group("group_go", ["task_a"])
    await raw.set("TriggerChordMutex", "go-token", px=8000)
    ours = asyncio.create_task(backend.trigger_chord("group_go"))
    await asyncio.sleep(0.4)
    assert not ours.done(), "fired while Go held the mutex"
    meta = await raw.get("group_go")
    await raw.set("group_go", meta.replace(b'"ChordTriggered":false', b'"ChordTriggered":true'), ex=120)
    await raw.delete("TriggerChordMutex")
    assert await ours is False


async def test_trigger_chord_fires_after_gos_mutex_is_released(backend: RedisBackend, raw: aioredis.Redis) -> None:
    await backend.init_group("group_wait", ["task_a"])
    started = time.monotonic()  # before the SET: the mutex lives at least 0.6 s from here
    await raw.set("TriggerChordMutex", "go-token", px=600)  # Go took it and let it expire
    assert await backend.trigger_chord("group_wait") is True
    assert time.monotonic() - started >= 0.5


async def test_group_progress_is_one_hash_with_expiry(backend: RedisBackend, raw: aioredis.Redis) -> None:
    await backend.init_group("group_p", ["a", "b", "c"])
    assert (await backend.group_member_done("group_p", "a", 3, False)).counted
    assert not (await backend.group_member_done("group_p", "a", 3, False)).counted
    progress = await backend.group_member_done("group_p", "b", 3, True)
    assert (progress.done, progress.failed, progress.counted) == (2, 1, True)
    assert await raw.hlen("{group_p}:machinery:progress") == 4  # two members + two counters
    assert 0 < await raw.ttl("{group_p}:machinery:progress") <= 120
    await backend.purge_group_meta("group_p")
    assert not await raw.exists("group_p", "{group_p}:machinery:progress")


# --- waiting ---------------------------------------------------------------------------------


class Reads(list[str]):
    """The task UUIDs a backend read; `done` is set after each read."""

    def __init__(self) -> None:
        super().__init__()
        self.done = asyncio.Event()

    async def first(self) -> None:
        await asyncio.wait_for(self.done.wait(), 10.0)


def count_reads(monkeypatch: pytest.MonkeyPatch, backend: RedisBackend, *, hide_completed: bool) -> Reads:
    """Record the waiting backend's own GETs of states; with `hide_completed` they never see a
    completed one, so a wait that returns it was told by the PUBLISH."""
    reads = Reads()
    real = backend.waits._read  # what a wait reads states with (drivers/redis/notify.py)

    async def read(task_uuid: str) -> TaskState | None:
        state = await real(task_uuid)
        reads.append(task_uuid)
        reads.done.set()
        return None if hide_completed and state is not None and state.is_completed() else state

    monkeypatch.setattr(backend.waits, "_read", read)
    return reads


async def test_wait_completed_wakes_on_the_store(backend: RedisBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    task = new_uuid()
    await backend.set_state(TaskState(task, STARTED, task_name="slow"))
    reads = count_reads(monkeypatch, backend, hide_completed=True)

    async def finish() -> None:
        await reads.first()  # the wait is subscribed and has read the state: a PUBLISH now reaches it
        writer = RedisBackend(backend.cnf)  # another client, as another worker
        await writer.set_state(TaskState(task, SUCCESS, results=[TaskResult("int64", 7)]))
        await writer.close()

    waker = asyncio.create_task(finish())
    state = await backend.wait_completed(task, 10.0)
    await waker
    assert state is not None and state.values() == [7]  # its reads cannot see it: the PUBLISH brought it


async def test_many_waiters_share_one_subscription_connection(backend: RedisBackend) -> None:
    tasks = [new_uuid() for _ in range(50)]
    waits = [asyncio.create_task(backend.wait_completed(t, 10.0)) for t in tasks]
    await asyncio.sleep(0.2)
    await backend.set_states([TaskState(t, SUCCESS, results=[TaskResult("int64", i)]) for i, t in enumerate(tasks)])
    done = await asyncio.gather(*waits)
    assert [s.values() for s in done if s is not None] == [[i] for i in range(50)]


async def test_wait_completed_sees_a_state_go_stored(
    backend: RedisBackend, raw: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = "task_0c1f"
    reads = count_reads(monkeypatch, backend, hide_completed=False)
    waiter = asyncio.create_task(backend.wait_completed(task, 10.0))
    await reads.first()  # subscribed, and read once
    await raw.set(task, golden("state_success.json").replace(b"task_0c1f", task.encode()))  # no PUBLISH
    state = await waiter
    assert state is not None and state.is_success()
    assert len(reads) >= 2  # stored after the first read and never published: a re-read found it


async def test_wait_completed_honours_its_timeout_when_redis_is_down(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "r").start()
    backend = RedisBackend(Config(broker=server.url, result_backend=server.url))
    try:
        await backend.set_state(TaskState("task_x", STARTED))
        server.kill()
        started = time.monotonic()
        try:
            state = await backend.wait_completed("task_x", 0.5)
        except Exception as exc:  # an error is acceptable, a hang is not
            state = None
            assert "redis" in str(exc).lower()
        assert state is None
        assert time.monotonic() - started < 5.0  # bounded by its timeout, not by reconnect attempts
    finally:
        server.kill()
        await backend.close()
