"""Pub/Sub-specific behaviour of the GCP Pub/Sub broker (the shared semantics are in tests/contract)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any

import pytest
from google.api_core.exceptions import NotFound

from machinery import Config, Server
from machinery.config import GCPPubSubConfig
from machinery.drivers.broker import Delivery
from machinery.drivers.registry import make_broker
from machinery.errors import BrokerError, ConfigError
from machinery.tasks.signature import Signature
from pubsub_emulator import PROJECT, delete_resources, emulator_host, raw_clients

pytestmark = pytest.mark.gcppubsub


# --- URL and config (no emulator needed) -------------------------------------------------------


@pytest.mark.parametrize("url,message", [
    ("gcppubsub://proj", "gcppubsub://PROJECT/SUBSCRIPTION"),
    ("gcppubsub:///sub", "gcppubsub://PROJECT/SUBSCRIPTION"),
    ("gcppubsub://proj/a/b", "gcppubsub://PROJECT/SUBSCRIPTION"),
    ("gcppubsub://proj/sub?x=1", "gcppubsub://PROJECT/SUBSCRIPTION"),
    ("gcppubsub://proj/1sub", "not a valid Pub/Sub name"),
    ("gcppubsub://proj/googsub", "may not start with 'goog'"),
])
def test_bad_urls_name_the_field(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match="config field broker") as info:
        make_broker(Config(broker=url))
    assert message in str(info.value)


def test_config_is_checked_at_construction() -> None:
    from machinery.drivers.gcppubsub.broker import PubSubBroker

    broker = make_broker(Config(broker="gcppubsub://proj/sub"))
    assert isinstance(broker, PubSubBroker)
    assert broker.target.project == "proj" and broker.target.subscription == "sub"
    assert broker.lease_seconds == 30.0
    with pytest.raises(ConfigError, match=r"gcppubsub\.lease_seconds"):
        Config(gcppubsub={"lease_seconds": 0})
    with pytest.raises(ConfigError, match=r"gcppubsub\.lease_seconds"):
        Config(gcppubsub={"lease_seconds": 601})
    with pytest.raises(ConfigError, match=r"gcppubsub\.max_extension"):
        Config(gcppubsub={"max_extension": -1})
    with pytest.raises(ConfigError, match=r"gcppubsub\.client"):
        make_broker(Config(broker="gcppubsub://proj/sub", gcppubsub=GCPPubSubConfig(client=object())))
    with pytest.raises(ConfigError, match="config field default_queue"):
        make_broker(Config(broker="gcppubsub://proj/sub", default_queue="has space"))
    assert Config.from_env({"GCPPUBSUB_LEASE_SECONDS": "45"}).gcppubsub.lease_seconds == 45


# --- against the emulator ----------------------------------------------------------------------


@pytest.fixture
def names() -> Iterator[str]:
    """A unique prefix for this test's topics and subscriptions, deleted afterwards."""
    host = emulator_host()
    ns = f"pt_{uuid.uuid4().hex[:12]}"
    yield ns
    delete_resources(host, PROJECT, ns)


def cnf_for(ns: str, **pubsub: Any) -> Config:
    return Config(broker=f"gcppubsub://{PROJECT}/{ns}_sub", result_backend="memory", default_queue=f"{ns}_tasks",
                  gcppubsub=GCPPubSubConfig(**pubsub))


@pytest.fixture
async def broker(names: str) -> AsyncIterator[Any]:
    from machinery.drivers.gcppubsub.broker import PubSubBroker

    b = PubSubBroker(cnf_for(names))
    yield b
    await b.close()


def raw_pull(subscription: str, n: int = 10) -> list[Any]:
    """Pull (and ack) straight from the emulator, as a Go consumer would receive."""
    with raw_clients(emulator_host()) as (_, sub):
        path = f"projects/{PROJECT}/subscriptions/{subscription}"
        resp = sub.pull(request={"subscription": path, "max_messages": n}, timeout=5)
        if resp.received_messages:
            sub.acknowledge(subscription=path, ack_ids=[m.ack_id for m in resp.received_messages])
        return [m.message for m in resp.received_messages]


