"""The embedded broker: one SQLite table of messages shared by every process on the machine.

Each row carries `visible_ns`, the moment it may next be fetched. A delayed message is a row whose
visible_ns lies in the future; a fetch claims rows by moving visible_ns to the end of a lease and
stamping a fresh lease token. A worker that dies stops renewing, so its rows simply become visible
again when the lease runs out (at-least-once) - no mover process, nothing to lose or double.
A publish rings the database's broker doorbell, waking fetches in other processes at once; they
still poll, at most poll_interval_ms apart, in case a ring is lost.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import secrets
import sqlite3
import time
from collections.abc import Sequence
from functools import partial
from typing import TYPE_CHECKING, Any

from machinery.config import DEFAULT_SQLITE_URL
from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import DeadLetterListing, DelayedListing, Leases
from machinery.drivers.sqlite.db import Schema, SQLiteDB, immediate, sqlite_path
from machinery.drivers.sqlite.doorbell import Doorbell
from machinery.errors import BrokerError
from machinery.log import get_logger
from machinery.tasks.signature import Signature
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config

SCHEMA = Schema("broker", 1, (
    # visible_ns: due time; while claimed, the lease deadline. ready_ns: when the row last became
    # ready, kept by a claim so that a fetched batch comes back in queue order.
    """CREATE TABLE IF NOT EXISTS machinery_messages (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        body BLOB NOT NULL,
        visible_ns INTEGER NOT NULL,
        ready_ns INTEGER NOT NULL,
        lease_token INTEGER,
        attempts INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS machinery_messages_visible ON machinery_messages (queue, visible_ns, id)",
    """CREATE TABLE IF NOT EXISTS machinery_dead_letters (
        id INTEGER PRIMARY KEY,
        queue TEXT NOT NULL,
        body BLOB NOT NULL,
        reason TEXT NOT NULL,
        attempts INTEGER NOT NULL,
        created_ns INTEGER NOT NULL
    )""",
    # The last worker started on each queue, so that a producer writing to a file no worker has
    # ever used (a relative path resolved in another directory) is told so. Added without a
    # version bump: older releases neither need nor mind it.
    """CREATE TABLE IF NOT EXISTS machinery_workers (
        queue TEXT PRIMARY KEY,
        worker TEXT NOT NULL,
        pid INTEGER NOT NULL,
        started_ns INTEGER NOT NULL
    ) WITHOUT ROWID""",
))

_INSERT = (
    "INSERT INTO machinery_messages (queue, body, visible_ns, ready_ns, attempts, created_ns) "
    "VALUES (?, ?, ?, ?, 0, ?)"
)
# One statement claims the batch; SET reads the old visible_ns, so ready_ns keeps the queue position.
_CLAIM = (
    "UPDATE machinery_messages SET ready_ns = visible_ns, visible_ns = ?, lease_token = ?, "
    "attempts = attempts + 1 "
    "WHERE id IN (SELECT id FROM machinery_messages WHERE queue = ? AND visible_ns <= ? "
    "ORDER BY visible_ns, id LIMIT ?) "
    "RETURNING id, body, attempts, ready_ns"
)
_NEXT_VISIBLE = "SELECT MIN(visible_ns) FROM machinery_messages WHERE queue = ?"
_RELEASE = "UPDATE machinery_messages SET visible_ns = ?, lease_token = NULL WHERE id = ? AND lease_token = ?"
_RENEW = "UPDATE machinery_messages SET visible_ns = ? WHERE id = ? AND lease_token = ?"
_DELETE = "DELETE FROM machinery_messages WHERE id = ? AND lease_token = ?"
_DEAD = (
    "INSERT INTO machinery_dead_letters (queue, body, reason, attempts, created_ns) "
    "SELECT queue, body, ?, attempts, ? FROM machinery_messages WHERE id = ? AND lease_token = ?"
)

_NOTE_WORKER = "INSERT OR REPLACE INTO machinery_workers (queue, worker, pid, started_ns) VALUES (?, ?, ?, ?)"
_MIN_POLL = 0.002

_ClaimResult = tuple[list[tuple[int, bytes, int]], "int | None"]  # (id, body, attempts) rows, next visible_ns


