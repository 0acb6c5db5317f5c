"""The sync facade's direct Redis calls (send one task, read, wait) against real servers: they
never start the portal thread, write what the asyncio path writes, and keep every wait's
deadline even when the server is dead or stalled."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import redis

from machinery import Config, Server, Signature
from machinery.config import RedisConfig
from machinery.drivers.capabilities import BlockingReads
from machinery.drivers.redis.backend import RedisBackend
from machinery.errors import BackendError, BrokerError, TimeoutError
from machinery.tasks.state import PENDING, SUCCESS, TaskResult, TaskState, encode_state
from redis_servers import PrivateRedis, redis_url

pytestmark = pytest.mark.redis

GOLDEN = Path(__file__).parent / "golden"


@pytest.fixture
def raw() -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url())
    client.flushdb()  # this run's own server: no other run has keys there
    yield client
    client.close()


@pytest.fixture
def server(raw: redis.Redis) -> Iterator[Server]:
    s = Server(Config(broker=redis_url(), result_backend=redis_url(), results_expire_in=120))
    yield s
    s.close()


def store_after(url: str, state: TaskState, event: threading.Event) -> threading.Thread:
    """Store `state` from another client once `event` is set, as a worker would (with PUBLISH)."""

    def run() -> None:
        assert event.wait(10), "the wait never read the state"
        writer = Server(Config(broker=url, result_backend=url))
        writer.portal.run(writer.get_backend().set_state(state))
        writer.close()

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.fixture
def no_rereads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waits re-read the state only after a minute: one that returns sooner was woken by a PUBLISH
    (or found the state in its first GET)."""
    from machinery.drivers.redis import waits

    monkeypatch.setattr(waits, "RECHECK_FIRST", 60.0)
    monkeypatch.setattr(waits, "RECHECK_MAX", 60.0)


def test_send_and_wait_never_start_the_portal_thread(
    server: Server, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch, no_rereads: None
) -> None:
    res = server.send_task(Signature("add", args=[1, 2]))
    calls = _count_wait_calls(monkeypatch)
    t = store_after(redis_url(), TaskState(res.task_uuid, SUCCESS, results=[TaskResult("int64", 3)]), calls.read_done)
    assert res.get(timeout=10) == 3  # stored after the wait's only GET, no re-read due: the PUBLISH woke it
    t.join()
    assert calls == {"read": 1, "subscribe": 1}
    assert res.get_state() is not None
    assert server.portal._thread is None, "a sync send or wait went through the portal thread"


def test_blocking_send_writes_what_the_asyncio_send_writes(server: Server, raw: redis.Redis) -> None:
    a = Signature("add", args=[1, 2], uuid="task_a")
    b = Signature("add", args=[1, 2], uuid="task_b")
    server.send_task(a)
    server.portal.run(server.asend_task(b))
    first, second = raw.lrange("machinery_tasks", 0, -1)
    assert json.loads(first) == {**json.loads(second), "UUID": "task_a"}
    pend_a, pend_b = json.loads(raw.get("task_a")), json.loads(raw.get("task_b"))  # type: ignore[arg-type]
    assert pend_a["State"] == PENDING and pend_a["TaskName"] == "add"
    assert {**pend_a, "TaskUUID": "task_b", "CreatedAt": pend_b["CreatedAt"]} == pend_b
    assert 0 < raw.ttl("task_a") <= 120


def test_blocking_send_keeps_a_stored_state(server: Server, raw: redis.Redis) -> None:
    # PENDING is stored only where nothing is (SET NX): a redelivered parent re-sending a child
    # that already ran must not turn its result back into PENDING.
    done = encode_state(TaskState("task_done", SUCCESS, results=[TaskResult("int64", 3)]))
    raw.set("task_done", done)
    server.send_task(Signature("add", args=[1, 2], uuid="task_done"))
    assert raw.get("task_done") == done
    assert raw.llen("machinery_tasks") == 1


def test_a_delayed_task_goes_to_the_delayed_set(server: Server, raw: redis.Redis) -> None:
    eta = datetime.now(UTC) + timedelta(hours=1)
    res = server.send_task(Signature("add", args=[1, 2], eta=eta))
    assert raw.llen("machinery_tasks") == 0
    assert raw.zcard("delayed_tasks") == 1
    assert json.loads(raw.get(res.task_uuid))["State"] == PENDING  # type: ignore[arg-type]


