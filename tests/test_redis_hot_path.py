"""The Redis fast paths: a BLMOVE-landed message runs before its claim returns, PENDING and the
publish share one round trip, states and acks share one round trip, and the worker's prefetch
bound (at most concurrency running, 2 x concurrency held)."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from machinery import Chain, Config, Server, Signature
from machinery.config import RedisConfig
from machinery.drivers.broker import Delivery
from machinery.drivers.capabilities import JointCommit, JointSend, capability_of
from machinery.drivers.redis import scripts as lua
from machinery.drivers.redis.backend import SET_PENDING, SET_STATES, RedisBackend
from machinery.drivers.redis.broker import RedisBroker
from machinery.drivers.redis.pairing import COMMIT, COMMIT_LANDED, SEND_ONE
from machinery.drivers.registry import find_pairing
from machinery.errors import BackendError
from machinery.tasks.signature import encode_signature
from machinery.tasks.state import RECEIVED, SUCCESS, TaskState
from machinery.testing import running_worker
from redis_servers import redis_url
from test_redis_broker import counted, until_blocked

pytestmark = pytest.mark.redis

QUEUE = "machinery_tasks"
#: the pairing's JointCommit.commit
Commit = Callable[..., Awaitable[tuple[Exception | None, Exception | None, list[int]]]]
INFLIGHT = "{machinery_tasks}:machinery:inflight"


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


@pytest.fixture
async def joint(cnf: Config, broker: RedisBroker) -> AsyncIterator[tuple[RedisBackend, Commit]]:
    """A Redis backend on the broker's server and its pairing's joint commit."""
    backend = RedisBackend(cnf)
    yield backend, joint_commit(broker, backend)
    await backend.close()


def joint_commit(broker: RedisBroker, backend: RedisBackend) -> Commit:
    joint = capability_of(find_pairing(broker, backend), JointCommit)
    assert joint is not None
    return joint.commit


def body(i: int) -> bytes:
    return encode_signature(Signature("add", [i, i], uuid=f"task_{i:04d}", routing_key=QUEUE, headers={}))


#: a claim delay no test outlasts: whether a landed message is committed or claimed is then the
#: test's choice, not a race between its steps and the broker's 5 ms timer
NO_CLAIM = 60.0


async def push_when_blocked(raw: aioredis.Redis, *bodies: bytes) -> None:
    await until_blocked(raw)  # the fetch waits in BLMOVE: the push lands in its landing list
    await raw.rpush(QUEUE, *bodies)


async def fetch_landing(broker: RedisBroker, raw: aioredis.Redis, *bodies: bytes) -> list[Delivery]:
    """Fetch from an empty queue while `bodies` are pushed, so they arrive by BLMOVE."""
    broker._next_move = float("inf")  # no delayed-set look: the BLMOVE blocks for the whole fetch
    pusher = asyncio.create_task(push_when_blocked(raw, *bodies))
    got = await broker.fetch(QUEUE, 10, 5.0)
    await pusher
    return got


# --- a landed message ------------------------------------------------------------------------


async def test_landed_message_is_handed_out_before_its_claim_and_settles(
    broker: RedisBroker, raw: aioredis.Redis
) -> None:
    broker.landed_claim_delay = NO_CLAIM
    got = await fetch_landing(broker, raw, body(1))
    assert [d.body for d in got] == [body(1)]
    assert got[0].receipt is None  # not claimed: handed out as it landed
    await broker.settle(got)
    assert got[0].receipt is not None and got[0].attempts == 1
    assert await raw.hvals(INFLIGHT) == [body(1)]  # claimed under a lease, landing list drained
    assert await raw.llen(f"{{{QUEUE}}}:machinery:landing:{broker.consumer_id}") == 0
    await broker.ack(got)
    assert await raw.hlen(INFLIGHT) == 0


async def test_ack_right_after_a_landed_fetch_waits_for_the_claim(broker: RedisBroker, raw: aioredis.Redis) -> None:
    broker.landed_claim_delay = NO_CLAIM
    got = await fetch_landing(broker, raw, body(2))
    assert got[0].receipt is None
    await broker.ack(got)  # no settle() first: ack does it
    assert await raw.hlen(INFLIGHT) == 0
    assert await broker.fetch(QUEUE, 10, 0.0) == []


async def test_leftover_in_the_landing_list_is_delivered_once(broker: RedisBroker, raw: aioredis.Redis) -> None:
    """A fetch cancelled inside BLMOVE can leave a message in the landing list: the next claim
    finds it beside the newly landed one; each is delivered exactly once."""
    landing = f"{{{QUEUE}}}:machinery:landing:{broker.consumer_id}"
    broker._next_move = float("inf")  # no delayed-set look: the BLMOVE blocks for the whole fetch

    async def leftover_then_push() -> None:
        await until_blocked(raw)
        await raw.rpush(landing, body(4))
        await raw.rpush(QUEUE, body(5))

    pusher = asyncio.create_task(leftover_then_push())
    first = await broker.fetch(QUEUE, 10, 5.0)
    await pusher
    assert [d.body for d in first] == [body(5)]
    await broker.settle(first)
    second = await broker.fetch(QUEUE, 10, 0.0)
    assert [d.body for d in second] == [body(4)]
    assert second[0].receipt is not None
    assert await broker.fetch(QUEUE, 10, 0.0) == []
    assert await raw.hlen(INFLIGHT) == 2  # 4 and 5, each claimed once


async def test_settle_gives_a_landed_redelivery_its_attempt_count(broker: RedisBroker, raw: aioredis.Redis) -> None:
    b = body(6)
    await raw.hset(f"{{{QUEUE}}}:machinery:redelivered", hashlib.sha1(b).hexdigest(), 2)
    got = await fetch_landing(broker, raw, b)
    await broker.settle(got)
    assert got[0].redelivered and got[0].attempts == 3


async def landed(broker: RedisBroker, raw: aioredis.Redis, i: int, claim_delay: float = NO_CLAIM) -> Delivery:
    """A message fetched by a blocked fetch (BLMOVE into the landing list), not claimed yet; its
    claim starts by itself after `claim_delay` seconds."""
    broker.landed_claim_delay = claim_delay
    got = await fetch_landing(broker, raw, body(i))
    assert [d.body for d in got] == [body(i)] and got[0].receipt is None
    return got[0]


def landing_key(broker: RedisBroker) -> str:
    return f"{{{QUEUE}}}:machinery:landing:{broker.consumer_id}"


async def test_landed_task_done_quickly_is_committed_from_the_landing_list_without_a_claim(
    joint: tuple[RedisBackend, Commit], broker: RedisBroker, raw: aioredis.Redis
) -> None:
    backend, commit = joint
    await raw.script_load(COMMIT_LANDED.src)  # a fresh server loads it once: not counted here
    d = await landed(broker, raw, 11)
    consumers = f"{{{QUEUE}}}:machinery:consumers"
    seen = await raw.zscore(consumers, broker.consumer_id)
    assert broker.hold(d)  # reserved for the landed commit: no claim starts now
    calls = await counted(backend)
    done = TaskState("task_0011", SUCCESS, task_name="add", created_at=datetime.now(UTC))
    assert await commit([], [], [(done, d)]) == (None, None, [])
    assert calls == ["EVALSHA"]  # the state and the message's removal: one script
    stored = await backend.get_state("task_0011")
    assert stored is not None and stored.state == SUCCESS
    assert await raw.llen(landing_key(broker)) == 0
    renewed = await raw.zscore(consumers, broker.consumer_id)
    assert seen is not None and renewed is not None and renewed > seen  # the consumer's deadline
    assert not broker.unclaimed(d)  # settled by the commit: its claim timer is gone, none can start
    assert await raw.hlen(INFLIGHT) == 0 and not await raw.exists(f"{{{QUEUE}}}:machinery:seq")  # never claimed
    # the commit saw the queue empty: the next fetch blocks at once instead of claiming first
    fetch_calls = await counted(broker)
    assert await broker.fetch(QUEUE, 10, 0.05) == []
    assert fetch_calls[0] == "BLMOVE"


async def test_a_landed_message_acked_after_its_state_leaves_the_landing_list_without_a_claim(
    joint: tuple[RedisBackend, Commit], broker: RedisBroker, raw: aioredis.Redis
) -> None:
    """A task with follow-ups stores its state, sends them, then acks: that ack goes straight to
    the landing list too, and does not wait for company (the next fetch waits on it)."""
    _, commit = joint
    d = await landed(broker, raw, 15)
    assert broker.unclaimed(d)
    done = TaskState("task_0015", SUCCESS, task_name="add", created_at=datetime.now(UTC))
    assert await commit([done], [], []) == (None, None, [])  # the state alone: the message stays
    assert await raw.lrange(landing_key(broker), 0, -1) == [body(15)]
    assert await commit([], [d], []) == (None, None, [])
    assert await raw.llen(landing_key(broker)) == 0 and not broker.unclaimed(d)  # no claim can start now
    assert await raw.hlen(INFLIGHT) == 0 and not await raw.exists(f"{{{QUEUE}}}:machinery:seq")  # never claimed


async def test_landed_task_still_running_after_the_delay_is_claimed(
    joint: tuple[RedisBackend, Commit], broker: RedisBroker, raw: aioredis.Redis
) -> None:
    _, commit = joint
    d = await landed(broker, raw, 12, claim_delay=RedisBroker.landed_claim_delay)
    # nothing starts the claim but its timer: wait until that claim has given it a receipt
    await asyncio.wait_for(broker._landing.resolved(), 10)
    assert not broker.unclaimed(d)
    await broker.settle([d])  # nothing left to wait for
    assert d.receipt is not None and await raw.hvals(INFLIGHT) == [body(12)]
    assert await raw.llen(landing_key(broker)) == 0
    assert broker.hold(d)  # claimed: acked by its receipt
    done = TaskState("task_0012", SUCCESS, task_name="add", created_at=datetime.now(UTC))
    assert await commit([], [], [(done, d)]) == (None, None, [])
    assert await raw.hlen(INFLIGHT) == 0


async def test_a_landed_commit_that_fails_claims_the_message_and_keeps_it(
    joint: tuple[RedisBackend, Commit], broker: RedisBroker, raw: aioredis.Redis
) -> None:
    backend, commit = joint
    d = await landed(broker, raw, 13)
    assert broker.hold(d)
    await raw.hset("task_0013", "x", "1")  # the state write fails: WRONGTYPE
    stored_err, acked_err, _ = await commit([], [], [(TaskState("task_0013", SUCCESS), d)])
    assert isinstance(stored_err, BackendError) and "WRONGTYPE" in str(stored_err) and acked_err is None
    await broker.settle([d])  # the failure started its claim
    assert d.receipt is not None and await raw.hvals(INFLIGHT) == [body(13)]  # kept, under a lease
    await raw.delete("task_0013")
    assert await commit([], [], [(TaskState("task_0013", SUCCESS), d)]) == (None, None, [])
    assert await raw.hlen(INFLIGHT) == 0 and await raw.llen(landing_key(broker)) == 0
    stored = await backend.get_state("task_0013")
    assert stored is not None and stored.state == SUCCESS


async def test_landed_commit_of_a_reaped_consumer_still_stores_the_state(
    joint: tuple[RedisBackend, Commit], broker: RedisBroker, raw: aioredis.Redis
) -> None:
    """A consumer stalled past its deadline: another consumer's reaper put its landing list back
    on the queue, so the message runs again there; the late commit stores its state and removes
    nothing."""
    backend, commit = joint
    d = await landed(broker, raw, 14)
    assert broker.hold(d)
    await raw.lmove(landing_key(broker), QUEUE, "RIGHT", "LEFT")  # what the reaper does
    assert await commit([], [], [(TaskState("task_0014", SUCCESS), d)]) == (None, None, [])
    assert await raw.lrange(QUEUE, 0, -1) == [body(14)]
    stored = await backend.get_state("task_0014")
    assert stored is not None and stored.state == SUCCESS


def test_worker_round_trips_on_an_idle_queue_need_no_claim(cnf: Config, raw: aioredis.Redis) -> None:
    """BLMOVE, run, one landed commit: a task that finishes within the delay is never claimed."""
    server = Server(cnf)
    broker = server.get_broker()
    assert isinstance(broker, RedisBroker)
    broker.landed_claim_delay = 5.0  # this test checks the path, not the machine's speed

    @server.task
    async def add(x: int, y: int) -> int:
        return x + y

    with running_worker(server, concurrency=2):
        probe = redis.Redis.from_url(redis_url())
        deadline = time.monotonic() + 10
        while not any(c["cmd"] == "blmove" and "b" in c["flags"] for c in probe.client_list()):
            assert time.monotonic() < deadline, "the worker never blocked in BLMOVE"
            time.sleep(0.005)
        for i in range(5):
            assert server.send_task(Signature("add", [i, 1])).get(timeout=10) == i + 1
    assert probe.get(f"{{{QUEUE}}}:machinery:seq") is None  # no message was ever claimed
    assert probe.hlen(INFLIGHT) == 0 and probe.llen(QUEUE) == 0
    probe.close()
    server.close()


# --- joint round trips -----------------------------------------------------------------------


async def test_send_is_one_round_trip_when_broker_and_backend_share_redis(cnf: Config, raw: aioredis.Redis) -> None:
    server = Server(cnf)
    backend = server.get_backend()
    assert isinstance(backend, RedisBackend)
    for script in (SEND_ONE, SET_PENDING, lua.DELAY):  # a fresh server loads each once: not counted here
        await raw.script_load(script.src)
    calls = await counted(backend)  # type: ignore[arg-type]
    sig = Signature("add", [1, 2])
    await server.asend_task(sig)
    assert calls == ["EVALSHA"]  # one task: PENDING (SET NX) and RPUSH in one script
    assert await raw.lrange(QUEUE, 0, -1) == [encode_signature(sig)]
    stored = await backend.get_state(sig.uuid)
    assert stored is not None and stored.state == "PENDING"
    # a state already there (the worker was faster, or a re-send) is never replaced by PENDING
    await backend.set_states([TaskState(sig.uuid, SUCCESS, task_name="add")])
    await server.asend_task(sig)
    again = await backend.get_state(sig.uuid)
    assert again is not None and again.state == SUCCESS
    await raw.delete(QUEUE)
    calls.clear()
    later = Signature("add", [3, 4], eta=datetime.now(UTC) + timedelta(hours=1))
    await server.asend_task(later)  # held back: the delayed set, in one pipeline with PENDING
    assert calls == ["PIPELINE"]
    assert await raw.llen(QUEUE) == 0 and await raw.zcard("delayed_tasks") == 1
    calls.clear()
    sigs = [Signature("add", [i, i]) for i in range(50)]
    await server.asend_tasks(sigs)
    assert calls == ["PIPELINE"]
    assert await raw.llen(QUEUE) == 50
    await server.aclose()


async def test_one_task_sends_at_once_on_one_loop_all_land(cnf: Config, raw: aioredis.Redis) -> None:
    """One-task sends share a connection of their own per loop; those that find it busy take the
    pool: nothing is lost or sent twice."""
    server = Server(cnf)
    sigs = [Signature("add", [i, i]) for i in range(200)]
    await asyncio.gather(*(server.asend_task(s) for s in sigs))
    assert sorted(await raw.lrange(QUEUE, 0, -1)) == sorted(encode_signature(s) for s in sigs)
    states = await server.get_backend().get_states([s.uuid for s in sigs])
    assert all(st is not None and st.state == "PENDING" for st in states)
    await server.aclose()


@pytest.mark.parametrize("wait", [True, False])
async def test_a_connection_limit_waits_or_fails_as_configured(raw: aioredis.Redis, wait: bool) -> None:
    """redis.max_active with redis.wait, as Go's MaxActive and Wait: at the limit, sends wait
    for a free connection, or fail with a clear error."""
    cnf = Config(broker=redis_url(), result_backend=redis_url(), redis=RedisConfig(max_active=3, wait=wait))
    server = Server(cnf)
    sigs = [Signature("add", [i, i]) for i in range(100)]
    sends = asyncio.gather(*(server.asend_task(s) for s in sigs))
    if wait:
        await sends
        assert await raw.llen(QUEUE) == 100
    else:
        with pytest.raises(BackendError, match="Too many connections"):
            await sends
    await server.aclose()


async def test_no_joint_send_across_servers(cnf: Config, raw: aioredis.Redis) -> None:
    other = Config(broker=redis_url(), result_backend=redis_url(14))
    assert capability_of(find_pairing(RedisBroker(other), RedisBackend(other)), JointSend) is None
    assert capability_of(find_pairing(RedisBroker(cnf), RedisBackend(cnf)), JointSend) is not None


async def joint_commit_with_two_claimed(
    cnf: Config, broker: RedisBroker, raw: aioredis.Redis
) -> tuple[RedisBackend, Commit, list[Delivery], list[str], TaskState]:
    """A backend's joint commit, two claimed messages (tasks 7 and 8), a call counter started after
    COMMIT is loaded, and task 7's SUCCESS state."""
    backend = RedisBackend(cnf)
    commit = joint_commit(broker, backend)
    await raw.rpush(QUEUE, body(7), body(8))
    got = await broker.fetch(QUEUE, 10, 0.0)
    assert await raw.hlen(INFLIGHT) == 2
    for script in (COMMIT, SET_STATES, lua.ACK):  # a fresh server loads each once: not counted here
        await raw.script_load(script.src)
    calls = await counted(backend)  # type: ignore[arg-type]
    done = TaskState("task_0007", SUCCESS, task_name="add", created_at=datetime.now(UTC))
    return backend, commit, got, calls, done


