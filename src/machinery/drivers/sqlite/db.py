"""Plumbing shared by the embedded SQLite broker, backend and lock.

SQLite calls block (a write waits up to busy_timeout for another process's lock), so each driver
object owns exactly one connection, used only from one dedicated thread. Coroutines hand it work
through a single-thread executor: no event loop ever blocks on the database, and the same driver
object works from any loop or thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TypeVar

from machinery.errors import ConfigError, MachineryError

T = TypeVar("T")

URL_PREFIX = "sqlite:///"
MEMORY_PATH = ":memory:"


def sqlite_path(url: str, field: str) -> str:
    """The database path of a sqlite:/// URL (absolute), or a ConfigError naming `field`.

    sqlite:///relative/path.db is relative to the current directory at construction time;
    sqlite:////absolute/path.db is absolute (the path is everything after 'sqlite:///').
    """
    expected = "expected sqlite:///relative/path.db or sqlite:////absolute/path.db"
    if url[: len(URL_PREFIX)].lower() != URL_PREFIX:
        raise ConfigError(f"config field {field}: {url!r} is not a SQLite URL; {expected}")
    path = url[len(URL_PREFIX):]
    if not path:
        raise ConfigError(f"config field {field}: {url!r} names no database file; {expected}")
    if path == MEMORY_PATH:
        return path
    if path.endswith(("/", os.sep)) or "?" in path or "#" in path:
        raise ConfigError(
            f"config field {field}: {url!r} is not a file path (no query, no trailing '/'); {expected}"
        )
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise ConfigError(f"config field {field}: the directory {parent!r} of {url!r} does not exist")
    return full


@dataclass(frozen=True, slots=True)
class Schema:
    """The tables of one component, created idempotently and recorded in machinery_schema."""

    component: str
    version: int
    statements: Sequence[str]


@contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction that takes the write lock up front, so it never fails half-way on BUSY."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


class _Thread:
    """One executor thread and the connection that lives on it."""

    __slots__ = ("conn", "executor", "pid")

    def __init__(self, name: str) -> None:
        self.executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix=name)
        self.conn: sqlite3.Connection | None = None
        self.pid = os.getpid()


class SQLiteDB:
    """One connection to one database file, driven from its own thread."""

    def __init__(
        self, path: str, busy_timeout_ms: int, schema: Schema, error: type[MachineryError], name: str
    ) -> None:
        self.path = path
        self.busy_timeout_ms = busy_timeout_ms
        self._schema = schema
        self._error = error
        self._name = name
        self._lock = threading.Lock()
        self._thread: _Thread | None = None
        # Connections inherited through fork() are kept, never closed: closing one in the child
        # could disturb the parent's locks (SQLite forbids carrying a connection across fork).
        self._inherited: list[_Thread] = []

    def submit(self, fn: Callable[[sqlite3.Connection], T]) -> concurrent.futures.Future[T]:
        """Queue `fn(connection)` on the connection's thread."""
        with self._lock:
            thread = self._thread
            # A forked child inherits neither the thread nor a usable connection: start afresh.
            if thread is None or thread.pid != os.getpid():
                if thread is not None:
                    self._inherited.append(thread)
                thread = self._thread = _Thread(self._name)
            return thread.executor.submit(self._call, thread, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        """Run `fn(connection)` on the connection's thread without blocking the event loop."""
        return await asyncio.wrap_future(self.submit(fn))

    def _call(self, thread: _Thread, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            if thread.conn is None:
                thread.conn = self._open()
            return fn(thread.conn)
        except sqlite3.Error as exc:
            raise self._error(f"sqlite database {self.path}: {exc}") from exc

    def _open(self) -> sqlite3.Connection:
        if self.path != MEMORY_PATH and not self.path.startswith("file:"):
            _create_private(self.path)
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_ms / 1000, isolation_level=None)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            if self.path != MEMORY_PATH:
                self._retry_busy(lambda: conn.execute("PRAGMA journal_mode = WAL").fetchall())
            conn.execute("PRAGMA synchronous = NORMAL")
            self._retry_busy(lambda: self._create_schema(conn))
        except BaseException:
            conn.close()
            raise
        return conn

    def _retry_busy(self, fn: Callable[[], object]) -> None:
        """Retry start-up statements that SQLite may refuse with BUSY without calling the busy handler."""
        deadline = time.monotonic() + max(self.busy_timeout_ms, 1000) / 1000
        delay = 0.005
        while True:
            try:
                fn()
                return
            except sqlite3.OperationalError as exc:
                text = str(exc).lower()
                if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _create_schema(self, conn: sqlite3.Connection) -> None:
        schema = self._schema
        with immediate(conn):
            conn.execute(
                "CREATE TABLE IF NOT EXISTS machinery_schema "
                "(component TEXT PRIMARY KEY, version INTEGER NOT NULL)"
            )
            row = conn.execute(
                "SELECT version FROM machinery_schema WHERE component = ?", (schema.component,)
            ).fetchone()
            if row is not None and row[0] > schema.version:
                raise self._error(
                    f"sqlite database {self.path}: its {schema.component} tables are version {row[0]}, "
                    f"newer than this machinery understands ({schema.version}); upgrade machinery"
                )
            for statement in schema.statements:
                conn.execute(statement)
            if row is None or row[0] < schema.version:
                conn.execute(
                    "INSERT OR REPLACE INTO machinery_schema (component, version) VALUES (?, ?)",
                    (schema.component, schema.version),
                )

    async def close(self) -> None:
        """Close the connection and stop its thread; the next call opens a new one."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None and thread.pid != os.getpid():
                self._inherited.append(thread)
                return
        if thread is None:
            return
        done = thread.executor.submit(_close_conn, thread)
        thread.executor.shutdown(wait=False)
        await asyncio.wrap_future(done)


def _close_conn(thread: _Thread) -> None:
    if thread.conn is not None:
        thread.conn.close()
        thread.conn = None


def chunks(items: Sequence[T], size: int = 500) -> Iterator[Sequence[T]]:
    """Slices small enough for SQLite's limit on bound parameters."""
    for start in range(0, len(items), size):
        yield items[start: start + size]


def _create_private(path: str) -> None:
    """Create the database file readable by its owner only (arguments and results are in it);
    SQLite gives its -wal and -shm files the same mode. An existing file keeps its mode."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    except OSError:
        return  # sqlite3.connect reports the real problem (no such directory, no permission)
    os.close(fd)