def test_a_wait_reads_a_state_stored_before_it(
    server: Server, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch, no_rereads: None
) -> None:
    raw.set("task_early", encode_state(TaskState("task_early", SUCCESS, results=[TaskResult("int64", 5)])))
    res = server.send_task(Signature("add", args=[2, 3], uuid="task_early"))
    calls = _count_wait_calls(monkeypatch)
    assert res.get(timeout=5) == 5  # nothing was published: the GET after the SUBSCRIBE found it
    assert calls == {"read": 1, "subscribe": 1}


def test_a_wait_sees_a_state_go_stored_without_publishing(
    server: Server, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    task = "task_0c1f"
    res = server.send_task(Signature("add", args=[1, 2], uuid=task))
    golden = (GOLDEN / "state_success.json").read_bytes()
    calls = _count_wait_calls(monkeypatch)

    def go_writes() -> None:
        assert calls.read_done.wait(10), "the wait never read the state"
        raw.set(task, golden)  # no PUBLISH, as Go stores it

    t = threading.Thread(target=go_writes)
    t.start()
    state = res.wait_state(timeout=10)
    t.join()
    assert state.is_success()
    assert calls["read"] >= 2  # stored after the first GET and never published: a re-read found it


def test_a_wait_times_out_on_time(server: Server, raw: redis.Redis) -> None:
    res = server.send_task(Signature("add", args=[1, 2]))
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=res.task_uuid):
        res.get(timeout=0.3)
    assert 0.3 <= time.monotonic() - started < 5.0  # not before its timeout, and not stuck after it


def test_waits_on_many_threads_each_get_their_own_result(server: Server, raw: redis.Redis) -> None:
    results = [server.send_task(Signature("add", args=[i, 0])) for i in range(20)]
    got: dict[int, object] = {}

    def wait(i: int) -> None:
        got[i] = results[i].get(timeout=10)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(20)]
    for t in threads:
        t.start()
    time.sleep(0.3)
    backend = server.get_backend()
    server.portal.run(backend.set_states(
        [TaskState(r.task_uuid, SUCCESS, results=[TaskResult("int64", i)]) for i, r in enumerate(results)]))
    for t in threads:
        t.join(10)
    assert got == {i: i for i in range(20)}


def test_one_thread_reuses_its_wait_connections(server: Server, raw: redis.Redis) -> None:
    backend = server.get_backend()
    before = len(raw.client_list())
    for i in range(30):
        task = f"task_{i % 3}"  # the same channels again, right after their unsubscribe
        raw.delete(task)
        res = server.send_task(Signature("add", args=[i, 0], uuid=task))
        state = TaskState(task, SUCCESS, results=[TaskResult("int64", i)])
        store = threading.Timer(0.02, lambda s=state: server.portal.run(backend.set_state(s)))
        store.start()
        assert res.get(timeout=5) == i
        store.join()
    # this thread's two wait connections, one of the shared pool and the portal's (its
    # client and the storing thread's) are all that opened
    assert len(raw.client_list()) - before <= 5


def test_a_wait_unsubscribes_the_previous_waits_channel_and_skips_its_messages(
    server: Server, raw: redis.Redis
) -> None:
    """A finished wait stays subscribed until the thread's next wait, which unsubscribes in the
    write of its own SUBSCRIBE; a message published meanwhile on the old channel is skipped."""
    backend = server.get_backend()
    first = server.send_task(Signature("add", args=[1, 0], uuid="task_first"))
    server.portal.run(backend.set_state(TaskState("task_first", SUCCESS, results=[TaskResult("int64", 1)])))
    assert first.get(timeout=5) == 1
    old, new = b"machinery:done:task_first", b"machinery:done:task_second"
    assert dict(raw.pubsub_numsub(old)) == {old: 1}  # left subscribed: no write after the result
    # the first task's state is stored (and published) again while nobody waits for it
    server.portal.run(backend.set_state(TaskState("task_first", SUCCESS, results=[TaskResult("int64", 99)])))
    second = server.send_task(Signature("add", args=[2, 0], uuid="task_second"))
    store = threading.Timer(0.1, lambda: server.portal.run(
        backend.set_state(TaskState("task_second", SUCCESS, results=[TaskResult("int64", 2)]))))
    store.start()
    assert second.get(timeout=5) == 2
    store.join()
    assert dict(raw.pubsub_numsub(old, new)) == {old: 0, new: 1}


