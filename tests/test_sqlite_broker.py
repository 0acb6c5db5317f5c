"""SQLite-specific behaviour of the embedded broker (the shared semantics are in tests/contract)."""

from __future__ import annotations

import asyncio
import multiprocessing
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from machinery.config import Config, SQLiteConfig
from machinery.drivers.registry import make_backend, make_broker, make_lock
from machinery.drivers.sqlite.broker import SQLiteBroker
from machinery.errors import BrokerError, ConfigError
from machinery.tasks.signature import Signature
from timing import Calls, RecordingAsyncio

SIG = Signature("t")


def cnf_for(db: Path, **sqlite: Any) -> Config:
    url = f"sqlite:///{db}"
    return Config(broker=url, result_backend=url, sqlite=SQLiteConfig(**sqlite))


def broker_at(db: Path, **sqlite: Any) -> SQLiteBroker:
    cnf = cnf_for(db, **sqlite)
    return SQLiteBroker(cnf, cnf.broker)


# --- URLs ------------------------------------------------------------------------------------


def test_relative_and_absolute_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    rel = make_broker(Config(broker="sqlite:///sub/q.db"))
    assert isinstance(rel, SQLiteBroker)
    assert rel.path == str(tmp_path / "sub" / "q.db")
    absolute = make_broker(Config(broker="sqlite:///" + str(tmp_path / "abs.db")))  # sqlite:////tmp/...
    assert isinstance(absolute, SQLiteBroker)
    assert absolute.path == str(tmp_path / "abs.db")


@pytest.mark.parametrize("url", [
    "sqlite://q.db", "sqlite://", "sqlite:///", "sqlite:///dir/", "sqlite:///q.db?mode=ro",
    "sqlite:///no/such/dir/q.db",
])
def test_bad_urls_name_the_field(url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="config field broker"):
        make_broker(Config(broker=url))
    with pytest.raises(ConfigError, match="config field result_backend"):
        make_backend(Config(result_backend=url))
    with pytest.raises(ConfigError, match="config field lock"):
        make_lock(Config(lock=url))


async def test_default_config_shares_one_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cnf = Config()
    broker, backend, lock = make_broker(cnf), make_backend(cnf), make_lock(cnf)
    try:
        await broker.publish(SIG, b"x", None)
        await backend.init_group("g", ["a"])
        assert await lock.acquire("k", time.time_ns() + 10**10)
        assert [d.body for d in await broker.fetch(cnf.default_queue, 10, 1.0)] == [b"x"]
    finally:
        await broker.close()
        await backend.close()
        await lock.close()
    with sqlite3.connect(tmp_path / "machinery.sqlite3") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = dict(conn.execute("SELECT component, version FROM machinery_schema").fetchall())
    assert {"machinery_messages", "machinery_dead_letters", "machinery_task_states", "machinery_groups",
            "machinery_group_members", "machinery_locks", "machinery_schema"} <= tables
    assert versions == {"broker": 1, "backend": 1, "lock": 1}


# --- connection settings ---------------------------------------------------------------------


async def test_wal_synchronous_normal_and_busy_timeout(tmp_path: Path) -> None:
    broker = broker_at(tmp_path / "b.db", busy_timeout_ms=4321)
    try:
        await broker.pending("q")

        def pragmas(conn: sqlite3.Connection) -> tuple[str, int, int]:
            mode, sync, busy = (conn.execute(f"PRAGMA {name}").fetchone()[0]
                                for name in ("journal_mode", "synchronous", "busy_timeout"))
            return mode, sync, busy

        assert await broker._db.run(pragmas) == ("wal", 1, 4321)
    finally:
        await broker.close()


async def test_schema_creation_is_idempotent_and_refuses_newer_versions(tmp_path: Path) -> None:
    db = tmp_path / "s.db"
    for _ in range(2):
        broker = broker_at(db)
        await broker.publish(SIG, b"kept", None)
        await broker.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE machinery_schema SET version = 99 WHERE component = 'broker'")
    broker = broker_at(db)
    with pytest.raises(BrokerError, match="newer"):
        await broker.pending("machinery_tasks")
    await broker.close()


