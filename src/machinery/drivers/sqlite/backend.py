"""The embedded result backend: task states and group progress in a local SQLite file.

States are stored as Go's TaskState JSON so that tooling reading the file sees Machinery's shape.
Group progress keeps one row per counted member, so counting a member is idempotent (a redelivered
task is not counted twice) and costs O(1) whatever the group size; the chord flag is flipped by a
single conditional UPDATE, so exactly one caller, in any process, wins it. Storing a final state
rings the database's backend doorbell, so wait_completed in other processes wakes at once.
A later state without a CreatedAt keeps the stored one (PENDING's, as Go and the Redis backend do):
the write's own UPSERT splices it in, so it costs no extra statement or read.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from functools import partial
from typing import TYPE_CHECKING

from machinery.config import DEFAULT_SQLITE_URL
from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import ResultWakeups
from machinery.drivers.sqlite.db import Schema, SQLiteDB, chunks, immediate, sqlite_path
from machinery.drivers.sqlite.doorbell import Doorbell
from machinery.errors import BackendError
from machinery.tasks.state import PENDING, GroupMeta, TaskState, decode_state, encode_state
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config

SCHEMA = Schema("backend", 1, (
    """CREATE TABLE IF NOT EXISTS machinery_task_states (
        uuid TEXT PRIMARY KEY,
        state BLOB NOT NULL,
        expires_at_ns INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS machinery_task_states_expiry ON machinery_task_states (expires_at_ns)",
    """CREATE TABLE IF NOT EXISTS machinery_groups (
        group_uuid TEXT PRIMARY KEY,
        task_uuids TEXT NOT NULL,
        chord_triggered INTEGER NOT NULL DEFAULT 0,
        done INTEGER NOT NULL DEFAULT 0,
        failed INTEGER NOT NULL DEFAULT 0,
        created_ns INTEGER NOT NULL,
        expires_at_ns INTEGER NOT NULL
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS machinery_groups_expiry ON machinery_groups (expires_at_ns)",
    """CREATE TABLE IF NOT EXISTS machinery_group_members (
        group_uuid TEXT NOT NULL,
        task_uuid TEXT NOT NULL,
        PRIMARY KEY (group_uuid, task_uuid)
    ) WITHOUT ROWID""",
))

# Parameters: uuid, state JSON, expiry, then ?4, the byte offset of the new JSON's zero CreatedAt
# value (NULL: store the JSON as given) and ?5, now. With ?4 set, a live stored row's non-zero
# CreatedAt replaces that value (22 bytes, quotes included); json_extract finds the top-level key
# even when a result holds one, and a row that is not JSON is simply replaced.
_SET_STATE = (
    "INSERT INTO machinery_task_states (uuid, state, expires_at_ns) VALUES (?1, ?2, ?3) "
    "ON CONFLICT (uuid) DO UPDATE SET state = CASE "
    "WHEN ?4 IS NULL OR expires_at_ns <= ?5 OR NOT json_valid(CAST(state AS TEXT)) THEN excluded.state "
    "ELSE coalesce(CAST(substr(excluded.state, 1, ?4) || '\"' || "
    "nullif(json_extract(CAST(state AS TEXT), '$.CreatedAt'), '0001-01-01T00:00:00Z') || '\"' || "
    "substr(excluded.state, ?4 + 23) AS BLOB), excluded.state) END, "
    "expires_at_ns = excluded.expires_at_ns"
)
_CREATED_KEY = b'"CreatedAt":'
_NEW_GROUP = (
    "INSERT OR REPLACE INTO machinery_groups "
    "(group_uuid, task_uuids, chord_triggered, done, failed, created_ns, expires_at_ns) "
    "VALUES (?, ?, 0, 0, 0, ?, ?)"
)
_DROP_MEMBERS = "DELETE FROM machinery_group_members WHERE group_uuid = ?"
_DROP_GROUP = "DELETE FROM machinery_groups WHERE group_uuid = ?"
_PURGE_BATCH = 2000
_MIN_POLL = 0.002


class SQLiteBackend(Backend, ResultWakeups):
    """Result backend in a local SQLite file (WAL), shareable with the SQLite broker's file."""

    def __init__(self, cnf: Config, url: str = DEFAULT_SQLITE_URL) -> None:
        super().__init__(cnf, url)
        self.path = sqlite_path(url, "result_backend")
        self._db = SQLiteDB(
            self.path, cnf.sqlite.busy_timeout_ms, SCHEMA, BackendError, "machinery-sqlite-backend"
        )
        self._waiters = Waiters()
        self._bell = Doorbell(self.path, "backend", self._waiters.notify)
        # other processes' writes wake waiters through the doorbell, or are seen by re-reading,
        # at most this far apart
        self.poll_cap = max(cnf.sqlite.poll_interval_ms / 1000, _MIN_POLL)
        self._next_purge = 0.0

    def _expires_at_ns(self) -> int:
        return time.time_ns() + self.expire_in * 1_000_000_000

    def _purge_due(self) -> bool:
        """True about once per min(60 s, expiry): expired rows are invisible anyway, this reclaims space."""
        now = time.monotonic()
        if now < self._next_purge:
            return False
        self._next_purge = now + min(60.0, float(self.expire_in))
        return True

    # --- task states -----------------------------------------------------------------------

    async def set_states(self, states: Sequence[TaskState]) -> None:
        if not states:
            return
        now = time.time_ns()
        expires = now + self.expire_in * 1_000_000_000
        rows = [_state_row(s, encode_state(s), expires, now) for s in states]
        done = [s.task_uuid for s in states if s.is_completed()]
        write = partial(_write, _SET_STATE, rows, self._purge_due())
        bell = self._bell

        def write_and_ring(conn: sqlite3.Connection) -> None:
            write(conn)
            bell.ring(done)  # right after the commit, from the database thread

        await self._db.run(write_and_ring if done else write)
        for uuid in done:
            self._waiters.notify(uuid)

    @property
    def waiters(self) -> Waiters:
        return self._waiters

    def remote_wakeups(self) -> AbstractContextManager[bool]:
        return self._bell.listening()

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        found = await self._db.run(partial(_read_states, list(task_uuids)))
        out: list[TaskState | None] = []
        for uuid in task_uuids:
            blob = found.get(uuid)
            out.append(decode_state(blob) if blob is not None else None)
        return out

    async def purge_state(self, task_uuid: str) -> None:
        sql = "DELETE FROM machinery_task_states WHERE uuid = ?"
        await self._db.run(partial(_write, sql, [(task_uuid,)], False))

    # --- groups ----------------------------------------------------------------------------

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        members = json.dumps(list(task_uuids))
        job = partial(_init_group, group_uuid, members, self._expires_at_ns(), self._purge_due())
        await self._db.run(job)

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        def read(conn: sqlite3.Connection) -> tuple[str, int, int] | None:
            row: tuple[str, int, int] | None = conn.execute(
                "SELECT task_uuids, chord_triggered, created_ns FROM machinery_groups "
                "WHERE group_uuid = ? AND expires_at_ns > ?",
                (group_uuid, time.time_ns()),
            ).fetchone()
            return row

        row = await self._db.run(read)
        if row is None:
            return None
        task_uuids, triggered, created_ns = row
        created = datetime.fromtimestamp(created_ns / 1e9, UTC)
        members = list(json.loads(task_uuids))
        return GroupMeta(group_uuid, members, chord_triggered=bool(triggered), created_at=created)

    async def group_member_done(
        self, group_uuid: str, task_uuid: str, total: int, failed: bool
    ) -> GroupProgress:
        done, nfailed, counted = await self._db.run(
            partial(_member_done, group_uuid, task_uuid, failed, self._expires_at_ns())
        )
        return GroupProgress(done, nfailed, counted)

    async def trigger_chord(self, group_uuid: str) -> bool:
        def flip(conn: sqlite3.Connection) -> bool:
            with immediate(conn):
                cur = conn.execute(
                    "UPDATE machinery_groups SET chord_triggered = 1 "
                    "WHERE group_uuid = ? AND chord_triggered = 0 AND expires_at_ns > ?",
                    (group_uuid, time.time_ns()),
                )
                return cur.rowcount == 1

        return await self._db.run(flip)

    async def purge_group_meta(self, group_uuid: str) -> None:
        def purge(conn: sqlite3.Connection) -> None:
            with immediate(conn):
                conn.execute(_DROP_MEMBERS, (group_uuid,))
                conn.execute(_DROP_GROUP, (group_uuid,))

        await self._db.run(purge)

    async def close(self) -> None:
        self._bell.close()
        await self._db.close()


# --- statements run on the database thread ---------------------------------------------------


def _state_row(s: TaskState, raw: bytes, expires: int, now: int) -> tuple[object, ...]:
    """_SET_STATE's parameters: a later state without a CreatedAt asks for the stored one."""
    if s.created_at is not None or s.state == PENDING:
        return (s.task_uuid, raw, expires, None, now)
    # CreatedAt is the last top-level key; inside JSON strings quotes are escaped, so no match there
    return (s.task_uuid, raw, expires, raw.rindex(_CREATED_KEY) + len(_CREATED_KEY), now)


def _write(sql: str, rows: Sequence[tuple[object, ...]], purge: bool, conn: sqlite3.Connection) -> None:
    with immediate(conn):
        conn.executemany(sql, rows)
    if purge:
        _purge_expired(conn)


def _read_states(uuids: list[str], conn: sqlite3.Connection) -> dict[str, bytes]:
    now = time.time_ns()
    found: dict[str, bytes] = {}
    for part in chunks(uuids):
        marks = ",".join("?" * len(part))
        rows = conn.execute(
            f"SELECT uuid, state FROM machinery_task_states WHERE uuid IN ({marks}) AND expires_at_ns > ?",
            (*part, now),
        ).fetchall()
        found.update((r[0], r[1]) for r in rows)
    return found


def _init_group(group_uuid: str, members: str, expires: int, purge: bool, conn: sqlite3.Connection) -> None:
    """Create the group record; a live one keeps its progress (a redelivered parent may send it again)."""
    with immediate(conn):
        row = conn.execute(
            "SELECT expires_at_ns FROM machinery_groups WHERE group_uuid = ?", (group_uuid,)
        ).fetchone()
        if row is not None and row[0] > time.time_ns():
            conn.execute(
                "UPDATE machinery_groups SET task_uuids = ?, expires_at_ns = ? WHERE group_uuid = ?",
                (members, expires, group_uuid),
            )
        else:
            conn.execute(_DROP_MEMBERS, (group_uuid,))
            conn.execute(_NEW_GROUP, (group_uuid, members, time.time_ns(), expires))
    if purge:
        _purge_expired(conn)


def _member_done(
    group_uuid: str, task_uuid: str, failed: bool, expires: int, conn: sqlite3.Connection
) -> tuple[int, int, bool]:
    """Count one member once; all in one transaction so concurrent processes see a consistent count."""
    with immediate(conn):
        row = conn.execute(
            "SELECT expires_at_ns FROM machinery_groups WHERE group_uuid = ?", (group_uuid,)
        ).fetchone()
        if row is None or row[0] <= time.time_ns():
            # Unknown (or expired) group: start a fresh record, as the memory backend does.
            conn.execute(_DROP_MEMBERS, (group_uuid,))
            conn.execute(_NEW_GROUP, (group_uuid, "[]", time.time_ns(), expires))
        inserted = conn.execute(
            "INSERT OR IGNORE INTO machinery_group_members (group_uuid, task_uuid) VALUES (?, ?)",
            (group_uuid, task_uuid),
        ).rowcount
        if inserted:
            done, nfailed = conn.execute(
                "UPDATE machinery_groups SET done = done + 1, failed = failed + ? WHERE group_uuid = ? "
                "RETURNING done, failed",
                (int(failed), group_uuid),
            ).fetchone()
        else:
            done, nfailed = conn.execute(
                "SELECT done, failed FROM machinery_groups WHERE group_uuid = ?", (group_uuid,)
            ).fetchone()
    return int(done), int(nfailed), bool(inserted)


def _purge_expired(conn: sqlite3.Connection) -> None:
    """Delete a bounded batch of expired rows in short transactions (readers already ignore them)."""
    now = time.time_ns()
    with immediate(conn):
        conn.execute(
            "DELETE FROM machinery_task_states WHERE uuid IN "
            "(SELECT uuid FROM machinery_task_states WHERE expires_at_ns <= ? LIMIT ?)",
            (now, _PURGE_BATCH),
        )
    with immediate(conn):
        expired = conn.execute(
            "SELECT group_uuid FROM machinery_groups WHERE expires_at_ns <= ? LIMIT ?", (now, _PURGE_BATCH)
        ).fetchall()
        conn.executemany(_DROP_MEMBERS, expired)
        conn.executemany(_DROP_GROUP, expired)
