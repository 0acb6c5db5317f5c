"""Fault tests on private Redis servers: a restart under a consuming loop, a SIGKILLed worker.

Each test starts its own redis-server (AOF with fsync always, so a SIGKILL loses no write) on a
free port, so killing it disturbs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from machinery import AsyncResult, Config, Server, Signature
from machinery.drivers.redis.broker import RedisBroker
from machinery.tasks.signature import encode_signature
from redis_servers import PrivateRedis

pytestmark = [pytest.mark.redis, pytest.mark.slow]

AOF = ("--appendonly", "yes", "--appendfsync", "always")


async def test_consumer_reconnects_after_a_redis_restart(tmp_path: Path) -> None:
    server = PrivateRedis(tmp_path / "redis", *AOF).start()
    cnf = Config(broker=server.url, result_backend=server.url)
    broker = RedisBroker(cnf)
    broker.lease_seconds = 2.0
    seen: set[bytes] = set()
    errors: list[BaseException] = []
    stop = asyncio.Event()
    progress = asyncio.Event()
    want: set[bytes] = set()

    async def consume() -> None:
        while not stop.is_set():
            try:
                got = await broker.fetch("machinery_tasks", 10, 0.5)
                await asyncio.sleep(0.005)  # "work", so the restart lands mid-stream
                seen.update(d.body for d in got)
                await broker.ack(got)
            except Exception as exc:  # what the worker does: log, back off, carry on
                errors.append(exc)
                await asyncio.sleep(0.1)
            if len(seen) >= 150 and (not want or want <= seen):
                progress.set()

    def body(i: int) -> bytes:
        return encode_signature(Signature("add", [i], uuid=f"task_{i}", routing_key="machinery_tasks"))

    route = Signature("add", routing_key="machinery_tasks")
    before = [body(i) for i in range(1000)]
    await broker.publish_many([(route, b, None) for b in before])
    consumer = asyncio.create_task(consume())
    try:
        await asyncio.wait_for(progress.wait(), 30)
        server.kill()  # SIGKILL while the loop is fetching and holding claims
        seen_at_kill = len(seen)
        await asyncio.sleep(0.5)
        server.start()  # same port and AOF: the queue, claims and leases are back
        after = [body(i) for i in range(1000, 1200)]
        await broker.publish_many([(route, b, None) for b in after])  # through reconnected clients
        want.update(before + after)
        progress.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(progress.wait(), 30)
        missing = want - seen
        assert not missing, f"{len(missing)} messages never delivered after the restart ({errors[:3]})"
        assert seen_at_kill < len(before), "the restart should land while messages are still queued"
    finally:
        stop.set()
        await consumer
        await broker.close()
        server.kill()


WORKER_APP = textwrap.dedent("""
    import sys, time
    from machinery import Config, Server

    url = sys.argv[1]
    server = Server(Config(broker=url, result_backend=url, default_queue="fault_queue"))
    server.get_broker().lease_seconds = 2.0  # a SIGKILLed worker's tasks come back after 2 s

    def slow(i: int) -> int:
        time.sleep(0.02)
        return i * 2

    server.register_task("slow", slow)
    server.new_worker("fault-worker", 20).launch()
""")


class FaultRig:
    """A private append-only Redis, a producer Server on it, and worker processes running WORKER_APP."""

    def __init__(self, tmp_path: Path) -> None:
        self.redis = PrivateRedis(tmp_path / "redis", *AOF).start()
        self.app = tmp_path / "worker_app.py"
        self.app.write_text(WORKER_APP)
        self.env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent.parent / "src"),
                                                                 os.environ.get("PYTHONPATH", "")]))
        url = self.redis.url
        self.server = Server(Config(broker=url, result_backend=url, default_queue="fault_queue"))
        self.workers: list[subprocess.Popen[bytes]] = []

    def start_worker(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, str(self.app), self.redis.url], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.workers.append(proc)
        return proc

    def done(self, results: list[AsyncResult]) -> int:
        backend = self.server.get_backend()
        states = self.server.portal.run(backend.get_states([r.signature.uuid for r in results]))
        return sum(1 for s in states if s is not None and s.is_success())

    def wait_done(self, results: list[AsyncResult], count: int) -> None:
        deadline = time.monotonic() + 60
        while self.done(results) < count and time.monotonic() < deadline:
            time.sleep(0.02)

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(10)
        self.server.close()
        self.redis.kill()


def test_sigkilled_worker_loses_no_task(tmp_path: Path) -> None:
    rig = FaultRig(tmp_path)
    server = rig.server
    try:
        results = [server.send_task(Signature("slow", [i])) for i in range(400)]
        first = rig.start_worker()
        rig.wait_done(results, 60)
        inflight = server.portal.run(server.get_broker().inflight("fault_queue"))  # type: ignore[attr-defined]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        assert inflight, "the kill should land while the worker holds claimed tasks"
        assert rig.done(results) < 400
        rig.start_worker()
        values = [r.get(timeout=60) for r in results]
        assert values == [i * 2 for i in range(400)]
        assert server.get_broker().get_pending_tasks() == []
        assert server.portal.run(server.get_broker().inflight("fault_queue")) == []  # type: ignore[attr-defined]
    finally:
        rig.close()


def test_worker_carries_on_after_a_redis_restart(tmp_path: Path) -> None:
    """Restart the (append-only) Redis under a running worker: it reconnects and every task completes."""
    rig = FaultRig(tmp_path)
    try:
        worker = rig.start_worker()
        results = [rig.server.send_task(Signature("slow", [i])) for i in range(300)]
        rig.wait_done(results, 50)
        assert rig.done(results) < 300, "the restart should land mid-run"
        rig.redis.kill()  # SIGKILL: with appendfsync always nothing acknowledged is lost
        time.sleep(1.0)
        rig.redis.start()
        assert worker.poll() is None, "the worker must survive the outage"
        values = [r.get(timeout=90) for r in results]
        assert values == [i * 2 for i in range(300)]
    finally:
        rig.close()
