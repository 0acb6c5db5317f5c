"""Worker lifecycle, handlers, concurrency and timeouts (memory driver)."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest

from machinery import Config, MachineryError, Server, Signature, TaskContext, TaskError
from machinery.errors import TimeoutError as MachineryTimeout
from machinery.testing import memory_server, running_worker


def test_quit_right_after_launch_three_times() -> None:
    server = memory_server()
    for _ in range(3):
        worker = server.new_worker("w", 2)
        done = worker.launch_async()
        worker.quit()
        assert done.result(timeout=10) is None
    server.close()


def test_get_timeout_holds_without_worker() -> None:
    server = memory_server()
    res = server.send_task(Signature("nobody", [1]))
    started = time.monotonic()
    with pytest.raises(MachineryTimeout) as info:
        res.get(timeout=0.3)
    assert isinstance(info.value, TimeoutError)
    assert 0.25 <= time.monotonic() - started < 5.0  # not (much) before its timeout, and not stuck after it
    server.close()


async def test_aget_timeout_holds() -> None:
    server = memory_server()
    res = await server.asend_task(Signature("nobody"))
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await res.aget(timeout=0.2)
    assert time.monotonic() - started < 5.0  # bounded by its timeout


def test_handlers_called() -> None:
    server = memory_server()
    seen: dict[str, list[Any]] = {"pre": [], "post": [], "err": [], "consume": []}

    @server.task
    def ok(x: int) -> int:
        return x

    @server.task
    def bad() -> None:
        raise ValueError("nope")

    worker = server.new_worker("w", 4)
    worker.set_pre_task_handler(lambda s: seen["pre"].append(s.name))
    worker.set_post_task_handler(lambda s: seen["post"].append(s.name))
    worker.set_error_handler(lambda e: seen["err"].append(str(e)))

    def pre_consume(w: Any) -> bool:
        seen["consume"].append(w.tag)
        return True

    worker.set_pre_consume_handler(pre_consume)
    done = worker.launch_async()
    assert ok.send(5).get(timeout=10) == 5
    with pytest.raises(TaskError):
        bad.send().get(timeout=10)
    worker.quit()
    done.result(timeout=10)
    assert seen["pre"] == ["ok", "bad"] and seen["post"] == ["ok", "bad"]
    assert seen["err"] == ["nope"]
    assert seen["consume"] and seen["consume"][0] == "w"
    server.close()


def test_pre_consume_false_pauses_consumption() -> None:
    server = memory_server()

    @server.task
    def ok() -> int:
        return 1

    allow = threading.Event()
    worker = server.new_worker("w", 1)
    worker.set_pre_consume_handler(lambda w: allow.is_set())
    with running_worker_obj(worker):
        res = ok.send()
        with pytest.raises(TimeoutError):
            res.get(timeout=0.5)
        allow.set()
        assert res.get(timeout=5) == 1
    server.close()


class running_worker_obj:
    def __init__(self, worker: Any) -> None:
        self.worker = worker

    def __enter__(self) -> Any:
        self.done = self.worker.launch_async()
        return self.worker

    def __exit__(self, *exc: object) -> None:
        self.worker.quit()
        self.done.result(timeout=10)


@pytest.mark.parametrize("concurrency,expected_max", [(1, 1), (3, 3)])
def test_concurrency_limit(concurrency: int, expected_max: int) -> None:
    server = memory_server()
    lock = threading.Lock()
    state = {"now": 0, "max": 0}

    @server.task
    def slow() -> None:
        with lock:
            state["now"] += 1
            state["max"] = max(state["max"], state["now"])
        time.sleep(0.05)
        with lock:
            state["now"] -= 1

    with running_worker(server, concurrency=concurrency):
        results = server.send_tasks([Signature("slow") for _ in range(12)])
        for r in results:
            r.get(timeout=20)
    assert state["max"] == expected_max
    server.close()


def test_a_task_waiting_for_a_slot_is_received_then_started() -> None:
    """RECEIVED is stored while a fetched task waits for a slot; one that gets a slot at once
    goes straight to STARTED (its RECEIVED would be replaced before any write)."""
    server = memory_server()
    release = threading.Event()

    @server.task
    def hold(name: str) -> str:
        release.wait(10)
        return name

    with running_worker(server, concurrency=1):
        first = server.send_task(Signature("hold", ["a"]))
        second = server.send_task(Signature("hold", ["b"]))
        deadline = time.monotonic() + 10
        while (first.get_state().state, second.get_state().state) != ("STARTED", "RECEIVED"):
            assert time.monotonic() < deadline, (first.get_state().state, second.get_state().state)
            time.sleep(0.01)
        release.set()
        assert (first.get(timeout=10), second.get(timeout=10)) == ("a", "b")
    server.close()


def test_concurrency_zero_is_unlimited_for_async_tasks() -> None:
    server = memory_server()
    running = {"now": 0, "max": 0}

    @server.task
    async def wait() -> None:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        await asyncio.sleep(0.2)
        running["now"] -= 1

    with running_worker(server, concurrency=0):
        results = server.send_tasks([Signature("wait") for _ in range(200)])
        for r in results:
            r.get(timeout=20)
    assert running["max"] == 200
    server.close()


def test_task_context() -> None:
    server = memory_server()

    @server.task
    def whoami(ctx: TaskContext, x: int) -> tuple[str, str, int, int]:
        return ctx.signature.uuid, ctx.worker_name, ctx.attempts, x

    with running_worker(server):
        res = whoami.send(7)
        uuid, worker_name, attempts, x = res.get(timeout=10)
    assert uuid == res.signature.uuid and worker_name == "test-worker" and attempts == 1 and x == 7
    server.close()


def test_custom_queue_worker_only_sees_its_queue() -> None:
    server = memory_server()

    @server.task
    def where(tag: str) -> str:
        return tag

    with running_worker(server, queue="special"):
        special = server.send_task(Signature("where", ["special"], routing_key="special"))
        default = server.send_task(Signature("where", ["default"]))
        assert special.get(timeout=10) == "special"
        with pytest.raises(TimeoutError):
            default.get(timeout=0.5)
    server.close()


def test_two_servers_share_queue_unknown_tasks_requeued() -> None:
    """Machinery's TestWorkerOnlyConsumesRegisteredTask: each server has one of the two tasks."""
    base = memory_server()
    broker, backend = base.get_broker(), base.get_backend()
    s1 = Server(base.cnf, broker=broker, backend=backend)
    s2 = Server(base.cnf, broker=broker, backend=backend)
    s1.register_task("add", lambda *a: sum(a))

    def multiply(*args: int) -> int:
        out = 1
        for a in args:
            out *= a
        return out

    s2.register_task("multiply", multiply)
    with running_worker(s1), running_worker(s2):
        from machinery import Group

        results = s1.send_group(Group(Signature("multiply", [4, 5]), Signature("add", [2, 3])))
        assert sorted(r.get(timeout=20) for r in results) == [5, 20]


def test_bad_concurrency_rejected() -> None:
    server = memory_server()
    with pytest.raises(MachineryError, match="concurrency"):
        server.new_worker("w", -1)


def test_launch_inside_event_loop_refused() -> None:
    server = memory_server()
    worker = server.new_worker("w", 1)

    async def inner() -> None:
        worker.launch()

    with pytest.raises(MachineryError, match="alaunch"):
        asyncio.run(inner())


async def test_alaunch_and_aquit() -> None:
    server = memory_server()

    @server.task
    async def double(x: int) -> int:
        return 2 * x

    worker = server.new_worker("w", 5)
    task = asyncio.create_task(worker.alaunch())
    res = await double.asend(21)
    assert await res.aget(timeout=5) == 42
    await worker.aquit()
    await asyncio.wait_for(task, 5)


def test_config_errors_at_construction() -> None:
    from machinery.errors import ConfigError, UnknownSchemeError

    with pytest.raises(UnknownSchemeError, match="known schemes"):
        Server(Config(broker="kafka://localhost"))
    with pytest.raises(ConfigError, match="result_backend"):
        Server(Config(result_backend="localhost:6379"))