class SQLiteBroker(Broker, Leases, DelayedListing, DeadLetterListing):
    """Broker in a local SQLite file (WAL): safe for many worker and producer processes."""

    lease_seconds: float = 30.0

    def __init__(self, cnf: Config, url: str = DEFAULT_SQLITE_URL) -> None:
        super().__init__(cnf, url)
        self.path = sqlite_path(url, "broker")
        self.lease_seconds = float(cnf.sqlite.lease_seconds)
        self._db = SQLiteDB(
            self.path, cnf.sqlite.busy_timeout_ms, SCHEMA, BrokerError, "machinery-sqlite-broker"
        )
        self._waiters = Waiters()
        self._bell = Doorbell(self.path, "broker", self._waiters.notify)
        #: queues whose worker record this object has looked up (once each: the warning is a hint)
        self._looked_up: set[str] = set()

    def _route(self, sig: Signature) -> str:
        return sig.routing_key or self.cnf.default_queue

    def _poll_cap(self) -> float:
        return max(self.cnf.sqlite.poll_interval_ms / 1000, _MIN_POLL)

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        await self.publish_many([(sig, body, eta_ns)])

    async def publish_many(self, items: Sequence[tuple[Signature, bytes, int | None]]) -> None:
        """All messages in one transaction: one commit however many there are."""
        if not items:
            return
        rows = [(self._route(sig), bytes(body), eta_ns) for sig, body, eta_ns in items]
        bell = self._bell
        look_up = {row[0] for row in rows} - self._looked_up
        self._looked_up |= look_up

        def insert(conn: sqlite3.Connection) -> tuple[set[str], list[str]]:
            queues = _insert(rows, conn)
            bell.ring(queues)  # right after the commit, from the database thread
            return queues, _never_consumed(look_up, conn) if look_up else []

        queues, unseen = await self._db.run(insert)
        for queue in queues:
            self._waiters.notify(queue)
        for queue in unseen:
            get_logger().warning(
                "no worker has ever consumed queue %r from the SQLite file %s: tasks wait there until one "
                "does. Is your worker using another file? A relative sqlite:/// URL, such as Config()'s "
                "default ./machinery.sqlite3, is resolved against each process's current directory.",
                queue, self.path)

    async def note_worker(self, queue: str, worker: str) -> None:
        """Record that `worker` consumes `queue` from this file (called by the worker at start)."""
        row = (queue, worker, os.getpid(), time.time_ns())
        await self._db.run(partial(_executemany, _NOTE_WORKER, [row]))

    # --- consuming -------------------------------------------------------------------------

    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        """Claim a batch, waiting for a publish (or polling) until `wait` passes.

        Publishes wake the fetch at once: through this object directly, from other processes by
        the doorbell. Polls, at most poll_interval_ms apart, catch what a lost ring missed; without
        a doorbell (Windows) they start at 2 ms and grow to that cap.
        """
        if max_count <= 0:
            return []
        with self._bell.listening() as rung:
            return await self._fetch(queue, max_count, wait, self._poll_cap() if rung else _MIN_POLL)

    async def _fetch(self, queue: str, max_count: int, wait: float, first: float) -> list[Delivery]:
        deadline = time.monotonic() + max(wait, 0.0)
        interval = first
        while True:
            fut = self._waiters.register(queue)
            try:
                got, next_ns = await self._claim(queue, max_count)
                if got:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                sleep = min(left, interval)
                if next_ns is not None:
                    sleep = min(sleep, max((next_ns - time.time_ns()) / 1e9, 0.0))
                try:
                    await asyncio.wait_for(asyncio.shield(fut), sleep)
                    interval = first
                except TimeoutError:
                    interval = min(interval * 2, self._poll_cap())
            finally:
                self._waiters.discard(queue, fut)

    async def _claim(self, queue: str, max_count: int) -> tuple[list[Delivery], int | None]:
        lease_ns = int(self.lease_seconds * 1e9)
        token = secrets.randbits(62)
        cf = self._db.submit(partial(_claim, queue, max_count, lease_ns, token))
        try:
            rows, next_ns = await asyncio.wrap_future(cf)
        except asyncio.CancelledError:
            # The claim may already be running on the database thread: hand back what it took.
            cf.add_done_callback(partial(self._release_orphans, token))
            raise
        out = [
            Delivery(body, queue, (msg_id, token), attempts > 1, attempts) for msg_id, body, attempts in rows
        ]
        return out, next_ns

    def _release_orphans(self, token: int, cf: concurrent.futures.Future[_ClaimResult]) -> None:
        if cf.cancelled() or cf.exception() is not None:
            return
        rows, _ = cf.result()
        if rows:
            self._db.submit(partial(_release, [(msg_id, token) for msg_id, _, _ in rows], 0))

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        receipts = _receipts(deliveries)
        if receipts:
            await self._db.run(partial(_executemany, _DELETE, receipts))

    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        receipts = _receipts(deliveries)
        if not receipts:
            return
        delay_ns = int(max(delay, 0.0) * 1e9)
        await self._db.run(partial(_release, receipts, delay_ns))
        # A delayed requeue wakes fetchers too: they learn when to look again.
        queues = {d.queue for d in deliveries}
        self._bell.ring(queues)
        for queue in queues:
            self._waiters.notify(queue)

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        receipts = _receipts(deliveries)
        if receipts:
            lease_ns = int(self.lease_seconds * 1e9)
            await self._db.run(partial(_renew, receipts, lease_ns))

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Move the row (if this delivery still holds it) to machinery_dead_letters with the reason."""
        receipts = _receipts([delivery])
        if receipts:
            await self._db.run(partial(_dead_letter, receipts[0], reason))

    # --- inspection ------------------------------------------------------------------------

    async def pending(self, queue: str) -> list[bytes]:
        def read(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT body FROM machinery_messages WHERE queue = ? AND visible_ns <= ? "
                "ORDER BY visible_ns, id",
                (queue, time.time_ns()),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._db.run(read)

    async def delayed(self) -> list[bytes]:
        def read(conn: sqlite3.Connection) -> list[bytes]:
            rows = conn.execute(
                "SELECT body FROM machinery_messages WHERE visible_ns > ? AND lease_token IS NULL "
                "ORDER BY visible_ns, id",
                (time.time_ns(),),
            ).fetchall()
            return [r[0] for r in rows]

        return await self._db.run(read)

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        def read(conn: sqlite3.Connection) -> list[tuple[bytes, str]]:
            rows = conn.execute("SELECT body, reason FROM machinery_dead_letters ORDER BY id").fetchall()
            return [(r[0], r[1]) for r in rows]

        return await self._db.run(read)

    async def close(self) -> None:
        self._bell.close()
        await self._db.close()


# --- statements run on the database thread ---------------------------------------------------


def _insert(rows: Sequence[tuple[str, bytes, int | None]], conn: sqlite3.Connection) -> set[str]:
    """Insert messages; the queues that received one (their fetchers get woken: for a delayed
    message, to learn when it becomes due)."""
    now = time.time_ns()
    values = []
    for queue, body, eta_ns in rows:
        visible = now if eta_ns is None or eta_ns <= now else eta_ns
        values.append((queue, body, visible, visible, now))
    with immediate(conn):
        conn.executemany(_INSERT, values)
    return {row[0] for row in values}


def _never_consumed(queues: set[str], conn: sqlite3.Connection) -> list[str]:
    """The queues no worker has ever been started on in this file."""
    known = {row[0] for row in conn.execute(
        f"SELECT queue FROM machinery_workers WHERE queue IN ({','.join('?' * len(queues))})", tuple(queues))}
    return sorted(queues - known)


def _claim(queue: str, max_count: int, lease_ns: int, token: int, conn: sqlite3.Connection) -> _ClaimResult:
    """Claim up to max_count visible rows; when none is visible, when the next one will be."""
    now = time.time_ns()
    next_ns = conn.execute(_NEXT_VISIBLE, (queue,)).fetchone()[0]
    if next_ns is None or next_ns > now:
        return [], next_ns
    with immediate(conn):
        now = time.time_ns()
        rows = conn.execute(_CLAIM, (now + lease_ns, token, queue, now, max_count)).fetchall()
    rows.sort(key=lambda r: (r[3], r[0]))
    return [(r[0], r[1], r[2]) for r in rows], None


def _release(receipts: Sequence[tuple[int, int]], delay_ns: int, conn: sqlite3.Connection) -> None:
    visible = time.time_ns() + delay_ns
    with immediate(conn):
        conn.executemany(_RELEASE, [(visible, msg_id, token) for msg_id, token in receipts])


def _renew(receipts: Sequence[tuple[int, int]], lease_ns: int, conn: sqlite3.Connection) -> None:
    until = time.time_ns() + lease_ns
    with immediate(conn):
        conn.executemany(_RENEW, [(until, msg_id, token) for msg_id, token in receipts])


def _executemany(sql: str, params: Sequence[tuple[Any, ...]], conn: sqlite3.Connection) -> None:
    with immediate(conn):
        conn.executemany(sql, params)


def _dead_letter(receipt: tuple[int, int], reason: str, conn: sqlite3.Connection) -> None:
    msg_id, token = receipt
    with immediate(conn):
        if conn.execute(_DEAD, (reason, time.time_ns(), msg_id, token)).rowcount:
            conn.execute(_DELETE, (msg_id, token))


def _receipts(deliveries: Sequence[Delivery]) -> list[tuple[int, int]]:
    """The (row id, lease token) pairs of deliveries this broker handed out."""
    out = []
    for d in deliveries:
        r = d.receipt
        if isinstance(r, tuple) and len(r) == 2 and isinstance(r[0], int) and isinstance(r[1], int):
            out.append((r[0], r[1]))
    return out