async def test_wire_format_is_gos(broker: Any, names: str) -> None:
    """Data = the Signature JSON, no attributes, on the topic DefaultQueue, read through the URL's subscription."""
    sig = Signature("add", [1, 2], routing_key=broker.cnf.default_queue)
    await broker.publish(sig, sig.to_json(), None)
    (msg,) = await asyncio.to_thread(raw_pull, f"{names}_sub")
    assert bytes(msg.data) == sig.to_json()
    assert dict(msg.attributes) == {}


async def test_go_producer_message_is_fetched(broker: Any, names: str) -> None:
    """A message published as Go does (no attributes) is an ordinary delivery."""
    await broker.fetch(broker.cnf.default_queue, 1, 0.0)  # creates the topic and subscription
    body = Signature("add", [1], routing_key=broker.cnf.default_queue).to_json()
    topic = f"projects/{PROJECT}/topics/{names}_tasks"
    with raw_clients(emulator_host()) as (pub, _):
        deadline = time.monotonic() + 10
        while True:  # under load the topic can still be on its way when the fetch returns
            try:
                pub.get_topic(topic=topic)
                break
            except NotFound:
                assert time.monotonic() < deadline, "the fetch did not create the topic"
                await asyncio.sleep(0.05)
        pub.publish(topic=topic, messages=[{"data": body}])
    got = await broker.fetch(broker.cnf.default_queue, 10, 5.0)
    assert [d.body for d in got] == [body]
    await broker.ack(got)


async def test_custom_queue_reads_the_subscription_named_like_its_topic(broker: Any, names: str) -> None:
    queue = f"{names}_custom"
    sig = Signature("add", [1], routing_key=queue)
    await broker.publish(sig, sig.to_json(), None)
    with raw_clients(emulator_host()) as (_, sub):
        info = sub.get_subscription(subscription=f"projects/{PROJECT}/subscriptions/{queue}")
    assert info.topic == f"projects/{PROJECT}/topics/{queue}"
    got = await broker.fetch(queue, 10, 5.0)
    assert [d.body for d in got] == [sig.to_json()]
    assert got[0].queue == queue
    await broker.ack(got)


async def test_eta_does_not_block_the_sender(broker: Any, names: str) -> None:
    """Go's Publish sleeps until the ETA; here the message is sent at once and held by the consumer."""
    eta_ns = time.time_ns() + 2_500_000_000
    sig = Signature("add", [1], routing_key=broker.cnf.default_queue, eta=datetime.fromtimestamp(eta_ns / 1e9, UTC))
    started = time.monotonic()
    await broker.publish(sig, sig.to_json(), eta_ns)
    assert time.monotonic() - started < 1.0
    assert await broker.fetch(broker.cnf.default_queue, 10, 0.5) == []
    got = await broker.fetch(broker.cnf.default_queue, 10, 5.0)
    assert [d.body for d in got] == [sig.to_json()]
    assert time.time_ns() >= eta_ns
    assert time.time_ns() - eta_ns < 1_500_000_000, "held far past its ETA"
    await broker.ack(got)


async def test_message_due_within_a_second_is_kept_not_held(broker: Any, names: str) -> None:
    """Due after the fetch's wait but within the shortest hold (1 s): the fetch keeps it until its ETA.
    A hold would make it late and send it through another delivery, which a stalled service can lose
    to a Pull's deadline for the whole ack deadline (the flaky test_delay)."""
    queue = broker.cnf.default_queue
    await broker.fetch(queue, 1, 0.0)  # creates the subscription; its Pull stays in flight
    eta_ns = time.time_ns() + 800_000_000
    sig = Signature("add", [1], routing_key=queue, eta=datetime.fromtimestamp(eta_ns / 1e9, UTC))
    await broker.publish(sig, sig.to_json(), eta_ns)
    got: list[Delivery] = []
    give_up = time.monotonic() + 10
    while not got and time.monotonic() < give_up:
        got = await broker.fetch(queue, 10, 0.2)  # each wait ends well before the ETA
    assert [d.body for d in got] == [sig.to_json()]
    assert time.time_ns() >= eta_ns
    assert (got[0].attempts, got[0].redelivered) == (1, False), "held and delivered again"
    await broker.ack(got)


