"""The RabbitMQ broker against a real server: Go's wire format and layout, delays, settling, failover."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiormq import exceptions as amqp_exc

from amqp_support import AMQP_URL, Admin, golden, make_cnf, require_rabbit
from machinery.config import Config
from machinery.drivers.amqp.broker import REASON_HEADER, SOURCE_HEADER, AMQPBroker
from machinery.errors import BrokerError, ConfigError
from machinery.tasks.signature import Signature, decode_signature, encode_signature

pytestmark = pytest.mark.amqp

@pytest.fixture
async def admin() -> AsyncIterator[Admin]:
    await require_rabbit()
    async with Admin() as a:
        yield a


@pytest.fixture
def cnf(admin: Admin) -> Config:
    cnf = make_cnf()
    admin.track(cnf, f"{cnf.default_queue}_custom", cnf.amqp.binding_key)
    return cnf


@pytest.fixture
async def broker(cnf: Config) -> AsyncIterator[AMQPBroker]:
    b = AMQPBroker(cnf)
    yield b
    await b.close()


def sig(i: int, routing_key: str = "", **kw: object) -> Signature:
    return Signature("add", [i, i], uuid=f"task_{i}", routing_key=routing_key, **kw)  # type: ignore[arg-type]


async def send(broker: AMQPBroker, s: Signature, eta_ns: int | None = None) -> bytes:
    body = encode_signature(s)
    await broker.publish(s, body, eta_ns)
    return body


async def fetch_n(broker: AMQPBroker, queue: str, n: int, timeout: float = 5.0) -> list:  # type: ignore[type-arg]
    out: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while len(out) < n and time.monotonic() < deadline:
        out += await broker.fetch(queue, n - len(out), 0.2)
    return out


# --- wire format and queue layout ------------------------------------------------------------


async def test_golden_body_and_go_message_properties(broker: AMQPBroker, cnf: Config, admin: Admin) -> None:
    raw = golden("signature_add.json")
    s = decode_signature(raw)
    assert encode_signature(s) == raw
    s.routing_key = ""  # the golden body says machinery_tasks; route this copy to our test queue
    await broker.publish(s, raw, None)
    [msg] = await admin.peek(cnf.default_queue)
    assert msg.body == raw
    props = msg.header.properties
    assert props.content_type == "application/json"
    assert props.delivery_mode == 2
    assert props.priority is None and not props.headers  # Go omits zero priority and empty headers
    assert msg.delivery.exchange == cnf.amqp.exchange
    assert msg.delivery.routing_key == cnf.amqp.binding_key  # Go's key for the default queue


async def test_headers_and_priority_are_message_properties(broker: AMQPBroker, cnf: Config, admin: Admin) -> None:
    await send(broker, sig(1, headers={"uber-trace-id": "abc:1", "n": 7}, priority=5))
    [msg] = await admin.peek(cnf.default_queue)
    assert msg.header.properties.headers == {"uber-trace-id": "abc:1", "n": 7}
    assert msg.header.properties.priority == 5


async def test_tasks_are_kept_before_any_worker_and_no_orphan_queue(
    broker: AMQPBroker, cnf: Config, admin: Admin
) -> None:
    custom = f"{cnf.default_queue}_custom"
    d = await send(broker, sig(1))
    c = await send(broker, sig(2, routing_key=custom))
    assert await admin.count(cnf.default_queue) == 1
    assert await admin.count(custom) == 1
    assert not await admin.exists(cnf.amqp.binding_key)  # Go's orphan `machinery_task` queue
    worker = AMQPBroker(cnf)
    try:
        got_custom = await fetch_n(worker, custom, 1)
        assert [x.body for x in got_custom] == [c]
        assert await worker.fetch(custom, 10, 0.3) == []  # no copy of default tasks
        got_default = await fetch_n(worker, cnf.default_queue, 1)
        assert [x.body for x in got_default] == [d]
        await worker.ack(got_custom + got_default)
    finally:
        await worker.close()


async def test_go_producer_and_go_worker_share_the_default_queue(
    broker: AMQPBroker, cnf: Config, admin: Admin
) -> None:
    # A Go worker declares the default queue bound with the binding key only ...
    ch = await admin.channel()
    await ch.exchange_declare(cnf.amqp.exchange, exchange_type="direct", durable=True)
    await ch.queue_declare(cnf.default_queue, durable=True)
    await ch.queue_bind(cnf.default_queue, cnf.amqp.exchange, routing_key=cnf.amqp.binding_key)
    # ... a Go producer publishes with the binding key, and we publish with routing key = queue name.
    go_body = golden("signature_add.json")
    await ch.basic_publish(go_body, exchange=cnf.amqp.exchange, routing_key=cnf.amqp.binding_key)
    await ch.close()
    ours = await send(broker, sig(2, routing_key=cnf.default_queue))
    got = await fetch_n(broker, cnf.default_queue, 2)
    assert [x.body for x in got] == [go_body, ours]
    await broker.ack(got)


@pytest.mark.parametrize("exchange_type", ["topic", "fanout"])
async def test_other_exchange_types(admin: Admin, exchange_type: str) -> None:
    cnf = make_cnf(exchange_type=exchange_type)
    custom = f"{cnf.default_queue}_custom"
    admin.track(cnf, custom)
    b = AMQPBroker(cnf)
    try:
        await b.fetch(custom, 1, 0)  # a custom-queue worker is running
        d = await send(b, sig(1))
        got = await fetch_n(b, cnf.default_queue, 1)
        assert [x.body for x in got] == [d]
        copies = await b.fetch(custom, 10, 0.5)
        # topic routes by key (no copy); fanout gives every bound queue a copy, by definition
        assert [x.body for x in copies] == ([d] if exchange_type == "fanout" else [])
        await b.ack(got + copies)
    finally:
        await b.close()


async def test_headers_exchange_routes_by_binding_args(admin: Admin) -> None:
    cnf = make_cnf(exchange_type="headers")
    cnf.amqp.queue_binding_args = {"x-match": "all", "app": cnf.default_queue}
    admin.track(cnf)
    b = AMQPBroker(cnf)
    try:
        d = await send(b, sig(1, headers={"app": cnf.default_queue}))
        assert [x.body for x in await fetch_n(b, cnf.default_queue, 1)] == [d]
        with pytest.raises(BrokerError, match="no queue is bound"):
            await send(b, sig(2, headers={"app": "someone else"}))
    finally:
        await b.close()


async def test_priority_queue(admin: Admin) -> None:
    cnf = make_cnf(queue_declare_args={"x-max-priority": 10})
    admin.track(cnf)
    b = AMQPBroker(cnf)
    try:
        bodies = [await send(b, sig(i, priority=p)) for i, p in ((1, 1), (2, 9), (3, 5))]
        got = await fetch_n(b, cnf.default_queue, 3)
        assert [x.body for x in got] == [bodies[1], bodies[2], bodies[0]]
    finally:
        await b.close()


# --- delays ----------------------------------------------------------------------------------


async def test_eta_uses_go_delay_queue(broker: AMQPBroker, cnf: Config, admin: Admin) -> None:
    eta = time.time_ns() + 700_000_000
    body = await send(broker, sig(1), eta)
    [note] = await admin.peek(f"{cnf.default_queue}.delay_index")
    name = note.body.decode()
    m = re.fullmatch(rf"delay\.(\d+)\.{cnf.amqp.exchange}\.{cnf.amqp.binding_key}", name)
    assert m and 600 <= int(m.group(1)) <= 700
    ms = int(m.group(1))
    # Go declares the same queue with these arguments: equivalent, so no PRECONDITION_FAILED.
    go_args = {"x-dead-letter-exchange": cnf.amqp.exchange, "x-dead-letter-routing-key": cnf.amqp.binding_key,
               "x-message-ttl": ms, "x-expires": ms * 2}
    ok = await admin.declare(name, durable=True, auto_delete=False, arguments=go_args)
    assert ok.message_count == 1
    assert await broker.delayed() == [body]
    assert await broker.fetch(cnf.default_queue, 10, 0.3) == []
    got = await fetch_n(broker, cnf.default_queue, 1)
    assert time.time_ns() >= eta - 5_000_000
    assert [x.body for x in got] == [body]
    await broker.ack(got)


async def test_single_delayed_queue_mode(admin: Admin) -> None:
    cnf = make_cnf()
    cnf.amqp.delayed_queue = f"{cnf.default_queue}_delayed"
    admin.track(cnf, cnf.amqp.delayed_queue)
    b = AMQPBroker(cnf)
    try:
        body = await send(b, sig(1), time.time_ns() + 500_000_000)
        [held] = await admin.peek(cnf.amqp.delayed_queue)
        assert held.body == body and 400 <= int(held.header.properties.expiration) <= 500
        assert await b.delayed() == [body]
        got = await fetch_n(b, cnf.default_queue, 1)
        assert [x.body for x in got] == [body]
    finally:
        await b.close()


async def test_requeue_with_delay_returns_to_the_same_queue(broker: AMQPBroker, cnf: Config) -> None:
    custom = f"{cnf.default_queue}_custom"
    body = await send(broker, sig(1, routing_key=custom))
    first = await fetch_n(broker, custom, 1)
    await broker.requeue(first, delay=0.4)
    assert await broker.fetch(custom, 10, 0.2) == []
    again = await fetch_n(broker, custom, 1)
    assert [x.body for x in again] == [body]
    assert again[0].redelivered and again[0].attempts == 2
    assert await broker.pending(cnf.default_queue) == []
    await broker.requeue(again, delay=0.05)
    third = await fetch_n(broker, custom, 1)
    assert third[0].attempts == 3
    await broker.ack(third)


async def test_a_bounced_message_is_handed_on_not_hot_looped(broker: AMQPBroker, cnf: Config) -> None:
    """A consumer that cannot run a message requeues it with a delay; when it comes back to that same
    consumer it is handed to the next consumer at once, else (alone) it waits the delay again."""
    other = AMQPBroker(cnf)
    try:
        body = await send(broker, sig(1))
        [d] = await fetch_n(broker, cnf.default_queue, 1)
        await other.fetch(cnf.default_queue, 1, 0)  # a second consumer (that can run it) joins
        await broker.requeue([d], delay=0.3)
        got_here = await broker.fetch(cnf.default_queue, 1, 1.5)
        if got_here:  # round-robin brought it back to the consumer that bounced it: handed on
            await broker.requeue(got_here, delay=0.3)
        got_there = await fetch_n(other, cnf.default_queue, 1, 3.0)
        assert [x.body for x in got_there] == [body]
        await other.ack(got_there)
    finally:
        await other.close()
    # Alone, a message bounced with a 0.3 s delay comes back at most twice per delay (a return to the
    # consumer that bounced it is handed on at once, then it waits), not thousands of times.
    await send(broker, sig(2))
    deliveries = 0
    started = time.monotonic()
    while deliveries < 4:
        assert time.monotonic() - started < 30, "the bounced message stopped coming back"
        got = await broker.fetch(cnf.default_queue, 1, 0.1)
        deliveries += len(got)
        if got:
            await broker.requeue(got, delay=0.3)
    elapsed = time.monotonic() - started
    assert deliveries <= 2 * elapsed / 0.25 + 2, f"{deliveries} deliveries in {elapsed:.2f} s: a hot loop"


# --- settling and inspection ------------------------------------------------------------------


async def test_out_of_order_acks_settle_exactly_those(broker: AMQPBroker, cnf: Config) -> None:
    sent = [await send(broker, sig(i)) for i in range(6)]
    got = await fetch_n(broker, cnf.default_queue, 6)
    assert [x.body for x in got] == sent
    await broker.ack([got[5], got[1], got[3]])  # not contiguous: no multiple-ack may cover 0, 2, 4
    await broker.ack([got[0]])  # now 0 and 1 are contiguous
    await broker.close()  # 2 and 4 were never acked: RabbitMQ requeues them
    again = await fetch_n(broker, cnf.default_queue, 2)
    assert [x.body for x in again] == [sent[2], sent[4]]
    assert all(x.redelivered for x in again)
    await broker.ack(again)


async def test_prefetch_follows_the_batch_size(broker: AMQPBroker, cnf: Config, admin: Admin) -> None:
    for i in range(20):
        await send(broker, sig(i))
    got = await fetch_n(broker, cnf.default_queue, 4)
    await asyncio.sleep(0.2)
    assert len(got) == 4
    assert await admin.count(cnf.default_queue) == 16  # nothing more is held unacked
    await broker.ack(got)


async def test_pending_does_not_consume_or_reorder(broker: AMQPBroker, cnf: Config) -> None:
    sent = [await send(broker, sig(i)) for i in range(40)]
    for _ in range(3):
        assert await broker.pending(cnf.default_queue) == sent
    got = await fetch_n(broker, cnf.default_queue, 40)
    assert [x.body for x in got] == sent
    await broker.ack(got)
    assert await broker.pending(cnf.default_queue) == []
    assert await broker.pending("no_such_queue_at_all") == []


async def test_dead_letter_keeps_reason_and_source(broker: AMQPBroker, cnf: Config, admin: Admin) -> None:
    body = await send(broker, sig(1))
    [d] = await fetch_n(broker, cnf.default_queue, 1)
    await broker.dead_letter(d, "not valid JSON")
    assert await broker.dead_letters() == [(body, "not valid JSON")]
    assert await broker.dead_letters() == [(body, "not valid JSON")]  # reading does not consume
    [msg] = await admin.peek(f"{cnf.default_queue}.dead_letters")
    assert msg.header.properties.headers[REASON_HEADER] == "not valid JSON"
    assert msg.header.properties.headers[SOURCE_HEADER] == cnf.default_queue
    assert await admin.count(cnf.default_queue) == 0


async def test_deleted_queue_is_declared_again(broker: AMQPBroker, cnf: Config, admin: Admin) -> None:
    await send(broker, sig(1))
    await broker.ack(await fetch_n(broker, cnf.default_queue, 1))
    ch = await admin.channel()
    await ch.queue_delete(cnf.default_queue)
    await ch.close()
    body = await send(broker, sig(2))  # the cached declaration is stale: returned, declared, resent
    got = await fetch_n(broker, cnf.default_queue, 1)  # the cancelled consumer comes back
    assert [x.body for x in got] == [body]


# --- connections -----------------------------------------------------------------------------


async def test_failover_skips_an_unreachable_first_url(admin: Admin) -> None:
    cnf = make_cnf()
    cnf.broker = f"amqp://guest:guest@127.0.0.1:1/|{AMQP_URL}"
    cnf.multiple_broker_separator = "|"
    admin.track(cnf)
    b = AMQPBroker(cnf)
    try:
        body = await send(b, sig(1))
        assert [x.body for x in await fetch_n(b, cnf.default_queue, 1)] == [body]
        state = b._states.current()
        assert state is not None and state.link.url_index == 1
    finally:
        await b.close()


async def test_unreachable_broker_fails_with_a_clear_error() -> None:
    cnf = make_cnf(url="amqp://user:secret@127.0.0.1:1/")
    b = AMQPBroker(cnf)
    b.retry_window = 0.3
    with pytest.raises(BrokerError, match=r"not reachable at amqp://\*\*\*@127\.0\.0\.1:1/") as info:
        await send(b, sig(1))
    assert "secret" not in str(info.value)
    assert await b.fetch(cnf.default_queue, 1, 0.2) == []  # a worker keeps polling instead
    await b.close()


async def test_wrong_credentials_fail_at_once(admin: Admin) -> None:
    b = AMQPBroker(make_cnf(url=AMQP_URL.replace("guest:guest@", "guest:wrong@")))
    start = time.monotonic()
    with pytest.raises(BrokerError, match="authentication failed"):
        await send(b, sig(1))
    assert time.monotonic() - start < 5  # retrying within the 30 s window cannot help
    await b.close()


def test_bad_urls_fail_at_construction() -> None:
    with pytest.raises(ConfigError, match="config field broker"):
        AMQPBroker(Config(broker="amqp://a|redis://b", multiple_broker_separator="|"))


async def test_connection_drop_reconnects_and_redelivers(broker: AMQPBroker, cnf: Config) -> None:
    sent = [await send(broker, sig(i)) for i in range(3)]
    held = await fetch_n(broker, cnf.default_queue, 3)
    state = broker._states.current()
    assert state is not None
    conn = await state.link.connection()
    await conn.close(amqp_exc.ConnectionClosed(320, "test: connection dropped"))
    await broker.ack(held)  # stale deliveries: ignored, RabbitMQ requeued them
    more = await send(broker, sig(9))  # reconnects
    got = await fetch_n(broker, cnf.default_queue, 4)
    assert sorted(x.body for x in got) == sorted([*sent, more])
    assert all(x.redelivered for x in got if x.body in sent)
    await broker.ack(got)


async def test_used_from_another_event_loop_and_the_sync_facade(broker: AMQPBroker, cnf: Config) -> None:
    body = await send(broker, sig(1))
    pending = await asyncio.to_thread(broker.get_pending_tasks)
    assert [s.uuid for s in pending] == ["task_1"]
    assert await broker.pending(cnf.default_queue) == [body]


VICTIM = """
import asyncio, sys
from machinery.drivers.amqp.broker import AMQPBroker
from machinery.config import Config

async def main() -> None:
    cnf = Config.from_mapping({"broker": sys.argv[1], "default_queue": sys.argv[2],
                               "amqp": {"exchange": sys.argv[3], "binding_key": sys.argv[4]}})
    broker = AMQPBroker(cnf)
    got = []
    while len(got) < 5:
        got += await broker.fetch(cnf.default_queue, 5 - len(got), 1.0)
    print("holding", len(got), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_sigkilled_consumer_tasks_are_redelivered(broker: AMQPBroker, cnf: Config, tmp_path: Path) -> None:
    sent = [await send(broker, sig(i)) for i in range(5)]
    script = tmp_path / "victim.py"
    script.write_text(VICTIM)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent.parent / "src")}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(script), AMQP_URL, cnf.default_queue, cnf.amqp.exchange, cnf.amqp.binding_key,
        env=env, stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line.decode().strip() == "holding 5"
        assert await broker.fetch(cnf.default_queue, 5, 0.3) == []  # held by a live consumer
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    got = await fetch_n(broker, cnf.default_queue, 5)
    assert sorted(x.body for x in got) == sorted(sent)
    assert all(x.redelivered and x.attempts == 2 for x in got)
    await broker.ack(got)
