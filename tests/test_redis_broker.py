"""Redis broker on the real server: Go wire interop, leases, reaper, delayed batches, round trips.

Uses db 15 of this run's own Redis (tests/redis_servers.py), flushed before each test.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from machinery.config import Config
from machinery.drivers.redis import scripts as lua
from machinery.drivers.redis.broker import RedisBroker
from machinery.drivers.redis.client import Lane
from machinery.tasks import gojson
from machinery.tasks.signature import Signature, decode_signature, encode_signature
from redis_servers import redis_url

pytestmark = pytest.mark.redis

GOLDEN = Path(__file__).parent / "golden"
GO_ADD = (GOLDEN / "signature_add.json").read_bytes()


@pytest.fixture
async def raw() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url())
    await client.flushdb()  # this run's own server: no other run has keys there
    yield client
    await client.aclose()


@pytest.fixture
def cnf(raw: aioredis.Redis) -> Config:
    return Config(broker=redis_url(), result_backend=redis_url())


@pytest.fixture
async def broker(cnf: Config) -> AsyncIterator[RedisBroker]:
    b = RedisBroker(cnf)
    yield b
    await b.close()


def sig(i: int, queue: str = "", eta: datetime | None = None) -> tuple[Signature, bytes]:
    s = Signature("add", [i, i], uuid=f"task_{i:04d}", routing_key=queue, eta=eta, headers={})
    return s, encode_signature(s)


async def until_blocked(raw: aioredis.Redis, command: str = "blmove", timeout: float = 10.0) -> None:
    """Wait (up to `timeout` s) until a client of the server is blocked in `command`: a fetch waiting for a push."""
    async with asyncio.timeout(timeout):
        while True:
            if any(c.get("cmd") == command and "b" in c.get("flags", "") for c in await raw.client_list()):
                return
            await asyncio.sleep(0.005)


async def counted(broker: RedisBroker | Any) -> list[str]:
    """Record every command / pipeline the broker's client sends (one entry per round trip)."""
    client = await broker._clients.get()
    calls: list[str] = []
    execute, pipeline = client.execute_command, client.pipeline

    async def execute_command(*args: Any, **kwargs: Any) -> Any:
        calls.append(str(args[0]))
        return await execute(*args, **kwargs)

    def make_pipeline(*args: Any, **kwargs: Any) -> Any:
        pipe = pipeline(*args, **kwargs)
        run = pipe.execute

        async def execute_pipe(*a: Any, **k: Any) -> Any:
            calls.append("PIPELINE")
            return await run(*a, **k)

        pipe.execute = execute_pipe
        return pipe

    client.execute_command = execute_command
    client.pipeline = make_pipeline
    # a connection of its own (a Lane: a fetch loop's, a committer's, one-task sends') is one more
    # way to the server: counted the same
    for attr in ("_lanes", "_send_lanes"):
        lanes = getattr(broker, attr, None)
        if lanes is not None:
            _count_lane(lanes.get(lambda: Lane(client, broker.target)), calls)
    return calls


def _count_lane(lane: Lane, calls: list[str]) -> None:
    lane_call, lane_pipeline = lane.call, lane.pipeline

    async def call(*args: Any) -> Any:
        calls.append(str(args[0]))
        return await lane_call(*args)

    async def pipeline_on_lane(commands: Any) -> Any:
        out = await lane_pipeline(commands)
        if out is not None:  # None: the lane was busy, the client's pipeline (counted) runs it
            calls.append("PIPELINE")
        return out

    lane.call = call  # type: ignore[method-assign]
    lane.pipeline = pipeline_on_lane  # type: ignore[method-assign]


# --- Go wire interop -------------------------------------------------------------------------


async def test_go_message_pushed_raw_is_fetched_and_decodes(broker: RedisBroker, raw: aioredis.Redis) -> None:
    await raw.rpush("machinery_tasks", GO_ADD)
    got = await broker.fetch("machinery_tasks", 10, 2.0)
    assert [d.body for d in got] == [GO_ADD]
    s = decode_signature(got[0].body)
    assert (s.uuid, s.name, s.python_args()) == ("task_0c1f2a4e-6f5d-4a51-9a0e-3b1f6c1d2e3f", "add", [1, 1])
    assert got[0].attempts == 1 and not got[0].redelivered
    await broker.ack(got)
    assert await raw.llen("machinery_tasks") == 0
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 0
    assert await raw.zcard("{machinery_tasks}:machinery:leases") == 0


