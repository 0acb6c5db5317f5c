"""Messages built to break a worker: each ends (dead letter with the reason, or FAILURE), none
loops, and the worker goes on running good tasks. On the in-process and the embedded store; the
server-backed drivers share this code path (the worker's one rule) and have their own suites."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from machinery import Config, RetryTaskLater, Server, Signature
from machinery.tasks.signature import decode_signature
from machinery.tasks.state import FAILURE, RETRY, TaskState
from machinery.testing import running_worker
from machinery.workflows import MAX_RETRY_DELAY

DEEP = b"[" * 1000 + b"]" * 1000


@pytest.fixture(params=["memory", "sqlite", "redis"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Server]:
    if request.param == "redis":
        from redis_servers import redis_url, require_redis

        url = redis_url(4)
        require_redis(url)
        import redis

        client = redis.Redis.from_url(url)
        client.flushdb()  # on this run's own server (tests/redis_servers.py)
        client.close()
    else:
        url = "memory://" if request.param == "memory" else f"sqlite:///{tmp_path / 'hostile.sqlite3'}"
    server = Server(Config(broker=url, result_backend=url))
    runs: list[str] = []
    server.__dict__["runs"] = runs

    @server.task
    def add(x: int, y: int) -> int:
        return x + y

    @server.task
    def panic() -> None:
        runs.append("panic")
        raise ValueError("oops")

    @server.task
    def later_forever() -> None:
        runs.append("later_forever")
        raise RetryTaskLater("never", delay=timedelta.max)

    try:
        yield server
    finally:
        server.close()


def publish_raw(server: Server, *bodies: bytes) -> None:
    route = Signature("raw", routing_key=server.cnf.default_queue)
    server.portal.run(server.get_broker().publish_many([(route, body, None) for body in bodies]))


def until(check: Callable[[], bool], timeout: float = 15) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def dead_letters(server: Server) -> list[tuple[bytes, str]]:
    return server.portal.run(server.get_broker().dead_letters())


def state(server: Server, uuid: str) -> TaskState | None:
    return server.portal.run(server.get_backend().get_state(uuid))


@pytest.mark.parametrize("body", [
    b'{"UUID":"task_x","Name":"add","X":' + DEEP + b"}",
    b'{"UUID":"task_h","Name":"add","Headers":{"a":' + DEEP + b"}}",
    b'{"UUID":"task_a","Name":"add","Args":[{"Type":"json","Value":' + DEEP + b"}]}",
    b'{"Name":"add","Args":[{"Type":"int64","Value":1},{"Type":"int64","Value":2}]}',
], ids=["unknown-key", "headers", "arg", "no-uuid"])
def test_a_message_that_cannot_be_taken_is_dead_lettered_once(server: Server, body: bytes) -> None:
    publish_raw(server, body)
    with running_worker(server):
        assert until(lambda: len(dead_letters(server)) == 1)
        assert server.send_task(Signature("add", args=[1, 2])).get(timeout=15) == 3
        time.sleep(0.2)
    (letter, reason), = dead_letters(server)
    assert letter == body
    assert "too deeply" in reason or "no UUID" in reason
    assert server.get_broker().get_pending_tasks() == []
    assert state(server, "") is None  # nothing stored under the empty key


def test_deep_nesting_is_a_decode_error_not_a_crash() -> None:
    from machinery.errors import DecodeError

    with pytest.raises(DecodeError, match="too deeply"):
        decode_signature(b'{"Name":"add","X":' + DEEP + b"}")


@pytest.mark.parametrize("retry_timeout", [4611686018427387904, 100_000_000_000])
def test_a_huge_retry_timeout_waits_a_week_at_most(server: Server, retry_timeout: int) -> None:
    body = (b'{"UUID":"task_huge","Name":"panic","RetryCount":1,"RetryTimeout":%d}' % retry_timeout)
    publish_raw(server, body)
    with running_worker(server):
        assert until(lambda: (s := state(server, "task_huge")) is not None and s.state == RETRY)
        time.sleep(0.3)
    assert server.__dict__["runs"] == ["panic"]  # ran once, then waits: no loop
    (delayed,) = server.get_broker().get_delayed_tasks()
    assert delayed.uuid == "task_huge" and delayed.retry_timeout == MAX_RETRY_DELAY
    assert delayed.eta is not None
    expected = datetime.now(UTC) + timedelta(seconds=MAX_RETRY_DELAY)
    assert abs((delayed.eta - expected).total_seconds()) < 60


def test_a_retry_that_cannot_be_scheduled_ends_in_failure(server: Server) -> None:
    """RetryTaskLater with a delay past the calendar: FAILURE naming the error, no loop."""
    result = server.send_task(Signature("later_forever"))
    with running_worker(server):
        assert until(lambda: (s := state(server, result.signature.uuid)) is not None and s.state == FAILURE)
        time.sleep(0.3)
    final = state(server, result.signature.uuid)
    assert final is not None and "OverflowError" in final.error
    assert server.__dict__["runs"] == ["later_forever"]
    assert server.get_broker().get_pending_tasks() == [] and server.get_broker().get_delayed_tasks() == []


def test_a_chord_member_of_an_unknown_group_fails_its_callback(server: Server) -> None:
    body = (b'{"UUID":"task_m","Name":"add","Args":[{"Type":"int64","Value":5},{"Type":"int64","Value":1}],'
            b'"GroupUUID":"group_none","GroupTaskCount":1,"ChordCallback":{"UUID":"chord_cb","Name":"add"}}')
    publish_raw(server, body)
    with running_worker(server):
        assert until(lambda: state(server, "chord_cb") is not None)
    callback = state(server, "chord_cb")
    assert callback is not None and callback.state == FAILURE
    assert "group_none" in callback.error
    assert server.get_broker().get_pending_tasks() == []


@pytest.mark.amqp
async def test_rabbitmq_twice_the_concurrency_of_bad_messages_does_not_stop_a_worker() -> None:
    """Unsettled messages keep their prefetch slots: eight of them at concurrency 4 once stopped a
    worker for good. Each now ends at once, so the good task behind them runs."""
    import asyncio

    from amqp_support import Admin, make_cnf, require_rabbit

    await require_rabbit()
    cnf = make_cnf()
    async with Admin() as admin:
        admin.track(cnf)
        server = Server(cnf)
        server.register_task("add", lambda x, y: x + y)
        try:
            worker = server.new_worker("w", concurrency=4)
            worker.launch_async()
            try:
                await asyncio.to_thread(until, lambda: server.get_broker().get_pending_tasks() == [])
                bodies = [b'{"UUID":"task_%d","Name":"add","X":%s}' % (i, DEEP) for i in range(8)]
                await asyncio.to_thread(publish_raw, server, *bodies)
                result = await server.asend_task(Signature("add", args=[1, 2]))
                assert await result.aget(timeout=15) == 3
                assert await asyncio.to_thread(until, lambda: len(dead_letters(server)) == 8)
            finally:
                await asyncio.to_thread(worker.quit)
        finally:
            await asyncio.to_thread(server.close)


@pytest.mark.parametrize("store", ["memory", "sqlite"])
def test_a_task_nobody_registered_is_dead_lettered_after_its_hand_backs(
        store: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    url = "memory://" if store == "memory" else f"sqlite:///{tmp_path / 'bounce.sqlite3'}"
    server = Server(Config(broker=url, result_backend=url, unregistered_bounces=2))
    server.register_task("add", lambda x, y: x + y)
    try:
        lost = server.send_task(Signature("nobody_has_it"))
        with caplog.at_level("WARNING", logger="machinery"), running_worker(server):
            assert until(lambda: len(dead_letters(server)) == 1, timeout=20)
            assert server.send_task(Signature("add", args=[1, 2])).get(timeout=15) == 3
        (body, reason), = dead_letters(server)
        assert decode_signature(body).uuid == lost.signature.uuid
        assert "not registered" in reason and "2 hand-backs" in reason
        handed_back = [r for r in caplog.records if "handing it back" in r.getMessage()]
        assert len(handed_back) == 2 and all(lost.signature.uuid in r.getMessage() for r in handed_back)
        assert server.get_broker().get_pending_tasks() == [] and server.get_broker().get_delayed_tasks() == []
    finally:
        server.close()


@pytest.mark.parametrize("store", ["memory", "sqlite", "redis", "amqp"])
def test_deliveries_that_share_a_uuid_are_all_acked(store: str, tmp_path: Path) -> None:
    """One Signature sent 30 times keeps the UUID of its first send: 30 messages, one UUID.
    Each run's message must be acked, not only the last of a flush (the others came back after
    their lease and ran again)."""
    from redis_servers import redis_url, require_redis

    if store == "memory":
        cnf = Config(broker="memory://", result_backend="memory://")
    elif store == "sqlite":
        url = f"sqlite:///{tmp_path / 'dup.sqlite3'}"
        cnf = Config(broker=url, result_backend=url, sqlite={"lease_seconds": 1.0})
    elif store == "redis":
        url = redis_url(3)
        require_redis(url)
        cnf = Config(broker=url, result_backend=url, redis={"lease_seconds": 1.0})
    else:
        import asyncio

        from amqp_support import make_cnf, require_rabbit

        asyncio.run(require_rabbit())
        cnf = make_cnf()
    server = Server(cnf)
    runs: list[int] = []
    server.register_task("count", lambda: runs.append(1))
    try:
        sig = Signature("count")
        results = [server.send_task(sig) for _ in range(30)]
        assert len({r.signature.uuid for r in results}) == 1
        with running_worker(server, concurrency=8):
            assert until(lambda: len(runs) >= 30)
            time.sleep(2.5)  # past the lease: an unacked message would be back and run again
        assert len(runs) == 30
        assert server.get_broker().get_pending_tasks() == []
    finally:
        server.close()