async def test_locked_database_does_not_block_the_event_loop(tmp_path: Path) -> None:
    db = tmp_path / "locked.db"
    broker = broker_at(db, busy_timeout_ms=10_000)
    await broker.pending("q")  # create the schema
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        publish = asyncio.create_task(broker.publish(SIG, b"later", None))
        ticks = 0
        start = time.monotonic()
        while time.monotonic() - start < 0.5:
            await asyncio.sleep(0.01)
            ticks += 1
        assert not publish.done(), "the publish should still be waiting for the write lock"
        assert ticks >= 10, f"the event loop stalled while the database was locked ({ticks} ticks)"
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    await asyncio.wait_for(publish, 5.0)
    assert await broker.pending(broker.cnf.default_queue) == [b"later"]
    await broker.close()


async def test_busy_timeout_exceeded_raises_broker_error(tmp_path: Path) -> None:
    db = tmp_path / "busy.db"
    broker = broker_at(db, busy_timeout_ms=200)
    await broker.pending("q")
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BrokerError, match="locked"):
            await broker.publish(SIG, b"x", None)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await broker.close()


# --- claims and leases -----------------------------------------------------------------------


async def test_lease_seconds_comes_from_config(tmp_path: Path) -> None:
    broker = broker_at(tmp_path / "l.db", lease_seconds=7.5)
    assert broker.lease_seconds == 7.5
    assert SQLiteBroker.lease_seconds is not None


async def test_publish_many_and_ack_are_one_transaction_each(tmp_path: Path) -> None:
    broker = broker_at(tmp_path / "tx.db")
    await broker.pending("q")
    statements: list[str] = []
    await broker._db.run(lambda conn: conn.set_trace_callback(statements.append))
    await broker.publish_many([(SIG, f"m{i}".encode(), None) for i in range(200)])
    assert statements.count("BEGIN IMMEDIATE") == 1
    statements.clear()
    got = await broker.fetch(broker.cnf.default_queue, 200, 1.0)
    assert len(got) == 200
    assert statements.count("BEGIN IMMEDIATE") == 1, "a batch must be claimed in one transaction"
    statements.clear()
    await broker.ack(got)
    assert statements.count("BEGIN IMMEDIATE") == 1
    await broker.close()


async def test_same_process_publish_wakes_fetch_before_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker = broker_at(tmp_path / "wake.db", poll_interval_ms=600_000)  # no poll during the fetch
    await broker.pending("q")
    claims = Calls(monkeypatch, broker, "_claim")
    fetch = asyncio.create_task(broker.fetch(broker.cnf.default_queue, 10, 10.0))
    await claims.reach(1)  # found nothing: the fetch now waits, and no poll is due for ten minutes
    await broker.publish(SIG, b"now", None)
    got = await fetch  # a fetch nothing woke would return [] after its 10 s
    assert [d.body for d in got] == [b"now"]
    assert claims.count == 2  # one more claim, started by the publish's wake-up