async def test_published_message_is_byte_identical_go_json(broker: RedisBroker, raw: aioredis.Redis) -> None:
    s = decode_signature(GO_ADD)
    body = encode_signature(s)
    assert body == GO_ADD
    await broker.publish(s, body, None)
    assert await raw.lrange("machinery_tasks", 0, -1) == [GO_ADD]
    # what a Go worker does with it: BLPOP from the left
    assert await raw.blpop(["machinery_tasks"], 1) == (b"machinery_tasks", GO_ADD)


async def test_empty_routing_key_goes_to_the_default_queue(broker: RedisBroker, raw: aioredis.Redis) -> None:
    s, body = sig(1)
    await broker.publish(s, body, None)
    assert await raw.lrange("machinery_tasks", 0, -1) == [body]


async def test_delayed_message_is_in_delayed_tasks_with_ns_score(broker: RedisBroker, raw: aioredis.Redis) -> None:
    eta = datetime.now(UTC) + timedelta(hours=1)
    s, body = sig(1, "machinery_tasks", eta)
    eta_ns = gojson.time_ns(eta)
    await broker.publish(s, body, eta_ns)
    members = await raw.zrange("delayed_tasks", 0, -1, withscores=True)
    assert [m for m, _ in members] == [body]
    assert abs(members[0][1] - eta_ns) < 1024  # a float score, as Go's ZADD of UnixNano()
    assert json.loads(body)["ETA"] == gojson.format_time(eta)
    assert await broker.delayed() == [body]
    assert await raw.llen("machinery_tasks") == 0


async def test_go_delayed_members_move_to_their_routing_key(broker: RedisBroker, raw: aioredis.Redis) -> None:
    past = time.time_ns() - 1_000_000
    other = json.loads(GO_ADD)
    other["RoutingKey"] = "go_queue"
    other_body = json.dumps(other, separators=(",", ":")).encode()
    keyless = json.loads(GO_ADD)
    keyless["RoutingKey"] = ""
    keyless_body = json.dumps(keyless, separators=(",", ":")).encode()
    await raw.zadd("delayed_tasks", {other_body: past, keyless_body: past + 1})
    got = await broker.fetch("go_queue", 10, 2.0)
    assert [d.body for d in got] == [other_body]
    assert await raw.lrange("machinery_tasks", 0, -1) == [keyless_body]
    assert await raw.zcard("delayed_tasks") == 0


async def test_identical_delayed_bodies_stay_two_messages(broker: RedisBroker, raw: aioredis.Redis) -> None:
    eta_ns = time.time_ns() + 300_000_000
    s, body = sig(1, "machinery_tasks", datetime.now(UTC))
    await broker.publish(s, body, eta_ns)
    await broker.publish(s, body, eta_ns)
    await broker.publish_many([(s, body, eta_ns)])
    assert await raw.zcard("delayed_tasks") == 3
    members = await raw.zrange("delayed_tasks", 0, -1)
    assert sorted(m.rstrip() for m in members) == [body] * 3  # only JSON whitespace was added
    assert all(decode_signature(m).uuid == s.uuid for m in members)  # still valid JSON (Go reads it too)
    assert await broker.delayed() == [body] * 3
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < 3 and time.monotonic() < deadline:
        got += [d.body for d in await broker.fetch("machinery_tasks", 10, 1.0)]
    assert got == [body] * 3  # delivered byte-identical, whitespace stripped