async def test_delayed_message_carries_its_eta_attribute(broker: Any, names: str) -> None:
    eta_ns = time.time_ns() + 60_000_000_000
    sig = Signature("add", [1], routing_key=broker.cnf.default_queue)
    await broker.publish(sig, sig.to_json(), eta_ns)
    (msg,) = await asyncio.to_thread(raw_pull, f"{names}_sub")
    assert dict(msg.attributes) == {"machinery_eta_ns": str(eta_ns)}


async def test_bad_routing_key_is_a_clear_error(broker: Any) -> None:
    sig = Signature("add", [1], routing_key="no spaces allowed")
    with pytest.raises(BrokerError, match=r"routing key .* not a valid Pub/Sub name"):
        await broker.publish(sig, sig.to_json(), None)


async def test_missing_resources_are_not_created_outside_the_emulator(broker: Any, names: str) -> None:
    broker.create_missing = False
    sig = Signature("add", [1], routing_key=broker.cnf.default_queue)
    with pytest.raises(BrokerError, match=f"Create topic '{names}_tasks' and a subscription '{names}_sub'"):
        await broker.publish(sig, sig.to_json(), None)
    with pytest.raises(BrokerError, match=f"Create topic '{names}_other'"):
        await broker.fetch(f"{names}_other", 1, 0.5)


async def test_dead_letter_topic_keeps_reason_and_queue(broker: Any, names: str) -> None:
    sig = Signature("add", [1], routing_key=broker.cnf.default_queue)
    await broker.publish(sig, b"not json", None)
    got = await broker.fetch(broker.cnf.default_queue, 10, 5.0)
    await broker.dead_letter(got[0], "undecodable: " + "x" * 2000)
    (msg,) = await asyncio.to_thread(raw_pull, f"{names}_tasks.dead_letters")
    assert bytes(msg.data) == b"not json"
    assert msg.attributes["machinery_queue"] == f"{names}_tasks"
    assert msg.attributes["machinery_reason"].startswith("undecodable: xxx")
    assert len(msg.attributes["machinery_reason"].encode()) <= 1024
    assert await broker.fetch(broker.cnf.default_queue, 10, 1.2) == []


async def test_pubsub_dead_letter_policy_forwards_with_a_reason(broker: Any, names: str) -> None:
    """Subscriptions the broker creates carry a dead-letter policy: a message nobody settles ends there."""
    broker.max_delivery_attempts = 5
    sig = Signature("add", [1], routing_key=broker.cnf.default_queue)
    await broker.publish(sig, sig.to_json(), None)
    attempts = []
    for _ in range(5):
        got = await broker.fetch(broker.cnf.default_queue, 10, 5.0)
        assert len(got) == 1
        attempts.append(got[0].attempts)
        await broker.requeue(got)
    assert attempts == [1, 2, 3, 4, 5]
    assert await broker.fetch(broker.cnf.default_queue, 10, 1.0) == []
    dead: list[tuple[bytes, str]] = []
    deadline = time.monotonic() + 10
    while not dead and time.monotonic() < deadline:
        dead = await broker.dead_letters()
    assert [body for body, _ in dead] == [sig.to_json()]
    assert "too many delivery attempts" in dead[0][1]


async def test_max_extension_stops_renewal(names: str) -> None:
    """Go's MaxExtension: a message is not extended past it, so another worker may take it."""
    from machinery.drivers.gcppubsub.broker import PubSubBroker

    cnf = cnf_for(names, lease_seconds=1, max_extension=1.5)
    broker, other = PubSubBroker(cnf), PubSubBroker(cnf)
    try:
        sig = Signature("add", [1], routing_key=cnf.default_queue)
        await broker.publish(sig, sig.to_json(), None)
        got: list[Delivery] = await broker.fetch(cnf.default_queue, 10, 5.0)
        fetched = time.monotonic()
        again: list[Delivery] = []
        while not again and time.monotonic() - fetched < 6:
            await broker.renew(got)
            again = await other.fetch(cnf.default_queue, 10, 0.3)
        assert [d.body for d in again] == [sig.to_json()]
        assert time.monotonic() - fetched >= 1.5
        await other.ack(again)
    finally:
        await broker.close()
        await other.close()


