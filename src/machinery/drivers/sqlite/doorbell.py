"""Cross-process wake-ups for the embedded SQLite store: a directory of UNIX datagram sockets.

SQLite cannot tell another process that a row changed, so waiters in other processes would have
to poll the file. Instead, each process+driver object that waits binds one datagram socket in a
directory next to the database (`<db>.bells/<kind>/`); a writer, right after its commit, sends the
keys it changed (queue names, task UUIDs) to every socket there. A ring is only a hint: a woken
waiter re-reads the database, and waiters keep polling as a safety net, so a lost ring (a full
socket buffer, a deleted directory) only delays a wake-up until the next poll, never loses one.

Where datagram sockets or loop.add_reader are unavailable (Windows), the socket path would be too
long, or the directory cannot be created, waiting simply falls back to polling.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import secrets
import socket
import stat
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from machinery.log import get_logger

#: sun_path is 104 bytes on macOS/BSD, 108 on Linux, including the final NUL
_SUN_PATH_MAX = 103
_SUFFIX = ".bell"
#: "<pid hex>-<8 hex>.bell"
_NAME_MAX = 8 + 1 + 8 + len(_SUFFIX)
#: keys are packed into datagrams of at most this many bytes
_PACKET_MAX = 4096
_RECV_MAX = 65536
#: a directory listing taken less than this long after the directory's mtime may miss a later
#: change with the same (coarse) mtime, so it is taken again on the next ring
_SETTLE_NS = 3_000_000_000
#: after failing to bind, wait this long before trying again (meanwhile: polling)
_RETRY_BIND = 5.0


def bells_dir(db_path: str, kind: str) -> tuple[str, bool] | None:
    """The bell directory for a database file and a kind of driver, and whether it lies in the
    shared temp directory (then only its owner's sockets are trusted); None: poll only."""
    if db_path == ":memory:" or sys.platform == "win32" or not hasattr(socket, "AF_UNIX"):
        return None
    real = os.path.realpath(db_path)
    beside = os.path.join(real + ".bells", kind)
    if _fits(beside):
        return beside, False
    # Too deep for sun_path: a short directory under the temp dir, named by the database path.
    digest = hashlib.sha256(os.fsencode(real)).hexdigest()[:20]
    short = os.path.join(tempfile.gettempdir(), f"machinery-bells-{digest}", kind)
    return (short, True) if _fits(short) else None


def _fits(directory: str) -> bool:
    return len(os.fsencode(directory)) + 1 + _NAME_MAX <= _SUN_PATH_MAX


class _Endpoint:
    """One bound socket of one process: readers counts the waits watching it, per event loop."""

    __slots__ = ("__weakref__", "fd", "finalizer", "ino", "path", "pid", "readers", "retired", "sock")

    def __init__(self, sock: socket.socket, path: str, ino: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.path = path
        self.ino = ino
        self.pid = os.getpid()
        self.readers: dict[asyncio.AbstractEventLoop, int] = {}
        self.retired = False
        # closes the socket and unlinks its path when dropped, closed, or at interpreter exit
        self.finalizer = weakref.finalize(self, _cleanup, sock, path, self.pid)


def _cleanup(sock: socket.socket, path: str, pid: int) -> None:
    sock.close()
    if os.getpid() != pid:  # a forked child never unlinks its parent's socket
        return
    _unlink(os.fsencode(path))
    # The last one out removes the (then empty) directories: nothing is left in /tmp or beside the
    # database. A process binding meanwhile re-creates them (see _bind).
    kind_dir = os.path.dirname(path)
    for directory in (kind_dir, os.path.dirname(kind_dir)):
        try:
            os.rmdir(directory)
        except OSError:
            return


class Doorbell:
    """Ring other processes' waiters on one database; hear their rings while waiting.

    `on_ring(key)` is called (from any thread) for every key heard; it should wake local waiters
    (a Waiters.notify). All state lives on this object and is re-created after fork().
    """

    def __init__(self, db_path: str, kind: str, on_ring: Callable[[str], None]) -> None:
        found = bells_dir(db_path, kind)
        self.directory = found[0] if found else None
        self._in_tmp = bool(found and found[1])
        self._dir_b = os.fsencode(self.directory) if self.directory else b""
        self._on_ring = on_ring
        self._lock = threading.Lock()
        self._endpoint: _Endpoint | None = None
        self._retry_at = 0.0
        self._sender: socket.socket | None = None
        self._sender_pid = 0
        self._targets: tuple[bytes, ...] = ()
        self._mtime_ns: int | None = None
        self._listed_ns = 0

    # --- ringing ---------------------------------------------------------------------------

    def ring(self, keys: Iterable[str]) -> None:
        """Tell every waiting process that `keys` changed. Never raises and never blocks."""
        if self.directory is None:
            return
        packets = _pack(keys)
        if not packets:
            return
        with self._lock:
            try:
                self._ring(packets)
            except OSError as exc:  # a bell is a hint: failing to ring must not fail the write
                get_logger().debug("sqlite doorbell %s: ringing failed: %s", self.directory, exc)

    def _ring(self, packets: list[bytes]) -> None:
        targets = self._listing()
        if not targets:
            return
        own = self._endpoint
        skip = os.fsencode(own.path) if own is not None and own.pid == os.getpid() else None
        sender = self._sending_socket()
        for path in targets:
            if path == skip:  # this object's own waiters were woken in-process already
                continue
            for packet in packets:
                try:
                    sender.sendto(packet, path)
                except ConnectionRefusedError:
                    _unlink(path)  # bound by a process that is gone
                    break
                except OSError:
                    # EAGAIN/ENOBUFS: that waiter is behind and will poll; ENOENT: just closed
                    break

    def _listing(self) -> tuple[bytes, ...]:
        """The sockets in the directory, re-listed only when its mtime may have changed."""
        try:
            st = os.stat(self._dir_b)
        except OSError:
            self._targets, self._mtime_ns = (), None
            return ()
        if self._in_tmp and st.st_uid != os.getuid():
            return ()
        if st.st_mtime_ns != self._mtime_ns or self._listed_ns - st.st_mtime_ns < _SETTLE_NS:
            self._listed_ns = time.time_ns()
            self._targets = tuple(
                os.path.join(self._dir_b, name) for name in os.listdir(self._dir_b) if name.endswith(b".bell")
            )
            self._mtime_ns = st.st_mtime_ns
        return self._targets

    def _sending_socket(self) -> socket.socket:
        if self._sender is None or self._sender_pid != os.getpid():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            self._sender, self._sender_pid = sock, os.getpid()
        return self._sender

    # --- hearing ---------------------------------------------------------------------------

    @contextmanager
    def listening(self) -> Iterator[bool]:
        """While inside, rings wake this process's waiters; yields False when they cannot (poll only).

        Enter it before registering a waiter and checking the database, as with Waiters.
        """
        if self.directory is None:
            yield False
            return
        loop = asyncio.get_running_loop()
        ep = self._attach(loop)
        if ep is None:
            yield False
            return
        try:
            self._drain(ep.sock)  # rings that arrived while nobody listened: wake current waiters
            yield True
        finally:
            self._detach(ep, loop)

    def _attach(self, loop: asyncio.AbstractEventLoop) -> _Endpoint | None:
        with self._lock:
            ep = self._current()
            if ep is None:
                return None
            count = ep.readers.get(loop, 0)
            if count == 0:
                try:
                    loop.add_reader(ep.fd, self._drain, ep.sock)
                except (NotImplementedError, RuntimeError, OSError, ValueError):
                    return None  # e.g. Windows' proactor loop: poll
            ep.readers[loop] = count + 1
            return ep

    def _detach(self, ep: _Endpoint, loop: asyncio.AbstractEventLoop) -> None:
        with self._lock:
            count = ep.readers.get(loop, 0) - 1
            if count > 0:
                ep.readers[loop] = count
                return
            ep.readers.pop(loop, None)
            if not loop.is_closed():
                loop.remove_reader(ep.fd)
            if ep.retired and not ep.readers:
                ep.finalizer()

    def _current(self) -> _Endpoint | None:
        """This process's bound socket, bound (again) when missing, inherited or deleted."""
        ep = self._endpoint
        if ep is not None:
            if ep.pid != os.getpid():
                self._retire(ep)  # the parent's: our copy of it is only closed
                ep = None
            elif not _same_file(ep.path, ep.ino):
                self._retire(ep)  # someone removed it: rings cannot reach it any more
                ep = None
        if ep is None:
            if time.monotonic() < self._retry_at:
                return None
            ep = self._endpoint = self._bind()
        return ep

    def _bind(self) -> _Endpoint | None:
        assert self.directory is not None
        sock = None
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.setblocking(False)
            path = os.path.join(self.directory, f"{os.getpid():x}-{secrets.token_hex(4)}{_SUFFIX}")
            for attempt in range(3):
                try:
                    os.makedirs(self.directory, mode=0o700 if self._in_tmp else 0o777, exist_ok=True)
                    if self._in_tmp and not _owned(self.directory):
                        raise PermissionError(f"{self.directory} belongs to another user")
                    sock.bind(path)
                    break
                except FileNotFoundError:  # another process's exit removed the empty directory
                    if attempt == 2:
                        raise
            return _Endpoint(sock, path, os.stat(path).st_ino)
        except OSError as exc:
            if sock is not None:
                sock.close()
            self._retry_at = time.monotonic() + _RETRY_BIND
            get_logger().debug("sqlite doorbell %s unavailable, polling instead: %s", self.directory, exc)
            return None

    def _retire(self, ep: _Endpoint) -> None:
        """Stop using `ep`: unlink it now, close it once no loop watches it any more."""
        ep.retired = True
        if self._endpoint is ep:
            self._endpoint = None
        if ep.pid != os.getpid():
            ep.readers.clear()  # inherited through fork(): those loops belong to the parent
        elif _same_file(ep.path, ep.ino):
            _unlink(os.fsencode(ep.path))
        if not ep.readers:
            ep.finalizer()

    def _drain(self, sock: socket.socket) -> None:
        """Read every pending datagram and wake the waiters of the keys it names."""
        keys: set[bytes] = set()
        while True:
            try:
                data = sock.recv(_RECV_MAX)
            except OSError:  # EAGAIN: drained (another loop may have read it first)
                break
            keys.update(data.split(b"\0"))
        for key in keys:
            if key:
                self._on_ring(key.decode("utf-8", "replace"))

    def close(self) -> None:
        """Unlink and close this process's socket; a later wait binds a new one."""
        with self._lock:
            if self._endpoint is not None:
                self._retire(self._endpoint)
            sender, self._sender = self._sender, None
        if sender is not None:
            sender.close()


def _pack(keys: Iterable[str]) -> list[bytes]:
    """NUL-separated keys in datagrams of at most _PACKET_MAX bytes (a longer key goes alone)."""
    packets: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for key in keys:
        raw = key.encode("utf-8", "replace")
        if batch and size + len(raw) > _PACKET_MAX:
            packets.append(b"\0".join(batch))
            batch, size = [], 0
        batch.append(raw)
        size += len(raw) + 1
    if batch:
        packets.append(b"\0".join(batch))
    return packets


def _same_file(path: str, ino: int) -> bool:
    try:
        return os.stat(path).st_ino == ino
    except OSError:
        return False


def _owned(directory: str) -> bool:
    """The temp-dir fallback and its parent are real directories of this user (not planted by another)."""
    for d in (directory, os.path.dirname(directory)):
        st = os.lstat(d)
        if st.st_uid != os.getuid() or not stat.S_ISDIR(st.st_mode):
            return False
    return True


def _unlink(path: bytes) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