async def test_joint_commit_is_one_round_trip_and_reports_each_part(
    cnf: Config, broker: RedisBroker, raw: aioredis.Redis
) -> None:
    backend, commit, got, calls, done = await joint_commit_with_two_claimed(cnf, broker, raw)
    assert await commit([done], got[:1], []) == (None, None, [])
    assert calls == ["PIPELINE"]
    assert await raw.hlen(INFLIGHT) == 1
    stored = await backend.get_state("task_0007")
    assert stored is not None and stored.state == SUCCESS
    # A state that cannot be stored (a merge reading a key of the wrong type) fails its part only.
    await raw.hset("task_0008", "x", "1")
    stored_err, acked_err, _ = await commit([TaskState("task_0008", RECEIVED)], got[1:], [])
    assert isinstance(stored_err, BackendError) and "WRONGTYPE" in str(stored_err)
    assert acked_err is None and await raw.hlen(INFLIGHT) == 0
    # one state and nothing to ack: a single command, its error still reported, not raised
    stored_err, acked_err, _ = await commit([TaskState("task_0008", RECEIVED)], [], [])
    assert isinstance(stored_err, BackendError) and acked_err is None
    await backend.close()


async def test_joint_commit_pairs_a_state_with_its_ack_atomically(
    cnf: Config, broker: RedisBroker, raw: aioredis.Redis
) -> None:
    backend, commit, got, calls, done = await joint_commit_with_two_claimed(cnf, broker, raw)
    # one state and its ack: a single script call, no pipeline
    assert await commit([], [], [(done, got[0])]) == (None, None, [])
    assert calls == ["EVALSHA"]
    stored = await backend.get_state("task_0007")
    assert stored is not None and stored.state == SUCCESS
    assert await raw.hlen(INFLIGHT) == 1
    # A pair whose state cannot be stored keeps its message claimed: no ack without its state.
    await raw.hset("task_0008", "x", "1")
    stored_err, acked_err, _ = await commit([], [], [(TaskState("task_0008", SUCCESS), got[1])])
    assert isinstance(stored_err, BackendError) and "WRONGTYPE" in str(stored_err)
    assert acked_err is None
    assert await raw.hlen(INFLIGHT) == 1
    await raw.delete("task_0008")
    assert await commit([], [], [(TaskState("task_0008", SUCCESS), got[1])]) == (None, None, [])
    assert await raw.hlen(INFLIGHT) == 0
    await backend.close()