async def answered_while_nobody_waits(broker: Any, sig: Signature) -> Any:
    """Leave a Pull in flight (a cancelled fetch), publish, and wait until that Pull brings the message.

    The Pull runs to 6 s (the emulator answers an empty one about 1 s before), so the message comes
    in its answer, at a moment no fetch waits for it: the race the contract tests hit at random.
    """
    queue = broker.cnf.default_queue
    sub = broker._sub_path(queue)
    waiting = asyncio.ensure_future(broker.fetch(queue, 10, 5.0))
    deadline = time.monotonic() + 10
    while not (sub in broker._link().pulls and broker._link().pulls[sub].waiters):
        assert time.monotonic() < deadline, "the fetch never started its Pull"
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.2)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    pull = broker._link().pulls[sub]
    assert not pull.task.done() and pull.waiters == 0
    await broker.publish(sig, sig.to_json(), None)
    await asyncio.wait({pull.task}, timeout=5)
    assert len(pull.task.result().received_messages) == 1, "the Pull in flight did not bring the message"
    await asyncio.sleep(0)  # its done callbacks have run
    return pull


async def test_answer_nobody_waited_for_is_adopted_without_another_delivery(broker: Any, names: str) -> None:
    """The next fetch takes the kept answer: no hand-back, which Pub/Sub would count as a delivery."""
    from machinery.drivers.gcppubsub.broker import PubSubBroker

    sig = Signature("add", [1], routing_key=broker.cnf.default_queue)
    await answered_while_nobody_waits(broker, sig)
    started = time.monotonic()
    got = await broker.fetch(broker.cnf.default_queue, 10, 2.0)
    assert time.monotonic() - started < 1.0
    assert [d.body for d in got] == [sig.to_json()]
    assert (got[0].attempts, got[0].redelivered) == (1, False)
    other = PubSubBroker(cnf_for(names))
    try:
        assert await other.fetch(broker.cnf.default_queue, 10, 1.2) == []  # leased to us, not handed back
    finally:
        await other.close()
    await broker.ack(got)


@pytest.mark.parametrize("how", ["grace", "close"])
async def test_answer_nobody_adopts_goes_back(broker: Any, names: str, how: str) -> None:
    """Kept past the grace, or when the broker closes, the answer goes back (not left to its 30 s deadline)."""
    from machinery.drivers.gcppubsub.broker import PubSubBroker

    broker.keep_grace = 0.3 if how == "grace" else 4.0
    sig = Signature("add", [1], routing_key=broker.cnf.default_queue)
    pull = await answered_while_nobody_waits(broker, sig)
    if how == "grace":
        await asyncio.sleep(0.5)
        assert pull.claimed
    await broker.close()
    other = PubSubBroker(cnf_for(names))
    try:
        got = await other.fetch(broker.cnf.default_queue, 10, 3.0)  # before a 4 s grace would end
        assert [d.body for d in got] == [sig.to_json()]
        assert got[0].attempts == 2
        await other.ack(got)
    finally:
        await other.close()


async def test_unreachable_service_is_a_broker_error(names: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    from machinery.drivers.gcppubsub.broker import PubSubBroker

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"127.0.0.1:{port}")
    broker = PubSubBroker(cnf_for(names))
    broker.retry_window = 0.5
    broker.create_missing = False  # as against the real service
    try:
        started = time.monotonic()
        with pytest.raises(BrokerError, match="Pub/Sub pull"):
            await broker.fetch(broker.cnf.default_queue, 1, 0.5)
        with pytest.raises(BrokerError, match="Pub/Sub publish"):
            sig = Signature("add", [1])
            await broker.publish(sig, sig.to_json(), None)
        assert time.monotonic() - started < 10
    finally:
        await broker.close()


def test_server_sync_facade(names: str) -> None:
    """The sync facade runs the broker on the Server's own loop."""
    server = Server(cnf_for(names))
    try:
        assert server.get_broker().get_pending_tasks() == []
        assert server.get_broker().get_delayed_tasks() == []
        res = server.send_task(Signature("add", [1, 2]))
        (msg,) = raw_pull(f"{names}_sub")
        assert Signature.from_json(bytes(msg.data)).uuid == res.signature.uuid
    finally:
        server.close()
