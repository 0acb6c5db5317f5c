"""Memcache result backend in Go Machinery's layout (`memcache://h1:p1,h2:p2`).

What Go reads and writes: the key `<TaskUUID>` holds the TaskState JSON and `<GroupUUID>` the
GroupMeta JSON, stored with an absolute expiration (unix seconds now + results_expire_in). With
several servers a key goes to `servers[crc32_ieee(key) % len(servers)]`, in URL order: gomemcache's
ServerList pick, so Go and Python processes given the same URL agree on where every key lives.

Beyond Go (whose memcache chord could fire twice and whose later states lost TaskName/CreatedAt):

* A state without TaskName or CreatedAt takes them from the stored state, as Go's Redis backend does.
* Each item's expiry is also kept in its memcached client flags and checked on read, so a result
  lives exactly results_expire_in seconds instead of memcached's one-second-coarse clock deciding.
  Go writes flags 0 (no check) and ignores them when reading.
* set_pending uses `add`, so it never overwrites a state a worker already stored (it only fills in
  the TaskName/CreatedAt such a state lacks, with gets/cas).
* Group progress: counting a member first `add`s the marker key `<group>:done:<task>` (only one
  caller can), and only that caller `incr`s the counter `<group>:progress`, which holds
  done + failed * 2**32 so one atomic step returns both. These keys live on the group key's server.
  A worker killed between the two steps leaves its member uncounted (the chord then does not fire,
  as when memcached evicts the group): memcache is a cache, use Redis or SQLite where that matters.
* trigger_chord flips ChordTriggered in the GroupMeta JSON with gets/cas: exactly one caller wins.
  While a Go worker holds the meta's `Lock` flag it waits, as Go does, up to `lock_wait` seconds.

Expiry times are Go's rounded up to the next second, so a value lives at least results_expire_in.
The client is aiomcache (asyncio, gets/cas, one pool per server and event loop); every command runs
to its end even when its caller is cancelled, because aiomcache would otherwise pool a connection
whose reply is still unread.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
import zlib
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import aiomcache
from aiomcache.exceptions import ClientException, ValidationException

from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import ConditionalPending, ResultWakeups
from machinery.errors import BackendError, ConfigError, DecodeError
from machinery.loops import PerLoop
from machinery.tasks import gojson
from machinery.tasks.state import (
    PENDING,
    GroupMeta,
    TaskState,
    decode_group_meta,
    decode_state,
    encode_group_meta,
    encode_state,
)
from machinery.waiters import Waiters

if TYPE_CHECKING:
    from machinery.config import Config

T = TypeVar("T")
DEFAULT_PORT = 11211
FAILED_UNIT = 1 << 32  # the progress counter holds done + failed * FAILED_UNIT
_MAX_KEY = 250
_GET_CHUNK = 100  # keys per multi-key get
_CAS_TRIES = 5  # set_pending gives up filling in a state that keeps changing under it


class _Stamped:
    """A stored value with its absolute expiry (unix seconds), carried in memcached's client flags."""

    __slots__ = ("data", "expires")

    def __init__(self, data: bytes, expires: int) -> None:
        self.data = data
        self.expires = expires

    def live(self, now: float) -> bool:
        return now < self.expires


async def _to_flags(value: _Stamped) -> tuple[bytes, int]:
    return value.data, value.expires


async def _from_flags(data: bytes, flags: int) -> _Stamped:
    return _Stamped(data, flags)


Client = aiomcache.FlagClient[_Stamped]