async def test_joint_commit_sends_follow_ups_after_their_state_in_the_same_round_trip(
    cnf: Config, broker: RedisBroker, raw: aioredis.Redis
) -> None:
    backend, commit, _, calls, done = await joint_commit_with_two_claimed(cnf, broker, raw)
    server = Server(cnf)
    nxt = Signature("add", [7, 1], uuid="task_next", routing_key=QUEUE)
    plan = server.plan_follow_ups([nxt])
    assert plan is not None
    for script in (SET_PENDING,):
        await raw.script_load(script.src)
    assert await commit([done], [], [], [plan]) == (None, None, [])
    assert calls == ["PIPELINE"]  # the state, the follow-up's PENDING and its message: one round trip
    assert (await backend.get_state("task_0007")).state == SUCCESS  # type: ignore[union-attr]
    assert (await backend.get_state("task_next")).state == "PENDING"  # type: ignore[union-attr]
    assert await raw.lrange(QUEUE, 0, -1) == [encode_signature(nxt)]
    # a group among the follow-ups is recorded first: those go through dispatch instead
    assert server.plan_follow_ups([Signature("add", [1, 1], group_uuid="group_1")]) is None
    await server.aclose()
    await backend.close()


async def test_a_follow_up_that_went_out_is_not_sent_again_when_its_state_write_failed(
    cnf: Config, broker: RedisBroker, raw: aioredis.Redis
) -> None:
    """The pipeline is not a transaction: a state that cannot be stored does not stop the send
    after it. The committer writes the state again, but must not send the follow-up again."""
    backend, commit, _, _, _ = await joint_commit_with_two_claimed(cnf, broker, raw)
    server = Server(cnf)
    plan = server.plan_follow_ups([Signature("add", [8, 1], uuid="task_after8", routing_key=QUEUE)])
    assert plan is not None
    await raw.hset("task_0008", "x", "1")  # its state write fails: WRONGTYPE
    stored_err, acked_err, unsent = await commit([TaskState("task_0008", SUCCESS)], [], [], [plan])
    assert isinstance(stored_err, BackendError) and acked_err is None
    assert unsent == [] and await raw.llen(QUEUE) == 1
    await server.aclose()
    await backend.close()