async def test_due_delayed_messages_move_in_batches_not_one_per_poll(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    past = time.time_ns() - 10_000_000
    bodies = {sig(i, "machinery_tasks")[1]: past + i for i in range(2500)}
    await raw.zadd("delayed_tasks", bodies)
    got = await broker.fetch("machinery_tasks", 10, 0.0)  # one fetch moves them all
    assert len(got) == 10
    assert await raw.zcard("delayed_tasks") == 0
    assert await raw.llen("machinery_tasks") == 2490
    rest = await broker.fetch("machinery_tasks", 5000, 0.0)
    everything = [d.body for d in got + rest]
    assert len(everything) == len(set(everything)) == 2500
    assert everything == sorted(bodies, key=bodies.__getitem__)  # ETA order


# --- round trips -----------------------------------------------------------------------------


async def test_hot_path_is_one_round_trip_per_batch(broker: RedisBroker, raw: aioredis.Redis) -> None:
    items = [sig(i, "machinery_tasks") for i in range(60)] + [sig(i, "q2") for i in range(60, 70)]
    later = sig(99, "machinery_tasks", datetime.now(UTC) + timedelta(hours=1))
    for script in (lua.CLAIM, lua.RENEW, lua.ACK):  # a fresh server loads each once: not counted here
        await raw.script_load(script.src)
    calls = await counted(broker)
    await broker.publish_many([(s, b, None) for s, b in items] + [(later[0], later[1], time.time_ns() + 10**12)])
    assert calls == ["PIPELINE"]
    broker._next_move = float("inf")  # leave the delayed-set step out of the count
    calls.clear()
    got = await broker.fetch("machinery_tasks", 100, 1.0)
    assert len(got) == 60 and calls == ["EVALSHA"]
    calls.clear()
    await broker.renew(got)
    await broker.ack(got)
    assert calls == ["EVALSHA", "EVALSHA"]


async def test_blocked_fetch_wakes_on_a_push(broker: RedisBroker, raw: aioredis.Redis) -> None:
    """An idle fetch blocks in BLMOVE, which the push itself ends: no polling round trips."""
    broker._next_move = float("inf")  # no delayed-set look: the BLMOVE may block for the whole wait
    calls = await counted(broker)

    async def push() -> None:
        await until_blocked(raw)
        await raw.rpush("machinery_tasks", GO_ADD)

    task = asyncio.create_task(push())
    got = await broker.fetch("machinery_tasks", 10, 10.0)
    await task
    assert [d.body for d in got] == [GO_ADD]
    assert got[0].receipt is None  # handed out as the BLMOVE landed it, not by a claim
    assert calls.count("BLMOVE") == 1 and calls[-1] == "BLMOVE"  # a claim found nothing; the push ended the BLMOVE


# --- leases, renew, reaper -------------------------------------------------------------------


async def test_lease_expiry_redelivers_to_another_consumer(cnf: Config, raw: aioredis.Redis) -> None:
    dead, alive = RedisBroker(cnf), RedisBroker(cnf)
    dead.lease_seconds = alive.lease_seconds = 0.5
    s, body = sig(1)
    await dead.publish(s, body, None)
    claimed = time.monotonic()
    assert [d.body for d in await dead.fetch("machinery_tasks", 10, 1.0)] == [body]
    await dead.close()  # dies without acking
    early = await alive.fetch("machinery_tasks", 10, 0.2)
    if early:  # only a test runner stalled past the lease gets here: then it must have lapsed
        assert time.monotonic() - claimed >= 0.5, "redelivered while its lease was still running"
    again = early or await alive.fetch("machinery_tasks", 10, 3.0)
    assert [d.body for d in again] == [body]
    assert again[0].redelivered and again[0].attempts == 2
    await alive.ack(again)
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 0
    assert await raw.hlen("{machinery_tasks}:machinery:redelivered") == 0
    await alive.close()


async def test_renew_keeps_a_long_task_claimed(cnf: Config) -> None:
    holder, other = RedisBroker(cnf), RedisBroker(cnf)
    holder.lease_seconds = other.lease_seconds = 1.0
    s, body = sig(1)
    await holder.publish(s, body, None)
    held = await holder.fetch("machinery_tasks", 10, 1.0)
    stop = asyncio.Event()

    async def heartbeat() -> None:
        while not stop.is_set():
            await holder.renew(held)
            await asyncio.sleep(0.1)  # a tenth of the lease: a stall of 0.9 s would still be covered

    beat = asyncio.create_task(heartbeat())
    assert await other.fetch("machinery_tasks", 10, 3.0) == []  # three lease lengths
    stop.set()
    await beat
    await holder.ack(held)
    assert await other.fetch("machinery_tasks", 10, 1.0) == []
    await holder.close()
    await other.close()


async def test_reaped_messages_return_to_the_head_in_order(cnf: Config, raw: aioredis.Redis) -> None:
    a, b = RedisBroker(cnf), RedisBroker(cnf)
    a.lease_seconds = b.lease_seconds = 0.3
    first = [sig(i)[1] for i in range(3)]
    for body in first:
        await raw.rpush("machinery_tasks", body)
    assert [d.body for d in await a.fetch("machinery_tasks", 3, 1.0)] == first
    late = sig(9)[1]
    await raw.rpush("machinery_tasks", late)
    await asyncio.sleep(0.4)
    got = await b.fetch("machinery_tasks", 10, 1.0)
    assert [d.body for d in got] == [*first, late]
    assert [d.attempts for d in got] == [2, 2, 2, 1]
    await a.close()
    await b.close()


async def test_reaper_returns_a_dead_consumers_landing_list(broker: RedisBroker, raw: aioredis.Redis) -> None:
    """A consumer that died between its BLMOVE and its claim left a message in its landing list."""
    ghost, live = sig(1)[1], sig(2)[1]
    now_ms = int(time.time() * 1000)
    await raw.zadd("{machinery_tasks}:machinery:consumers", {"ghost": now_ms - 1000, "busy": now_ms + 60_000})
    await raw.rpush("{machinery_tasks}:machinery:landing:ghost", ghost)
    await raw.rpush("{machinery_tasks}:machinery:landing:busy", live)
    got = await broker.fetch("machinery_tasks", 10, 0.3)
    assert [d.body for d in got] == [ghost]
    assert not await raw.exists("{machinery_tasks}:machinery:landing:ghost")
    assert await raw.lrange("{machinery_tasks}:machinery:landing:busy", 0, -1) == [live]  # alive: untouched
    assert await raw.zscore("{machinery_tasks}:machinery:consumers", "ghost") is None


# --- requeue, dead letters, inspection ---------------------------------------------------------


async def test_requeue_with_delay_goes_to_delayed_tasks(broker: RedisBroker, raw: aioredis.Redis) -> None:
    s, body = sig(1)
    await broker.publish(s, body, None)
    got = await broker.fetch("machinery_tasks", 10, 1.0)
    before = time.time_ns()
    await broker.requeue(got, delay=30)
    members = await raw.zrange("delayed_tasks", 0, -1, withscores=True)
    assert [m for m, _ in members] == [body]
    assert before + 29 * 10**9 < members[0][1] < time.time_ns() + 31 * 10**9
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 0


async def test_requeue_after_the_lease_lapsed_does_not_duplicate(cnf: Config, raw: aioredis.Redis) -> None:
    slow, fast = RedisBroker(cnf), RedisBroker(cnf)
    slow.lease_seconds = fast.lease_seconds = 0.3
    s, body = sig(1)
    await slow.publish(s, body, None)
    held = await slow.fetch("machinery_tasks", 10, 1.0)
    await asyncio.sleep(0.4)
    taken = await fast.fetch("machinery_tasks", 10, 1.0)  # reaped and claimed again
    await slow.requeue(held)  # too late: nothing is pushed
    await slow.ack(held)  # and this ack does not touch the new claim
    assert await raw.llen("machinery_tasks") == 0
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 1
    await fast.ack(taken)
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 0
    await slow.close()
    await fast.close()


async def test_dead_letter_keeps_binary_bodies_and_reason(broker: RedisBroker, raw: aioredis.Redis) -> None:
    junk = b"\xff\xfe not json"
    await raw.rpush("machinery_tasks", junk)
    got = await broker.fetch("machinery_tasks", 10, 1.0)
    await broker.dead_letter(got[0], "message is not valid JSON")
    assert await broker.dead_letters() == [(junk, "message is not valid JSON")]
    entry = json.loads((await raw.lrange("machinery:dead_letters", 0, -1))[0])
    assert entry["Queue"] == "machinery_tasks" and entry["Encoding"] == "base64"
    assert await raw.hlen("{machinery_tasks}:machinery:inflight") == 0


def test_sync_inspection_through_the_portal(cnf: Config) -> None:
    broker = RedisBroker(cnf)
    s, body = sig(1)
    later, later_body = sig(2, eta=datetime.now(UTC) + timedelta(hours=1))
    asyncio.run(_publish(broker, [(s, body, None), (later, later_body, time.time_ns() + 3_600 * 10**9)]))
    assert [x.uuid for x in broker.get_pending_tasks()] == ["task_0001"]
    assert [x.uuid for x in broker.get_delayed_tasks()] == ["task_0002"]
    assert broker.get_pending_tasks("nothing_here") == []


async def _publish(broker: RedisBroker, items: list[tuple[Signature, bytes, int | None]]) -> None:
    await broker.publish_many(items)
    await broker.close()
