"""SQS broker specifics on the run's moto server: Go's wire format, FIFO queues, ETAs beyond SQS's
15-minute limit, the visibility heartbeat, URL forms, and a Server + Worker end to end."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

import sqs_support
from backend_e2e import check_task_and_chord, worker_server
from machinery import Config, Server, Signature
from machinery.config import SQSConfig
from machinery.drivers.sqs.broker import ETA_ATTR, SQSBroker, dead_letter_queue
from machinery.drivers.sqs.client import DEFAULT_REGION, parse_sqs_url, send_batches
from machinery.errors import BrokerError, ConfigError
from moto_server import MOTO_REGION, moto_endpoint

MINUTE_NS = 60 * 1_000_000_000


@pytest.fixture
def cnf() -> Iterator[Config]:
    cnf = sqs_support.sqs_config()
    yield cnf
    asyncio.run(sqs_support.delete_queues(cnf.default_queue))


@pytest.fixture
async def broker(cnf: Config) -> AsyncIterator[SQSBroker]:
    broker = SQSBroker(cnf, cnf.broker)
    yield broker
    await broker.close()


async def raw_client() -> Any:
    """A plain aiobotocore client on the emulator, to look at the wire."""
    return sqs_support.session().create_client("sqs", endpoint_url=moto_endpoint(), region_name=MOTO_REGION)


# --- URLs and config -------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "base", "region", "endpoint", "account"), [
    ("https://sqs.eu-west-1.amazonaws.com/123456789012", "https://sqs.eu-west-1.amazonaws.com/123456789012",
     "eu-west-1", None, ""),
    ("https://eu-central-1.queue.amazonaws.com/1/", "https://eu-central-1.queue.amazonaws.com/1", "eu-central-1",
     None, ""),
    ("http://localhost:4566/000000000000", "http://localhost:4566/000000000000", "ap-south-1",
     "http://localhost:4566", ""),
    ("https://sqs.us-east-2.localhost.localstack.cloud:4566/000000000000",
     "https://sqs.us-east-2.localhost.localstack.cloud:4566/000000000000", "us-east-2",
     "https://sqs.us-east-2.localhost.localstack.cloud:4566", ""),
    ("https://sqs.us-west-2.amazonaws.com", None, "us-west-2", None, ""),
    ("sqs://", None, "ap-south-1", None, ""),
    ("sqs://us-west-1/123456789012", None, "us-west-1", None, "123456789012"),
])
def test_url_forms(url: str, base: str | None, region: str, endpoint: str | None, account: str) -> None:
    target = parse_sqs_url(url, "ap-south-1")
    assert (target.base_url, target.region, target.endpoint_url, target.account) == (base, region, endpoint, account)


def test_region_falls_back_to_us_east_1() -> None:
    assert parse_sqs_url("http://localhost:5000/1", None).region == DEFAULT_REGION


@pytest.mark.parametrize(("make", "field"), [
    (lambda: SQSBroker(Config(sqs=SQSConfig(visibility_timeout=0)), "https://sqs.us-east-1.amazonaws.com/1"),
     "sqs.visibility_timeout"),
    (lambda: SQSBroker(Config(sqs=SQSConfig(client=object())), "https://sqs.us-east-1.amazonaws.com/1"),
     "sqs.client"),
    (lambda: SQSBroker(Config(), "sqs://not a region/1"), "config field broker"),
    (lambda: SQSBroker(Config(), "https://sqs.us-east-1.amazonaws.com/1?x=1"), "config field broker"),
])
def test_bad_config_names_the_field(make: Any, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        make()


def test_send_batches_split_by_count_and_size() -> None:
    small = [{"MessageBody": "x"} for _ in range(25)]
    assert [len(b) for b in send_batches(small)] == [10, 10, 5]
    big = [{"MessageBody": "x" * 100_000} for _ in range(5)]
    assert [len(b) for b in send_batches(big)] == [2, 2, 1]


def test_dead_letter_queue_names() -> None:
    assert dead_letter_queue("tasks") == "tasks_dead_letters"
    assert dead_letter_queue("tasks.fifo") == "tasks_dead_letters.fifo"


# --- Go's wire format ------------------------------------------------------------------------


async def test_body_is_the_signature_json_and_a_go_message_is_read(cnf: Config, broker: SQSBroker) -> None:
    sig = Signature("add", [1, 2])
    await broker.publish(sig, sig.to_json(), None)
    url = f"{cnf.broker}/{cnf.default_queue}"
    async with await raw_client() as client:
        got = await client.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"])
        (message,) = got["Messages"]
        assert message["Body"].encode() == sig.to_json()
        assert "MessageAttributes" not in message  # Go sends none and reads none
        await client.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
        go_body = sig.to_json().decode().replace('"Name":"add"', '"Name":"from_go"')
        await client.send_message(QueueUrl=url, MessageBody=go_body)
    (d,) = await broker.fetch(cnf.default_queue, 10, 2.0)
    assert d.body == go_body.encode() and d.attempts == 1 and not d.redelivered
    await broker.ack([d])


# --- FIFO queues -----------------------------------------------------------------------------


async def test_fifo_group_id_dedup_and_retry(cnf: Config, broker: SQSBroker) -> None:
    queue = f"{cnf.default_queue}.fifo"
    bare = Signature("add", [1], routing_key=queue, uuid="task_fifo")
    with pytest.raises(BrokerError, match="broker_message_group_id"):
        await broker.publish(bare, bare.to_json(), None)

    sig = Signature("add", [1], routing_key=queue, broker_message_group_id="g1", uuid="task_fifo")
    await broker.publish(sig, sig.to_json(), None)
    await broker.publish(sig, sig.to_json(), None)  # same UUID: SQS drops the duplicate, as for Go
    got = await broker.fetch(queue, 10, 1.0)
    assert [d.body for d in got] == [sig.to_json()]
    assert got[0].extra["group"] == "g1"
    await broker.ack(got)

    # A retry republishes the same UUID with an ETA: not a duplicate, held until due (no DelaySeconds on FIFO).
    eta_ns = time.time_ns() + 1_500_000_000
    await broker.publish(sig, sig.to_json(), eta_ns)
    assert await broker.fetch(queue, 10, 0.3) == []
    again = await broker.fetch(queue, 10, 5.0)
    assert [d.body for d in again] == [sig.to_json()]
    assert time.time_ns() >= eta_ns
    await broker.ack(again)


async def test_fifo_dead_letter(cnf: Config, broker: SQSBroker) -> None:
    queue = f"{cnf.default_queue}.fifo"
    sig = Signature("add", [1], routing_key=queue, broker_message_group_id="g", uuid="task_dead")
    await broker.publish(sig, sig.to_json(), None)
    (d,) = await broker.fetch(queue, 10, 2.0)
    await broker.dead_letter(d, "bad \x00 input")
    assert await broker.dead_letters() == [(sig.to_json(), "bad \ufffd input")]
    assert await broker.fetch(queue, 10, 0.0) == []


# --- ETAs beyond 15 minutes ------------------------------------------------------------------


async def test_eta_beyond_15_minutes_is_sent_with_the_max_delay(cnf: Config, broker: SQSBroker) -> None:
    sig = Signature("add", [1])
    eta_ns = time.time_ns() + 20 * MINUTE_NS
    message = broker._message(sig, sig.to_json(), eta_ns, cnf.default_queue)
    assert message["DelaySeconds"] == 900
    assert message["MessageAttributes"] == {ETA_ATTR: {"DataType": "Number", "StringValue": str(eta_ns)}}
    assert message["MessageBody"].encode() == sig.to_json()  # a Go worker still reads it
    await broker.publish(sig, sig.to_json(), eta_ns)  # Go fails here: "Max AWS SQS delay exceeded"
    counts = await broker.queue_counts()
    assert counts["MessagesDelayed"] == 1
    short = broker._message(sig, sig.to_json(), time.time_ns() + 1_200_000_000, cnf.default_queue)
    assert short["DelaySeconds"] == 2 and "MessageAttributes" not in short  # rounded up: never early


async def test_message_received_before_its_eta_is_sent_again(cnf: Config, broker: SQSBroker) -> None:
    """What a consumer does when a long-ETA message surfaces after the 15-minute delay."""
    sig = Signature("add", [1])
    url = f"{cnf.broker}/{cnf.default_queue}"
    await broker.fetch(cnf.default_queue, 1, 0.0)  # creates the queue
    far = time.time_ns() + 20 * MINUTE_NS
    near = time.time_ns() + 1_200_000_000
    async with await raw_client() as client:
        for eta in (far, near):
            await client.send_message(QueueUrl=url, MessageBody=sig.to_json().decode(), MessageAttributes={
                ETA_ATTR: {"DataType": "Number", "StringValue": str(eta)}})
    assert await broker.fetch(cnf.default_queue, 10, 0.0) == []
    counts = await broker.queue_counts()
    assert counts == {"Messages": 0, "MessagesNotVisible": 0, "MessagesDelayed": 2}  # sent again, delayed
    got = await broker.fetch(cnf.default_queue, 10, 5.0)
    assert [d.body for d in got] == [sig.to_json()]
    assert time.time_ns() >= near
    assert got[0].attempts == 1  # a fresh message: the early receives do not count as attempts
    await broker.ack(got)
    assert (await broker.queue_counts())["MessagesDelayed"] == 1  # the far one is still waiting


# --- receiving -------------------------------------------------------------------------------


async def test_wait_time_seconds_lengthens_idle_polls_only(cnf: Config) -> None:
    cnf.sqs = SQSConfig(client=cnf.sqs.client, wait_time_seconds=2)
    broker = SQSBroker(cnf, cnf.broker)
    try:
        await broker.fetch(cnf.default_queue, 1, 0.0)
        start = time.monotonic()
        assert await broker.fetch(cnf.default_queue, 10, 1.0) == []
        assert time.monotonic() - start >= 1.9  # Go's receive_wait_time_seconds
        start = time.monotonic()
        assert await broker.fetch(cnf.default_queue, 10, 0.2) == []
        assert time.monotonic() - start < 1.0
    finally:
        await broker.close()


async def test_sqs_scheme_finds_queues_by_name_through_aws_endpoint_url(
    cnf: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint())  # botocore's own override, as for any AWS client
    broker = SQSBroker(cnf, f"sqs://{MOTO_REGION}/{sqs_support.ACCOUNT}")
    try:
        sig = Signature("add", [1])
        await broker.publish(sig, sig.to_json(), None)  # creates the queue, then finds it with GetQueueUrl
        got = await broker.fetch(cnf.default_queue, 10, 2.0)
        assert [d.body for d in got] == [sig.to_json()]
        assert got[0].extra["url"].endswith(f"/{sqs_support.ACCOUNT}/{cnf.default_queue}")
        await broker.ack(got)
    finally:
        await broker.close()


# --- with a worker ---------------------------------------------------------------------------


def test_worker_heartbeat_keeps_a_long_task_from_a_second_worker(cnf: Config, tmp_path: Path) -> None:
    """Visibility 2 s, task 4 s, two workers on the queue: the renew loop keeps it with the first."""
    cnf.sqs = SQSConfig(client=cnf.sqs.client, visibility_timeout=2)
    cnf.result_backend = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    runs: list[int] = []
    lock = threading.Lock()
    servers = [Server(cnf, broker=SQSBroker(cnf, cnf.broker)) for _ in range(2)]
    for server in servers:
        @server.task
        def slow(i: int) -> int:
            with lock:
                runs.append(i)
            time.sleep(4)
            return i

    workers = [s.new_worker(f"w{i}", 1) for i, s in enumerate(servers)]
    done = [w.launch_async() for w in workers]
    try:
        result = servers[0].send_task(Signature("slow", [7]))
        assert result.get(20) == 7
        assert runs == [7]
    finally:
        for w in workers:
            w.quit()
        for d in done:
            d.result(30)
        for s in servers:
            s.close()


def test_server_and_worker_run_a_task_and_a_chord(
    cnf: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """End to end through the registry (Go's http:// form), SQLite results, a worker of unlimited concurrency."""
    monkeypatch.setenv("DISABLE_STRICT_SQS_CHECK", "1")
    cnf.result_backend = f"sqlite:///{tmp_path / 'results.sqlite3'}"
    # Go's SQS broker receives nothing at concurrency 0
    with worker_server(cnf, "e2e", concurrency=0) as server:
        assert isinstance(server.get_broker(), SQSBroker)
        check_task_and_chord(server)