def test_a_chain_link_sends_the_next_with_its_state(cnf: Config, raw: aioredis.Redis) -> None:
    """Each link's state write carries the next link: a chain still runs in order, every link's
    state is stored, and nothing is left claimed or queued."""
    server = Server(cnf)

    @server.task
    async def add(x: int, y: int) -> int:
        return x + y

    with running_worker(server, concurrency=2):
        links = [Signature("add", [0, 1]), *(Signature("add", [1]) for _ in range(19))]
        result = server.send_chain(Chain(*links))
        assert result.get(timeout=20) == 20
        states = [r.get_state() for r in result.async_results]
    assert [s.state for s in states] == [SUCCESS] * 20  # type: ignore[union-attr]
    probe = redis.Redis.from_url(redis_url())
    assert probe.hlen(INFLIGHT) == 0 and probe.llen(QUEUE) == 0
    probe.close()
    server.close()


# --- the worker's prefetch bound -------------------------------------------------------------


def test_worker_runs_at_most_concurrency_and_holds_at_most_twice_that(cnf: Config) -> None:
    server = Server(cnf)
    running = {"now": 0, "max": 0}
    held: list[int] = []
    claimed: list[int] = []
    probe = redis.Redis.from_url(redis_url())
    workers: list[Any] = []

    @server.task
    async def slow() -> None:
        running["now"] += 1
        running["max"] = max(running["max"], running["now"])
        held.append(workers[0].held)
        claimed.append(probe.hlen(INFLIGHT))
        await asyncio.sleep(0.1)
        running["now"] -= 1

    with running_worker(server, concurrency=3) as worker:
        workers.append(worker)
        results = server.send_tasks([Signature("slow") for _ in range(24)])
        for r in results:
            r.get(timeout=30)
    assert running["max"] == 3
    assert 3 < max(held) <= 6  # it does prefetch, within the bound
    # what Redis sees claimed may also include finished messages whose ack is on its way
    assert max(claimed) <= 6 + 3
    server.close()
    probe.close()


def test_worker_runs_on_uvloop_by_default_and_on_asyncio_when_asked(cnf: Config) -> None:
    for kind, expected in (("auto", "uvloop"), ("asyncio", "asyncio")):
        cnf.event_loop = kind
        server = Server(cnf)

        @server.task
        async def loop_kind() -> str:
            return type(asyncio.get_running_loop()).__module__.split(".")[0]

        with running_worker(server):
            assert server.send_task(Signature("loop_kind")).get(timeout=10) == expected
        server.close()
