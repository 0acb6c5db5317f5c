"""A lock in the embedded SQLite file: periodic ticks fire once across local processes."""

from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING

from machinery.config import DEFAULT_SQLITE_URL
from machinery.drivers.lock import Lock
from machinery.drivers.sqlite.db import Schema, SQLiteDB, sqlite_path
from machinery.errors import BackendError

if TYPE_CHECKING:
    from machinery.config import Config

SCHEMA = Schema("lock", 1, (
    "CREATE TABLE IF NOT EXISTS machinery_locks "
    "(key TEXT PRIMARY KEY, expires_at_ns INTEGER NOT NULL) WITHOUT ROWID",
))

# One statement: insert when absent, take over when expired, change nothing when a live holder has it.
_ACQUIRE = (
    "INSERT INTO machinery_locks (key, expires_at_ns) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET expires_at_ns = excluded.expires_at_ns "
    "WHERE machinery_locks.expires_at_ns <= ?"
)


class SQLiteLock(Lock):
    """Expiring named locks in the machinery_locks table; acquire is one atomic statement."""

    def __init__(self, cnf: Config, url: str = DEFAULT_SQLITE_URL) -> None:
        super().__init__(cnf, url)
        self.path = sqlite_path(url, "lock")
        # Errors are BackendError: the lock lives in the result backend's store.
        self._db = SQLiteDB(
            self.path, cnf.sqlite.busy_timeout_ms, SCHEMA, BackendError, "machinery-sqlite-lock"
        )

    async def acquire(self, key: str, expires_at_ns: int) -> bool:
        def take(conn: sqlite3.Connection) -> bool:
            return conn.execute(_ACQUIRE, (key, expires_at_ns, time.time_ns())).rowcount == 1

        return await self._db.run(take)

    async def release(self, key: str) -> None:
        def drop(conn: sqlite3.Connection) -> None:
            conn.execute("DELETE FROM machinery_locks WHERE key = ?", (key,))

        await self._db.run(drop)

    async def close(self) -> None:
        await self._db.close()