def parse_memcache_url(url: str) -> list[tuple[str, int]]:
    """The (host, port) list of `memcache://h1:p1,h2:p2` in URL order; the port defaults to 11211."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() != "memcache":
        raise ConfigError(f"config field result_backend: {url!r} is not a memcache://host:port[,host:port] URL")
    rest = rest.split("?", 1)[0].rstrip("/")
    servers: list[tuple[str, int]] = []
    for part in (p.strip() for p in rest.split(",")):
        if not part:
            raise ConfigError(f"config field result_backend: empty server in {url!r}; "
                              "expected memcache://host:port[,host:port]")
        if "/" in part or "@" in part:
            raise ConfigError(f"config field result_backend: {part!r} in {url!r} is not host:port "
                              "(unix sockets and credentials are not supported)")
        if part.startswith("["):  # [ipv6]:port
            host, _, tail = part[1:].partition("]")
            port_text = tail[1:] if tail.startswith(":") else ""
        elif part.count(":") == 1:
            host, _, port_text = part.partition(":")
        else:
            host, port_text = part, ""
        try:
            port = int(port_text) if port_text else DEFAULT_PORT
        except ValueError:
            port = -1
        if not host or not 0 < port < 65536:
            raise ConfigError(f"config field result_backend: bad memcache server {part!r} in {url!r}")
        servers.append((host, port))
    return servers


def pick_server(key: bytes, count: int) -> int:
    """Index of the server for `key` among `count`: gomemcache's ServerList.PickServer."""
    if count == 1:
        return 0
    return zlib.crc32(key) % count


def _derived_key(group_uuid: str, suffix: str) -> bytes:
    """A key of ours next to a group; hashed when it would pass memcached's 250-byte limit."""
    key = f"{group_uuid}:{suffix}".encode()
    if len(key) > _MAX_KEY:
        key = b"machinery:" + hashlib.sha256(key).hexdigest().encode()
    return key


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()


async def _shielded(aw: Awaitable[T]) -> T:
    """Run one client command to its end even if the caller is cancelled.

    aiomcache returns a connection to its pool when a command is cancelled half-way, with the
    reply still unread, and the next command on it would read that reply: letting the command
    finish keeps every pooled connection in step.
    """
    task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(_consume)
        raise


