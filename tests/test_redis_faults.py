"""Fault tests on private Redis servers: a restart under a consuming loop, a SIGKILLed worker, a
claim whose reply was lost.

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
from machinery.drivers.redis import scripts as lua
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


class ReplyCutter:
    """A TCP proxy in front of Redis. Once armed with a marker, it passes the next request that
    carries it on to Redis, then drops the connection instead of passing the reply back: a command
    that ran but whose reply was lost, as when Redis dies between running a script and answering
    (with appendfsync always, a script's writes reach the AOF before its reply leaves)."""

    def __init__(self, target_port: int, down_after_cut: float = 0.0) -> None:
        self.target_port = target_port
        self.marker: bytes | None = None
        self.cut = 0
        #: seconds after the cut during which new connections are dropped at once (Redis "down")
        self.down_after_cut = down_after_cut
        self._down_until = 0.0
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._handlers: set[asyncio.Task[None] | None] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._down_until:
            writer.close()
            return
        self._handlers.add(asyncio.current_task())
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._open.update((writer, up_writer))
        cutting = asyncio.Event()

        async def to_redis() -> None:
            while data := await reader.read(65536):
                if self.marker is not None and self.marker in data:
                    self.marker = None
                    cutting.set()  # before the request goes: its reply is the one swallowed
                up_writer.write(data)
                await up_writer.drain()

        async def to_client() -> None:
            while data := await up_reader.read(65536):
                if cutting.is_set():
                    self.cut += 1
                    self._down_until = time.monotonic() + self.down_after_cut
                    break
                writer.write(data)
                await writer.drain()

        legs = [asyncio.ensure_future(to_redis()), asyncio.ensure_future(to_client())]
        try:  # either side closing (or the cut) ends both
            await asyncio.wait(legs, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for leg in legs:
                leg.cancel()
            await asyncio.gather(*legs, return_exceptions=True)
            writer.close()
            up_writer.close()

    async def close(self) -> None:
        """Stop listening and close every connection; the handlers end on their own."""
        if self._server is not None:
            self._server.close()
        for w in self._open:
            w.close()
        await asyncio.gather(*(h for h in self._handlers if h is not None), return_exceptions=True)


@pytest.mark.parametrize("down", [0.0, 3.0], ids=["retried-by-the-client", "retried-by-the-next-claim"])
async def test_a_claim_whose_reply_was_lost_is_handed_out_again(tmp_path: Path, down: float) -> None:
    """The claim ran on Redis (its messages are in the in-flight hash) but its reply never came:
    the broker asks again, and gets those very messages, instead of leaving them claimed by nobody
    until their lease runs out (30 s by default) and claiming nothing. Asked again by redis-py's
    own retries (same command), or, when Redis stays away longer than those (3 s here), by the
    fetch's next claim."""
    import redis.asyncio as aioredis

    server = PrivateRedis(tmp_path / "redis").start()
    cutter = ReplyCutter(server.port, down_after_cut=down)
    url = f"redis://127.0.0.1:{await cutter.start()}/0"
    broker = RedisBroker(Config(broker=url, result_backend=url))
    direct = aioredis.Redis(port=server.port)
    route = Signature("add", routing_key="machinery_tasks")
    bodies = [encode_signature(Signature("add", [i], uuid=f"task_{i}")) for i in range(3)]
    try:
        await direct.script_load(lua.CLAIM.src)  # so that the first EVALSHA runs the claim
        await broker.publish_many([(route, b, None) for b in bodies])
        cutter.marker = lua.CLAIM.sha.encode()
        got = await broker.fetch("machinery_tasks", 10, down + 1.0)
        assert cutter.cut == 1, "the claim's reply should have been cut"
        assert sorted(d.body for d in got) == sorted(bodies)
        assert await direct.hlen("{machinery_tasks}:machinery:inflight") == 3  # claimed once each
        await broker.ack(got)
        assert await direct.hlen("{machinery_tasks}:machinery:inflight") == 0
    finally:
        await broker.close()
        await direct.aclose()
        await cutter.close()
        server.kill()