async def test_other_process_publish_is_seen_within_the_poll_interval(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from machinery.drivers.sqlite import broker as sqlite_broker

    db = tmp_path / "poll.db"
    consumer, producer = broker_at(db, poll_interval_ms=50), broker_at(db)
    await consumer.pending("q")
    waits = RecordingAsyncio()
    monkeypatch.setattr(sqlite_broker, "asyncio", waits)
    claims = Calls(monkeypatch, consumer, "_claim")
    fetch = asyncio.create_task(consumer.fetch(consumer.cnf.default_queue, 10, 10.0))
    await claims.reach(15)  # uncapped, a back-off from 2 ms would be sleeping 16 s by now
    await producer.publish(SIG, b"polled", None)
    assert [d.body for d in await fetch] == [b"polled"]
    assert waits.timeouts and all(t is not None and t <= 0.05 for t in waits.timeouts)  # polls stay 50 ms apart
    await consumer.close()
    await producer.close()


async def test_cancelled_fetch_hands_back_its_claim_at_once(tmp_path: Path) -> None:
    """A fetch cancelled while its claim runs (worker shutdown) must not sit on a 30 s lease."""
    db = tmp_path / "cancel.db"
    broker = broker_at(db, lease_seconds=30.0, busy_timeout_ms=10_000)
    await broker.publish_many([(SIG, f"m{i}".encode(), None) for i in range(5)])
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the claim will wait for this lock on its thread
    try:
        fetch = asyncio.create_task(broker.fetch(broker.cnf.default_queue, 10, 5.0))
        await asyncio.sleep(0.3)
        fetch.cancel()
        with pytest.raises(asyncio.CancelledError):
            await fetch
    finally:
        blocker.execute("COMMIT")
        blocker.close()
    got = await broker.fetch(broker.cnf.default_queue, 10, 2.0)
    assert sorted(d.body for d in got) == [f"m{i}".encode() for i in range(5)]
    await broker.close()


async def test_stale_delivery_cannot_touch_a_new_claim(tmp_path: Path) -> None:
    db = tmp_path / "stale.db"
    a, b = broker_at(db, lease_seconds=0.3), broker_at(db, lease_seconds=30.0)
    await a.publish(SIG, b"m", None)
    stale = await a.fetch(a.cnf.default_queue, 1, 1.0)
    await asyncio.sleep(0.4)
    fresh = await b.fetch(b.cnf.default_queue, 1, 1.0)
    assert [d.attempts for d in fresh] == [2]
    await a.ack(stale)
    await a.requeue(stale)
    await a.dead_letter(stale[0], "stale")
    assert await a.dead_letters() == []
    assert await a.fetch(a.cnf.default_queue, 1, 0.1) == [], "the stale holder released b's claim"
    await b.dead_letter(fresh[0], "bad body")
    assert await b.dead_letters() == [(b"m", "bad body")]
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT attempts FROM machinery_dead_letters").fetchall() == [(2,)]
        assert conn.execute("SELECT COUNT(*) FROM machinery_messages").fetchone() == (0,)
    await a.close()
    await b.close()


async def test_dead_letter_is_all_or_nothing(tmp_path: Path) -> None:
    db = tmp_path / "dl.db"
    broker = broker_at(db)
    await broker.publish(SIG, b"m", None)
    got = await broker.fetch(broker.cnf.default_queue, 1, 1.0)
    with sqlite3.connect(db) as conn:
        conn.execute(
            "CREATE TRIGGER fail_delete BEFORE DELETE ON machinery_messages "
            "BEGIN SELECT RAISE(ABORT, 'injected failure'); END"
        )
    with pytest.raises(BrokerError, match="injected failure"):
        await broker.dead_letter(got[0], "bad")
    assert await broker.dead_letters() == [], "a failed dead-letter left a copy behind"
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER fail_delete")
    await broker.dead_letter(got[0], "bad")
    assert await broker.dead_letters() == [(b"m", "bad")]
    await broker.close()


async def test_many_due_delayed_messages_come_in_one_fetch(tmp_path: Path) -> None:
    broker = broker_at(tmp_path / "d.db")
    eta = time.time_ns() + 1_500_000_000
    await broker.publish_many([(SIG, f"d{i}".encode(), eta) for i in range(2000)])
    assert len(await broker.delayed()) == 2000
    await asyncio.sleep(max(eta - time.time_ns(), 0) / 1e9 + 0.05)
    got = await broker.fetch(broker.cnf.default_queue, 5000, 1.0)
    assert [d.body for d in got] == [f"d{i}".encode() for i in range(2000)]
    assert await broker.delayed() == []
    await broker.close()


def _child_publish(broker: SQLiteBroker) -> None:
    asyncio.run(broker.publish(SIG, b"from-child", None))


async def test_usable_after_fork(tmp_path: Path) -> None:
    broker = broker_at(tmp_path / "fork.db")
    await broker.pending("q")  # the parent's connection thread exists before the fork
    proc = multiprocessing.get_context("fork").Process(target=_child_publish, args=(broker,))
    proc.start()
    await asyncio.to_thread(proc.join, 30)
    assert proc.exitcode == 0
    assert await broker.pending(broker.cnf.default_queue) == [b"from-child"]
    await broker.close()