class MemcacheBackend(Backend, ConditionalPending, ResultWakeups):
    """Go-compatible memcache result backend with idempotent group counting and a CAS chord flag."""

    #: connections per server and event loop
    pool_size = 4
    #: how long trigger_chord waits for a Go worker holding the group meta's Lock flag
    lock_wait = 10.0

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.result_backend)
        self.servers = parse_memcache_url(self.url)
        self._clients: PerLoop[list[Client]] = PerLoop()
        self._waiters = Waiters()

    @property
    def waiters(self) -> Waiters:
        return self._waiters

    # --- plumbing --------------------------------------------------------------------------

    def _all_clients(self) -> list[Client]:
        return self._clients.get(lambda: [
            aiomcache.FlagClient(host, port, pool_size=self.pool_size,
                                 get_flag_handler=_from_flags, set_flag_handler=_to_flags)
            for host, port in self.servers
        ])

    def _index(self, key: bytes) -> int:
        return pick_server(key, len(self.servers))

    def _client(self, key: bytes) -> Client:
        return self._all_clients()[self._index(key)]

    def _expiry(self) -> int:
        """Absolute expiry as Go computes it, rounded up so a value lives at least expire_in seconds."""
        return math.ceil(time.time()) + self.expire_in

    async def _call(self, key: bytes, command: Callable[..., Awaitable[T]], *args: Any) -> T:
        """Run one client command (to its end, see _shielded), with failures as BackendError."""
        try:
            return await _shielded(command(*args))
        except (OSError, ClientException, asyncio.IncompleteReadError) as exc:
            host, port = self.servers[self._index(key)]
            raise BackendError(f"memcache backend {host}:{port}: {type(exc).__name__}: {exc}") from exc
        except ValidationException as exc:
            raise BackendError(f"memcache backend: key {key[:60]!r} is not a valid memcache key: {exc}") from exc

    async def _incr(self, key: bytes, client: Client, counter: bytes, step: int) -> int | None:
        """incr, None when the counter does not exist (aiomcache raises for NOT_FOUND)."""
        try:
            return await self._call(key, client.incr, counter, step)
        except BackendError as exc:
            cause = exc.__cause__
            if isinstance(cause, ClientException) and str(cause).endswith("(b'NOT_FOUND')"):
                return None
            raise

    async def _get(self, key: bytes) -> bytes | None:
        """The live value at `key` (None when missing or past its stamped expiry)."""
        value = await self._call(key, self._client(key).get, key)
        return _live(value, time.time())

    async def _get_many(self, keys: Sequence[bytes]) -> dict[bytes, bytes]:
        """The live values of `keys` (missing ones left out): one multi-key get per server and chunk."""
        by_server: dict[int, list[bytes]] = {}
        for key in dict.fromkeys(keys):
            by_server.setdefault(self._index(key), []).append(key)
        clients = self._all_clients()
        parts = [(i, part) for i, keys_i in by_server.items() for part in _chunks(keys_i, _GET_CHUNK)]
        replies = await asyncio.gather(*(self._call(part[0], clients[i].multi_get, *part) for i, part in parts))
        now = time.time()
        found: dict[bytes, bytes] = {}
        for (_, part), values in zip(parts, replies, strict=True):
            for key, value in zip(part, values, strict=True):
                data = _live(value, now)
                if data is not None:
                    found[key] = data
        return found

    async def _add(self, key: bytes, data: bytes, expires: int) -> bool:
        """Store only where nothing live is stored; replaces a value past its stamped expiry."""
        client = self._client(key)
        if await self._call(key, client.add, key, _Stamped(data, expires), expires):
            return True
        value, token = await self._call(key, client.gets, key)
        if value is None or token is None:  # gone in between: try once more
            return await self._call(key, client.add, key, _Stamped(data, expires), expires)
        if _live(value, time.time()) is not None:
            return False
        return await self._call(key, client.cas, key, _Stamped(data, expires), token, expires)

    # --- states ----------------------------------------------------------------------------

    async def set_states(self, states: Sequence[TaskState]) -> None:
        if not states:
            return
        states = await self._merged(states)
        expires = self._expiry()
        await asyncio.gather(*(self._set_state(s, expires) for s in states))
        for s in states:
            if s.is_completed():
                self._waiters.notify(s.task_uuid)

    async def _set_state(self, state: TaskState, expires: int) -> None:
        key = state.task_uuid.encode()
        await self._call(key, self._client(key).set, key, _Stamped(encode_state(state), expires), expires)

    async def _merged(self, states: Sequence[TaskState]) -> Sequence[TaskState]:
        """Fill a missing TaskName / CreatedAt from the stored state (Go's memcache lost them)."""
        wanted = [s for s in states if s.state != PENDING and (not s.task_name or s.created_at is None)]
        if not wanted:
            return states
        stored = await self._get_many([s.task_uuid.encode() for s in wanted])
        if not stored:
            return states
        out = []
        for s in states:
            raw = stored.get(s.task_uuid.encode()) if s.state != PENDING else None
            old = _lenient(raw)
            if old is None:
                out.append(s)
                continue
            out.append(s.filled_from(old))
        return out

    async def set_pending(self, states: Sequence[TaskState]) -> None:
        """PENDING only where no live state is stored (`add`): it never replaces a worker's state."""
        expires = self._expiry()
        await asyncio.gather(*(self._store_pending(s, expires) for s in states))

    async def _store_pending(self, state: TaskState, expires: int) -> None:
        """`add`; when the worker's first state got there first (the send stores PENDING while
        publishing), give it the TaskName and CreatedAt only PENDING carries, with gets/cas."""
        key = state.task_uuid.encode()
        client = self._client(key)
        data = encode_state(state)
        for _ in range(_CAS_TRIES):
            if await self._call(key, client.add, key, _Stamped(data, expires), expires):
                return
            value, token = await self._call(key, client.gets, key)
            if value is None or token is None:  # gone in between: add again
                continue
            raw = _live(value, time.time())
            new = data  # a value past its stamped expiry is replaced
            if raw is not None:
                old = _decode(raw, decode_state)
                if old.task_name and old.created_at is not None:
                    return
                new = encode_state(old.filled_from(state))
            if await self._call(key, client.cas, key, _Stamped(new, expires), token, expires):
                return

    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        found = await self._get_many([u.encode() for u in task_uuids])
        out: list[TaskState | None] = []
        for uuid in task_uuids:
            raw = found.get(uuid.encode())
            out.append(_decode(raw, decode_state) if raw is not None else None)
        return out

    async def purge_state(self, task_uuid: str) -> None:
        key = task_uuid.encode()
        await self._call(key, self._client(key).delete, key)

    # --- groups ----------------------------------------------------------------------------

    def _progress_key(self, group_uuid: str) -> bytes:
        return _derived_key(group_uuid, "progress")

    def _group_client(self, group_uuid: str) -> Client:
        """Our per-group keys live on the server of the group key itself."""
        return self._client(group_uuid.encode())

    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Create the group; an existing live one keeps its progress and chord flag."""
        key = group_uuid.encode()
        expires = self._expiry()
        meta = GroupMeta(group_uuid, list(task_uuids), created_at=gojson.now())
        if await self._add(key, encode_group_meta(meta), expires):
            progress = self._progress_key(group_uuid)  # reset what an expired namesake left
            await self._call(key, self._group_client(group_uuid).set, progress, b"0", expires)

    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        raw = await self._get(group_uuid.encode())
        return _decode(raw, decode_group_meta) if raw is not None else None

    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        client = self._group_client(group_uuid)
        key = group_uuid.encode()
        marker = _derived_key(group_uuid, f"done:{task_uuid}")
        progress = self._progress_key(group_uuid)
        expires = self._expiry()
        if not await self._call(key, client.add, marker, b"1" if failed else b"0", expires):
            raw = await self._call(key, client.get, progress)
            value = _counter(_live(raw, time.time()), progress)
            return GroupProgress(value % FAILED_UNIT, value // FAILED_UNIT, False)
        step = 1 + (FAILED_UNIT if failed else 0)
        value_or_none = await self._incr(key, client, progress, step)
        if value_or_none is None:  # a group made by Go (or evicted) has no counter yet
            await self._call(key, client.add, progress, b"0", expires)
            value_or_none = await self._incr(key, client, progress, step)
            if value_or_none is None:
                raise BackendError(f"memcache backend: group progress {progress!r} vanished while counting")
        return GroupProgress(value_or_none % FAILED_UNIT, value_or_none // FAILED_UNIT, True)

    async def trigger_chord(self, group_uuid: str) -> bool:
        key = group_uuid.encode()
        client = self._client(key)
        deadline = time.monotonic() + self.lock_wait
        while True:
            value, token = await self._call(key, client.gets, key)
            raw = _live(value, time.time())
            if raw is None or token is None:
                return False
            meta = _decode(raw, decode_group_meta)
            if meta.chord_triggered:
                return False
            if meta.lock and time.monotonic() < deadline:  # a Go worker is flipping it: wait, as Go does
                await asyncio.sleep(0.005)
                continue
            meta.chord_triggered = True
            expires = self._expiry()
            if await self._call(key, client.cas, key, _Stamped(encode_group_meta(meta), expires), token, expires):
                return True

    async def purge_group_meta(self, group_uuid: str) -> None:
        """Forget the group and its counter (members' markers expire with the results)."""
        key = group_uuid.encode()
        client = self._client(key)
        await self._call(key, client.delete, key)
        await self._call(key, client.delete, self._progress_key(group_uuid))

    async def close(self) -> None:
        clients = self._clients.pop_current()
        for client in clients or ():
            await client.close()


def _live(value: bytes | _Stamped | None, now: float) -> bytes | None:
    """The bytes of a fetched value, or None when missing or past the expiry stamped in its flags."""
    if value is None or isinstance(value, bytes):
        return value
    return value.data if value.live(now) else None


def _decode(raw: bytes, decoder: Callable[[bytes], T]) -> T:
    try:
        return decoder(raw)
    except DecodeError as exc:
        raise BackendError(f"memcache backend: stored value is not Machinery JSON: {exc}") from exc


def _lenient(raw: bytes | None) -> TaskState | None:
    """The stored state to merge from; an unreadable one is simply replaced."""
    try:
        return decode_state(raw) if raw is not None else None
    except DecodeError:
        return None


def _counter(raw: bytes | None, key: bytes) -> int:
    if raw is None:
        return 0
    try:
        return int(raw.strip() or b"0")
    except ValueError:
        raise BackendError(f"memcache backend: group progress {key!r} holds {raw[:40]!r}, not a counter") from None


def _chunks(items: Sequence[T], size: int) -> Iterable[Sequence[T]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]
