"""Memcache backend beyond the contract suite: URL, Go's key layout and server pick, Go-written
values, cancellation safety, Go's chord Lock flag, and a worker end to end (SQLite broker)."""

from __future__ import annotations

import asyncio
import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path

import aiomcache
import pytest

from backend_e2e import check_task_and_chord, worker_server
from machinery import Config, Server
from machinery.drivers.memcache.backend import MemcacheBackend, parse_memcache_url, pick_server
from machinery.drivers.registry import make_backend
from machinery.errors import BackendError, ConfigError
from machinery.tasks.state import GroupMeta, TaskResult, TaskState, encode_group_meta, encode_state
from memcached_servers import memcache_url

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
async def backend() -> AsyncIterator[MemcacheBackend]:
    b = MemcacheBackend(Config(result_backend="memory"), await asyncio.to_thread(memcache_url, 2))
    yield b
    await b.close()


async def _ignore_flags(data: bytes, flags: int) -> bytes:
    return data


def _raw(host: str, port: int) -> aiomcache.FlagClient[bytes]:
    """A plain client on one server that, like Go's gomemcache, ignores client flags."""
    return aiomcache.FlagClient(host, port, pool_size=1, get_flag_handler=_ignore_flags)


def test_url_forms() -> None:
    assert parse_memcache_url("memcache://127.0.0.1:11211") == [("127.0.0.1", 11211)]
    assert parse_memcache_url("memcache://a:1,b:2") == [("a", 1), ("b", 2)]
    assert parse_memcache_url("memcache://cache") == [("cache", 11211)]
    assert parse_memcache_url("memcache://[::1]:7000") == [("::1", 7000)]
    for bad in ("memcache://", "memcache://a:1,,b:2", "memcache://a:port", "memcache://a:99999",
                "memcache://u:p@a:1", "memcache:///tmp/mc.sock"):
        with pytest.raises(ConfigError, match="result_backend"):
            parse_memcache_url(bad)


def test_registry_makes_it() -> None:
    backend = make_backend(Config(result_backend="memcache://127.0.0.1:1,127.0.0.1:2"))
    assert isinstance(backend, MemcacheBackend)
    assert backend.servers == [("127.0.0.1", 1), ("127.0.0.1", 2)]


def test_pick_server_is_gomemcache_crc32() -> None:
    assert zlib.crc32(b"foo") == 0x8C736521  # the IEEE polynomial, as Go's crc32.ChecksumIEEE
    assert pick_server(b"foo", 3) == 0x8C736521 % 3 == 2
    assert pick_server(b"foo", 1) == 0


async def test_keys_values_and_server_as_go(backend: MemcacheBackend) -> None:
    """The task key holds exactly Go's TaskState JSON, on the server gomemcache would pick."""
    servers = backend.servers
    assert len(servers) == 2
    states = [TaskState(f"task_{uuid.uuid4()}", "SUCCESS", task_name="add", results=[TaskResult("int64", 2)])
              for _ in range(8)]
    await backend.set_states(states)
    clients = [_raw(h, p) for h, p in servers]
    try:
        for s in states:
            key = s.task_uuid.encode()
            home = zlib.crc32(key) % 2
            assert await clients[home].get(key) == encode_state(s)
            assert await clients[1 - home].get(key) is None
    finally:
        for c in clients:
            await c.close()


async def test_reads_go_written_values(backend: MemcacheBackend) -> None:
    """Values Go wrote (client flags 0, no expiry stamp) read back; so does a Go group meta."""
    task, group = f"task_{uuid.uuid4()}", f"group_{uuid.uuid4()}"
    go_state = (GOLDEN / "state_success.json").read_bytes().strip().replace(b"task_0c1f", task.encode())
    go_meta = encode_group_meta(GroupMeta(group, [task]))
    for key, value in ((task, go_state), (group, go_meta)):
        host, port = backend.servers[pick_server(key.encode(), 2)]
        client = _raw(host, port)
        try:
            assert await client.set(key.encode(), value, 0)
        finally:
            await client.close()
    state = await backend.get_state(task)
    assert state is not None and state.values() == [2] and state.task_name == "add"
    # Go's InitGroup made no progress counter: counting still works, and the chord fires once
    assert (await backend.group_member_done(group, task, 1, False)).done == 1
    assert await backend.trigger_chord(group) is True
    assert await backend.trigger_chord(group) is False


async def test_later_states_keep_name_and_created_at(backend: MemcacheBackend) -> None:
    """Go's memcache backend lost TaskName/CreatedAt on later states; here they are kept."""
    task = f"task_{uuid.uuid4()}"
    await backend.set_pending([TaskState(task, "PENDING", task_name="add", created_at=datetime.now(UTC))])
    pending = await backend.get_state(task)
    await backend.set_states([TaskState(task, "STARTED")])
    started = await backend.get_state(task)
    assert pending is not None and started is not None
    assert started.state == "STARTED" and started.task_name == "add" and started.created_at == pending.created_at


async def test_pending_after_the_workers_first_state(backend: MemcacheBackend) -> None:
    """A send stores PENDING while publishing: when RECEIVED got there first, PENDING only adds CreatedAt."""
    task = f"task_{uuid.uuid4()}"
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    await backend.set_states([TaskState(task, "RECEIVED", task_name="t")])
    await backend.set_pending([TaskState(task, "PENDING", task_name="t", created_at=created)])
    got = await backend.get_state(task)
    assert got is not None and got.state == "RECEIVED" and got.created_at == created


async def test_cancelled_calls_leave_connections_in_step(backend: MemcacheBackend) -> None:
    """aiomcache pools a connection cancelled mid-command; the backend lets commands finish."""
    a = TaskState(f"task_{uuid.uuid4()}", "SUCCESS", results=[TaskResult("string", "a")])
    b = TaskState(f"task_{uuid.uuid4()}", "SUCCESS", results=[TaskResult("string", "b")])
    await backend.set_states([a, b])
    for _ in range(30):
        reads = [asyncio.create_task(backend.get_state(a.task_uuid)) for _ in range(6)]
        await asyncio.sleep(0)
        for r in reads:
            r.cancel()
        assert await backend.get_states([b.task_uuid, a.task_uuid]) == [b, a]


async def test_trigger_chord_waits_for_go_lock(backend: MemcacheBackend) -> None:
    """While a Go worker holds the meta's Lock flag, trigger_chord waits and then sees its result."""
    group = f"group_{uuid.uuid4()}"
    key = group.encode()
    host, port = backend.servers[pick_server(key, 2)]
    client = _raw(host, port)
    try:
        await client.set(key, encode_group_meta(GroupMeta(group, ["t"], lock=True)), 0)
        trigger = asyncio.create_task(backend.trigger_chord(group))
        await asyncio.sleep(0.1)
        assert not trigger.done()
        await client.set(key, encode_group_meta(GroupMeta(group, ["t"], chord_triggered=True)), 0)
        assert await asyncio.wait_for(trigger, 5) is False
    finally:
        await client.close()


async def test_unreachable_server_is_a_backend_error() -> None:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    backend = MemcacheBackend(Config(result_backend="memory"), f"memcache://127.0.0.1:{port}")
    with pytest.raises(BackendError, match=f"127.0.0.1:{port}"):
        await backend.get_state("task_x")
    await backend.close()


# --- end to end ------------------------------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    url = memcache_url(2)
    cnf = Config(broker=f"sqlite:///{tmp_path / 'broker.sqlite3'}", result_backend=url)
    with worker_server(cnf, "memcache_worker") as server:
        yield server


def test_worker_end_to_end(server: Server) -> None:
    check_task_and_chord(server)
