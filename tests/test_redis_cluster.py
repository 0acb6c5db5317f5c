"""Redis Cluster mode on a private 3-master cluster started on free ports for this test run.

Go's key names are kept (they land in different slots); every atomic step touches one slot only:
auxiliary keys carry the `{queue}` / `{group}` hash tag, the delayed move takes three steps through
`{delayed_tasks}:machinery:moving`, and the chord mutex is taken with SET NX PX like redsync.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from machinery.config import Config
from machinery.drivers.redis.backend import RedisBackend
from machinery.drivers.redis.broker import RedisBroker
from machinery.tasks.signature import Signature, encode_signature
from machinery.tasks.state import STARTED, SUCCESS, TaskResult, TaskState
from redis_servers import shared_cluster
from test_redis_backend import count_reads

pytestmark = pytest.mark.redis

GO_ADD = (Path(__file__).parent / "golden" / "signature_add.json").read_bytes()


@pytest.fixture
async def cluster() -> AsyncIterator[tuple[Config, RedisCluster]]:
    url = (await asyncio.to_thread(shared_cluster)).url
    client = RedisCluster.from_url(url.split(",")[0])
    await client.flushall(target_nodes=RedisCluster.PRIMARIES)
    yield Config(broker=url, result_backend=url), client
    await client.aclose()


def sig(i: int, queue: str, eta: datetime | None = None) -> tuple[Signature, bytes]:
    s = Signature("add", [i, i], uuid=f"task_{i:04d}", routing_key=queue, eta=eta, headers={})
    return s, encode_signature(s)


async def test_go_keys_spread_over_slots() -> None:
    slots = {key_slot(k.encode()) for k in ("machinery_tasks", "delayed_tasks", "other_queue", "TriggerChordMutex")}
    assert len(slots) == 4  # so the cluster paths below really cross slots


async def test_publish_fetch_ack_and_state(cluster: tuple[Config, RedisCluster]) -> None:
    cnf, raw = cluster
    producer, consumer = RedisBroker(cnf), RedisBroker(cnf)
    backend = RedisBackend(cnf)
    await raw.rpush("machinery_tasks", GO_ADD)
    s, body = sig(1, "machinery_tasks")
    await producer.publish(s, body, None)
    assert await raw.lrange("machinery_tasks", 0, -1) == [GO_ADD, body]
    got = await consumer.fetch("machinery_tasks", 10, 2.0)
    assert [d.body for d in got] == [GO_ADD, body]
    await consumer.ack(got)
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 0
    await backend.set_state(TaskState("task_0001", STARTED, task_name="add"))
    await backend.set_state(TaskState("task_0001", SUCCESS, results=[TaskResult("int64", 2)]))
    stored = json.loads(await raw.get("task_0001"))
    assert (stored["TaskName"], stored["State"], stored["Results"]) == ("add", "SUCCESS", [{"Type": "int64",
                                                                                          "Value": 2}])
    assert 0 < await raw.ttl("task_0001") <= 3600
    for x in (producer, consumer, backend):
        await x.close()


async def test_delayed_messages_cross_slots_to_their_queues(cluster: tuple[Config, RedisCluster]) -> None:
    cnf, raw = cluster
    broker = RedisBroker(cnf)
    eta = datetime.now(UTC) + timedelta(milliseconds=300)
    eta_ns = int(eta.timestamp() * 1e9)
    items = [sig(i, "machinery_tasks" if i % 2 else "other_queue", eta) for i in range(40)]
    await broker.publish_many([(s, b, eta_ns) for s, b in items])
    assert await raw.zcard("delayed_tasks") == 40
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < 20 and time.monotonic() < deadline:
        got += [d.body for d in await broker.fetch("machinery_tasks", 100, 1.0)]
    other = await broker.fetch("other_queue", 100, 1.0)
    assert sorted(got) == sorted(b for s, b in items if s.routing_key == "machinery_tasks")
    assert sorted(d.body for d in other) == sorted(b for s, b in items if s.routing_key == "other_queue")
    assert await raw.zcard("delayed_tasks") == 0
    assert await raw.zcard("{delayed_tasks}:machinery:moving") == 0
    await broker.close()


async def test_a_crashed_movers_messages_are_moved_again(cluster: tuple[Config, RedisCluster]) -> None:
    cnf, raw = cluster
    broker = RedisBroker(cnf)
    stuck = sig(7, "machinery_tasks")[1]
    await raw.zadd("{delayed_tasks}:machinery:moving", {stuck: int(time.time() * 1000) - 1})  # step 1 then died
    got = await broker.fetch("machinery_tasks", 10, 2.0)
    assert [d.body for d in got] == [stuck]
    assert await raw.zcard("{delayed_tasks}:machinery:moving") == 0
    await broker.close()


async def test_lease_expiry_redelivers(cluster: tuple[Config, RedisCluster]) -> None:
    cnf, _ = cluster
    dead, alive = RedisBroker(cnf), RedisBroker(cnf)
    dead.lease_seconds = alive.lease_seconds = 0.5
    s, body = sig(1, "machinery_tasks")
    await dead.publish(s, body, None)
    assert len(await dead.fetch("machinery_tasks", 10, 1.0)) == 1
    again = await alive.fetch("machinery_tasks", 10, 3.0)
    assert [d.body for d in again] == [body] and again[0].attempts == 2
    await alive.requeue(again, delay=0.2)
    third = await alive.fetch("machinery_tasks", 10, 3.0)
    assert [d.body for d in third] == [body] and third[0].attempts == 3
    await alive.dead_letter(third[0], "poison")
    assert await alive.dead_letters() == [(body, "poison")]
    for x in (dead, alive):
        await x.close()


async def test_chord_trigger_takes_gos_mutex(cluster: tuple[Config, RedisCluster]) -> None:
    cnf, raw = cluster
    backend = RedisBackend(cnf)
    await backend.init_group("group_c", ["a", "b"])
    started = time.monotonic()  # before the SET: the mutex lives at least 0.5 s from here
    await raw.set("TriggerChordMutex", "go-token", px=500)
    assert await backend.trigger_chord("group_c") is True
    assert time.monotonic() - started >= 0.4
    assert not await raw.exists("TriggerChordMutex")  # ours was released
    assert await backend.trigger_chord("group_c") is False
    results = await asyncio.gather(*[RedisBackend(cnf).trigger_chord("group_c") for _ in range(5)])
    assert results == [False] * 5
    await backend.close()


async def test_wait_completed_wakes(cluster: tuple[Config, RedisCluster], monkeypatch: pytest.MonkeyPatch) -> None:
    cnf, _ = cluster
    backend, writer = RedisBackend(cnf), RedisBackend(cnf)
    reads = count_reads(monkeypatch, backend, hide_completed=True)
    waiter = asyncio.create_task(backend.wait_completed("task_w", 10.0))
    await reads.first()  # subscribed (on one node) and read once: a PUBLISH now reaches it
    await writer.set_state(TaskState("task_w", SUCCESS, results=[TaskResult("int64", 1)]))
    state = await waiter
    assert state is not None and state.values() == [1]  # its reads cannot see it: the PUBLISH brought it
    for x in (backend, writer):
        await x.close()