def test_a_wait_on_a_dead_server_keeps_its_deadline(tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path / "r").start()
    srv = Server(Config(broker=redis_server.url, result_backend=redis_server.url))
    try:
        res = srv.send_task(Signature("add", args=[1, 2]))
        redis_server.kill()
        started = time.monotonic()
        with pytest.raises(BackendError, match="redis backend"):
            res.get(timeout=0.5)
        assert time.monotonic() - started < 5.0  # bounded by its timeout, not by reconnect attempts
    finally:
        redis_server.kill()
        srv.close()


def test_a_wait_on_a_stalled_server_keeps_its_deadline(tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path / "r").start()
    srv = Server(Config(broker=redis_server.url, result_backend=redis_server.url))
    assert redis_server.proc is not None
    try:
        srv.send_task(Signature("add", args=[1, 2]))
        with pytest.raises(TimeoutError):  # opens this thread's wait connections
            srv.send_task(Signature("add", args=[1, 2])).get(timeout=0.05)
        res = srv.send_task(Signature("add", args=[1, 2]))
        os.kill(redis_server.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            res.get(timeout=0.5)
        assert time.monotonic() - started < 5.0  # bounded by its timeout, not by the stalled socket
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
        redis_server.kill()
        srv.close()


def test_a_wait_outlives_a_server_restart(tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path / "r").start()
    url = redis_server.url
    srv = Server(Config(broker=url, result_backend=url))
    try:
        res = srv.send_task(Signature("add", args=[1, 2]))
        got: list[object] = []
        waiter = threading.Thread(target=lambda: got.append(res.get(timeout=20)))
        waiter.start()
        time.sleep(0.3)
        redis_server.kill()
        time.sleep(0.5)
        redis_server.start()  # same port, empty (no persistence)
        writer = redis.Redis.from_url(url)
        writer.set(res.task_uuid, encode_state(TaskState(res.task_uuid, SUCCESS, results=[TaskResult("int64", 3)])))
        writer.close()
        waiter.join(20)
        assert got == [3]
    finally:
        redis_server.kill()
        srv.close()


def test_cluster_and_sentinel_take_the_asyncio_path() -> None:
    cluster = RedisBackend(Config(broker="redis://a:1,b:2", result_backend="redis://a:1,b:2"))
    assert cluster.capability(BlockingReads) is None
    sentinel = Config(broker="redis://a:1", result_backend="redis://a:1", redis=RedisConfig(master_name="mymaster"))
    assert RedisBackend(sentinel).capability(BlockingReads) is None


def test_without_a_result_backend_a_send_is_one_rpush_in_the_callers_thread(raw: redis.Redis) -> None:
    srv = Server(Config(broker=redis_url(), result_backend="null://"))
    try:
        srv.send_task(Signature("add", args=[1, 2], uuid="task_a"))
        assert srv.portal._thread is None
        srv.portal.run(srv.asend_task(Signature("add", args=[1, 2], uuid="task_b")))
        eta = datetime.now(UTC) + timedelta(hours=1)
        srv.send_task(Signature("add", args=[1, 2], uuid="task_c", eta=eta))  # delayed: the asyncio path
    finally:
        srv.close()
    first, second = raw.lrange("machinery_tasks", 0, -1)
    assert json.loads(first) == {**json.loads(second), "UUID": "task_a"}
    assert raw.zcard("delayed_tasks") == 1
    assert raw.get("task_a") is None


def test_a_blocking_send_to_a_dead_server_is_a_clear_error(tmp_path: Path) -> None:
    redis_server = PrivateRedis(tmp_path / "r").start()
    url = redis_server.url
    redis_server.kill()
    for results in (url, "null://"):
        srv = Server(Config(broker=url, result_backend=results, redis=RedisConfig(connect_timeout=1)))
        try:
            with pytest.raises((BackendError, BrokerError), match=r"redis (backend|broker)"):
                srv.send_task(Signature("add", args=[1, 2]))
        finally:
            srv.close()


def test_a_blocking_wait_on_the_portals_own_thread_is_refused(server: Server, raw: redis.Redis) -> None:
    res = server.send_task(Signature("add", args=[1, 2]))

    async def inside() -> object:
        return res.get(timeout=1)  # would stall every other call on the portal for its wait

    with pytest.raises(RuntimeError, match="own event-loop thread"):
        server.portal.run(inside())


class WaitCalls(dict[str, int]):
    """Counts of the wait connections' GETs and SUBSCRIBE writes; `read_done` is set after a GET."""

    def __init__(self) -> None:
        super().__init__(read=0, subscribe=0)
        self.read_done = threading.Event()


def _count_wait_calls(monkeypatch: pytest.MonkeyPatch) -> WaitCalls:
    """Count the GETs and SUBSCRIBE writes the thread's wait connections make."""
    from machinery.drivers.redis import blocking as _redis_blocking

    calls = WaitCalls()
    sub_cls = _redis_blocking._Subscriber
    for name in list(calls):
        original = getattr(sub_cls, name)

        def counted(self: object, *args: object, _name: str = name, _original: object = original) -> object:
            calls[_name] += 1
            try:
                return _original(self, *args)  # type: ignore[operator]
            finally:
                if _name == "read":
                    calls.read_done.set()

        monkeypatch.setattr(sub_cls, name, counted)
    return calls


def _store(server: Server, task_uuid: str, value: int) -> None:
    """Store SUCCESS (and publish it) from another client, as a worker does."""
    state = TaskState(task_uuid, SUCCESS, results=[TaskResult("int64", value)])
    server.portal.run(server.get_backend().set_state(state))


def test_send_and_wait_subscribes_with_the_send_and_its_wait_only_reads_the_publish(
    server: Server, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch, no_rereads: None
) -> None:
    """A thread that waits for what it sent subscribes with its next send, before the task goes
    out: a result stored before the wait even starts comes by the PUBLISH, with no GET."""
    calls = _count_wait_calls(monkeypatch)
    first = server.send_task(Signature("add", args=[0, 0], uuid="task_0"))
    _store(server, "task_0", 0)
    assert first.get(timeout=5) == 0  # the first wait: SUBSCRIBE, then GET
    assert calls == {"read": 1, "subscribe": 1}
    for i in range(1, 6):
        res = server.send_task(Signature("add", args=[i, 0], uuid=f"task_{i}"))
        assert dict(raw.pubsub_numsub(f"machinery:done:task_{i}")) == {f"machinery:done:task_{i}".encode(): 1}
        _store(server, f"task_{i}", i)  # done before the wait starts: only the PUBLISH tells it
        assert res.get(timeout=5) == i  # no GET and no re-read due: the PUBLISH it was subscribed to
    assert calls == {"read": 1, "subscribe": 6}  # one SUBSCRIBE per send, written by the send


def test_a_thread_that_sends_without_waiting_does_not_subscribe_ahead(
    server: Server, raw: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _count_wait_calls(monkeypatch)
    first = server.send_task(Signature("add", args=[0, 0], uuid="task_0"))
    _store(server, "task_0", 0)
    assert first.get(timeout=5) == 0
    sent = [server.send_task(Signature("add", args=[i, 0], uuid=f"task_{i}")) for i in range(1, 12)]
    channels = [f"machinery:done:task_{i}" for i in range(1, 12)]
    # the first send after a wait is subscribed ahead; the second without a wait disarms the thread
    assert [n for _, n in raw.pubsub_numsub(*channels)] == [1] + [0] * 10
    assert calls["subscribe"] == 2
    # a wait for an earlier task (not the one sent last) does not arm it again
    _store(server, "task_3", 3)
    assert sent[2].get(timeout=5) == 3
    server.send_task(Signature("add", args=[12, 0], uuid="task_12"))
    assert dict(raw.pubsub_numsub("machinery:done:task_12")) == {b"machinery:done:task_12": 0}


def test_a_send_subscribed_ahead_on_a_dropped_connection_still_gets_its_result(
    server: Server, raw: redis.Redis
) -> None:
    """The server closed the thread's wait connections: the subscription made with the send
    did not happen (the send's script saw no subscriber), so the wait subscribes again."""
    first = server.send_task(Signature("add", args=[0, 0], uuid="task_0"))
    _store(server, "task_0", 0)
    assert first.get(timeout=5) == 0
    for client in raw.client_list():
        if client["cmd"] in ("subscribe", "unsubscribe", "get"):
            raw.client_kill_filter(_id=client["id"])
    res = server.send_task(Signature("add", args=[1, 0], uuid="task_1"))
    _store(server, "task_1", 1)
    assert res.get(timeout=5) == 1
