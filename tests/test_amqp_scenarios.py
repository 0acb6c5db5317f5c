"""Go Machinery's integration scenarios (spec section 13) on RabbitMQ: AMQP+AMQP, AMQP+Redis, AMQP+SQLite,
plus a SIGKILLed worker, pending tasks, and two servers with different tasks on one queue."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from amqp_support import AMQP_URL, Admin, make_cnf, unavailable
from machinery import Config, Group, Server, Signature
from redis_servers import redis_url
from scenarios import TIMEOUT, ScenarioSuite, custom_queue_worker
from victims import kill_victim_then_rescue

pytestmark = pytest.mark.amqp



def _reachable(host: str, port: int) -> bool:
    try:
        socket.create_connection((host, port), 2).close()
        return True
    except OSError:
        return False


def _require(host: str, port: int, what: str) -> None:
    if not _reachable(host, port):
        unavailable(f"{what} is not reachable on {host}:{port}")


def _cleanup(cnf: Config, *queues: str) -> None:
    async def run() -> None:
        async with Admin(AMQP_URL) as admin:
            admin.track(cnf, *queues)

    asyncio.run(run())


class _AMQPSuite(ScenarioSuite):
    """Each test gets its own exchange and queues, deleted afterwards."""

    cnf: Config

    @pytest.fixture(autouse=True)
    def _isolated(self) -> Iterator[None]:
        _require("127.0.0.1", 5672, "RabbitMQ")
        self.cnf = make_cnf(prefetch_count=1)
        yield
        _cleanup(self.cnf)


class TestAMQPAMQPScenarios(_AMQPSuite):
    def make_config(self, tmp_path: Path) -> Config:
        return self.cnf


class TestAMQPRedisScenarios(_AMQPSuite):
    def make_config(self, tmp_path: Path) -> Config:
        self.cnf.result_backend = redis_url()
        return self.cnf


class TestAMQPSQLiteScenarios(_AMQPSuite):
    def make_config(self, tmp_path: Path) -> Config:
        self.cnf.result_backend = f"sqlite:///{tmp_path / 'results.sqlite3'}"
        return self.cnf


# --- scenarios beyond testAll ----------------------------------------------------------------


@pytest.fixture
def cnf() -> Iterator[Config]:
    _require("127.0.0.1", 5672, "RabbitMQ")
    cnf = make_cnf(prefetch_count=3)
    yield cnf
    _cleanup(cnf)


def test_get_pending_tasks_in_order_then_drained(cnf: Config) -> None:
    """Go's TestAmqpGetPendingTasks: three tasks sent with no worker are pending, in order."""
    server = Server(cnf)
    sigs = [Signature("add", [1, 2]), Signature("add", [3, 5]), Signature("add", [6, 7])]
    results = [server.send_task(s) for s in sigs]
    pending = server.get_broker().get_pending_tasks()
    assert [p.uuid for p in pending] == [s.uuid for s in sigs]
    assert [len(p.args) for p in pending] == [2, 2, 2]
    assert [p.name for p in pending] == ["add"] * 3

    @server.task
    def add(*args: int) -> int:
        return sum(args)

    worker = server.new_worker("drain", 2)
    done = worker.launch_async()
    try:
        assert [r.get(TIMEOUT) for r in results] == [3, 8, 13]
        assert server.get_broker().get_pending_tasks() == []
    finally:
        worker.quit()
        done.result(timeout=TIMEOUT)
        server.close()


def test_workers_only_consume_registered_tasks(cnf: Config) -> None:
    """Go's TestWorkerOnlyConsumesRegisteredTaskAMQP: two servers, different tasks, one queue."""
    server1, server2 = Server(cnf), Server(cnf)

    @server1.task
    def add(*args: int) -> int:
        return sum(args)

    @server2.task
    def multiply(*args: int) -> int:
        out = 1
        for a in args:
            out *= a
        return out

    w1, w2 = server1.new_worker("w1", 0), server2.new_worker("w2", 0)
    d1, d2 = w1.launch_async(), w2.launch_async()
    try:
        group = Group(Signature("multiply", [4, 5]), Signature("add", [2, 3]))
        results = server1.send_group(group, 0)
        assert sorted(r.get(TIMEOUT) for r in results) == [5, 20]
    finally:
        w1.quit()
        w2.quit()
        d1.result(timeout=TIMEOUT)
        d2.result(timeout=TIMEOUT)
        server1.close()
        server2.close()


def test_custom_queue_worker_does_not_get_default_tasks(cnf: Config) -> None:
    custom = f"{cnf.default_queue}_custom"
    try:
        with custom_queue_worker(cnf, custom) as (server, default_res):
            time.sleep(0.5)
            assert [s.uuid for s in server.get_broker().get_pending_tasks()] == [default_res.signature.uuid]
    finally:
        _cleanup(cnf, custom)


WORKER_APP = r"""
import sys, time
from machinery import Server
from machinery.config import Config

cnf = Config.from_mapping({
    "broker": sys.argv[1], "result_backend": sys.argv[1], "default_queue": sys.argv[2],
    "amqp": {"exchange": sys.argv[3], "binding_key": sys.argv[4]},
})
server = Server(cnf)

@server.task
def slow(i: int) -> int:
    sys.stdout.write(f"started {i}\n")  # one write: tasks run on several threads
    sys.stdout.flush()
    time.sleep(float(sys.argv[5]))
    return i

server.new_worker("victim", int(sys.argv[6])).launch()
"""


def test_sigkilled_worker_loses_no_task(cnf: Config, tmp_path: Path) -> None:
    """Kill -9 a worker in the middle of its tasks: RabbitMQ redelivers them and all complete."""
    app = tmp_path / "victim.py"
    app.write_text(WORKER_APP)
    server = Server(cnf)

    @server.task
    def slow(i: int) -> int:
        return i

    results = [server.send_task(Signature("slow", [i])) for i in range(8)]
    args = [AMQP_URL, cnf.default_queue, cnf.amqp.exchange, cnf.amqp.binding_key, "30", "4"]
    kill_victim_then_rescue(server, results, [str(app), *args])
