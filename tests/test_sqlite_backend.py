"""SQLite-specific behaviour of the embedded result backend and lock (shared semantics: tests/contract)."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from machinery.config import Config, SQLiteConfig
from machinery.drivers.sqlite.backend import SQLiteBackend
from machinery.drivers.sqlite.lock import SQLiteLock
from machinery.errors import BackendError
from machinery.tasks.state import FAILURE, PENDING, STARTED, SUCCESS, TaskResult, TaskState, encode_state
from timing import Calls, RecordingAsyncio


def backend_at(db: Path, results_expire_in: int = 3600, **sqlite: Any) -> SQLiteBackend:
    url = f"sqlite:///{db}"
    cnf = Config(broker=url, result_backend=url, results_expire_in=results_expire_in,
                 sqlite=SQLiteConfig(**sqlite))
    return SQLiteBackend(cnf, url)


def done(uuid: str, value: int = 1) -> TaskState:
    return TaskState(uuid, SUCCESS, task_name="t", results=[TaskResult("int64", value)])


def count(db: Path, table: str) -> int:
    with sqlite3.connect(db) as conn:
        n: int = conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    return n


async def test_states_are_stored_as_go_task_state_json(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    backend = backend_at(db)
    state = done("u1", 42)
    await backend.set_state(state)
    await backend.close()
    with sqlite3.connect(db) as conn:
        (blob,) = conn.execute("SELECT state FROM machinery_task_states WHERE uuid = 'u1'").fetchone()
    assert blob == encode_state(state)
    assert b'"TaskUUID":"u1"' in blob


async def test_later_states_keep_created_at_in_the_stored_json_in_one_statement(tmp_path: Path) -> None:
    """The write's own UPSERT splices PENDING's CreatedAt into a later state's JSON (no read, no
    second statement), so tools reading the file see it too; a result holding a "CreatedAt" key,
    in the new state or the stored one, does not confuse it."""
    db = tmp_path / "c.db"
    backend = backend_at(db)
    created = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC)
    await backend.set_state(TaskState("c1", PENDING, task_name="t", created_at=created))
    statements: list[str] = []
    await backend._db.run(lambda conn: conn.set_trace_callback(statements.append))
    nested = [TaskResult.of({"CreatedAt": "2020-01-01T00:00:00Z"})]
    final = TaskState("c1", SUCCESS, task_name="t", results=nested)
    await backend.set_state(final)
    assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "COMMIT"]
    await backend.set_state(TaskState("c1", FAILURE, task_name="t", error="late"))
    await backend.close()
    with sqlite3.connect(db) as conn:
        (blob,) = conn.execute("SELECT state FROM machinery_task_states WHERE uuid = 'c1'").fetchone()
    assert blob == encode_state(TaskState("c1", FAILURE, task_name="t", error="late", created_at=created))


async def test_later_state_ignores_an_expired_or_unreadable_row(tmp_path: Path) -> None:
    """An expired PENDING is no longer stored, and a row that is not JSON is replaced as before."""
    db = tmp_path / "x.db"
    backend = backend_at(db)
    created = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
    await backend.set_states([TaskState(u, PENDING, task_name="t", created_at=created) for u in ("old", "junk")])
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE machinery_task_states SET expires_at_ns = 1 WHERE uuid = 'old'")
        conn.execute("UPDATE machinery_task_states SET state = X'00ff7b' WHERE uuid = 'junk'")
    later = [TaskState(u, STARTED, task_name="t") for u in ("old", "junk")]
    await backend.set_states(later)
    assert await backend.get_states(["old", "junk"]) == later
    await backend.close()


async def test_expired_rows_are_purged(tmp_path: Path) -> None:
    db = tmp_path / "p.db"
    backend = backend_at(db, results_expire_in=1)
    await backend.set_states([done(f"old{i}") for i in range(20)])
    await backend.init_group("old-group", ["a", "b"])
    await backend.group_member_done("old-group", "a", 2, False)
    await asyncio.sleep(1.2)
    await backend.set_state(done("new"))  # writes purge about once per min(60 s, expiry)
    assert count(db, "machinery_task_states") == 1
    assert count(db, "machinery_groups") == 0
    assert count(db, "machinery_group_members") == 0
    assert await backend.get_state("new") == done("new")
    await backend.close()


async def test_group_member_done_cost_does_not_grow_with_the_group(tmp_path: Path) -> None:
    backend = backend_at(tmp_path / "g.db")
    members = [f"t{i}" for i in range(3000)]
    await backend.init_group("big", members)
    await backend.init_group("small", members[:2])
    statements: list[str] = []
    await backend._db.run(lambda conn: conn.set_trace_callback(statements.append))
    await backend.group_member_done("small", "t0", 2, False)
    small = list(statements)
    for m in members[:-1]:
        await backend.group_member_done("big", m, 3000, False)
    statements.clear()
    progress = await backend.group_member_done("big", members[-1], 3000, True)
    assert (progress.done, progress.failed, progress.counted) == (3000, 1, True)
    assert len(statements) == len(small)
    assert not any("COUNT(" in s.upper() for s in statements)
    await backend.close()


async def test_group_member_done_is_all_or_nothing(tmp_path: Path) -> None:
    """A failure after the member row is written must not leave it counted-but-not-counted."""
    db = tmp_path / "atomic.db"
    backend = backend_at(db)
    await backend.init_group("g", ["a", "b"])
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER fail_count BEFORE UPDATE OF done ON machinery_groups "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    with pytest.raises(BackendError, match="injected failure"):
        await backend.group_member_done("g", "a", 2, False)
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER fail_count")
    progress = await backend.group_member_done("g", "a", 2, False)
    assert (progress.done, progress.counted) == (1, True), "the failed call left its member row behind"
    await backend.close()


async def test_group_member_done_on_unknown_group_starts_a_record(tmp_path: Path) -> None:
    backend = backend_at(tmp_path / "u.db")
    first = await backend.group_member_done("nogroup", "t1", 2, False)
    assert (first.done, first.counted) == (1, True)
    second = await backend.group_member_done("nogroup", "t2", 2, False)
    assert (second.done, second.counted) == (2, True)
    assert await backend.trigger_chord("nogroup") is True
    await backend.close()


async def test_same_object_write_wakes_wait_completed_before_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = backend_at(tmp_path / "w.db", poll_interval_ms=600_000)  # no re-read during the wait
    reads = Calls(monkeypatch, backend, "get_state")
    waiter = asyncio.create_task(backend.wait_completed("slow", 10.0))
    await reads.reach(1)  # nothing stored yet: the wait now sleeps, and no re-read is due for ten minutes
    await backend.set_state(done("slow"))
    assert await waiter == done("slow")  # a wait nothing woke would return None after its 10 s
    assert reads.count == 2  # one more read, started by the write's wake-up
    await backend.close()


async def test_another_clients_write_is_seen_within_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from machinery.drivers import backend as base_backend

    db = tmp_path / "o.db"
    reader, writer = backend_at(db, poll_interval_ms=50), backend_at(db)
    waits = RecordingAsyncio()
    monkeypatch.setattr(base_backend, "asyncio", waits)
    reads = Calls(monkeypatch, reader, "get_state")
    waiter = asyncio.create_task(reader.wait_completed("x", 10.0))
    await reads.reach(15)  # uncapped, a back-off would be sleeping seconds by now
    await writer.set_state(done("x"))
    assert await waiter == done("x")
    assert waits.timeouts and all(t is not None and t <= 0.05 for t in waits.timeouts)  # re-reads stay 50 ms apart
    await reader.close()
    await writer.close()


async def test_lock_takes_over_an_expired_holder_in_one_statement(tmp_path: Path) -> None:
    db = tmp_path / "l.db"
    url = f"sqlite:///{db}"
    a, b = SQLiteLock(Config(lock=url), url), SQLiteLock(Config(lock=url), url)
    until = time.time_ns() + 1_000_000_000
    assert await a.acquire("tick", until)
    assert not await b.acquire("tick", time.time_ns() + 10**10)
    await asyncio.sleep(max(until - time.time_ns(), 0) / 1e9 + 0.05)
    statements: list[str] = []
    await b._db.run(lambda conn: conn.set_trace_callback(statements.append))
    assert await b.acquire("tick", time.time_ns() + 10**10)
    assert len(statements) == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT COUNT(*) FROM machinery_locks").fetchone() == (1,)
    await a.close()
    await b.close()
