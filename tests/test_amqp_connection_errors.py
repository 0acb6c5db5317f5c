"""RabbitMQ connection trouble: one clear line per dial, spaced by a growing back-off, naming the
host and the cause (connection refused, unknown host, missing virtual host, access refused), and
none of aiormq's own lines for the dials we report."""

from __future__ import annotations

import asyncio
import logging
import re
import time

import aiormq
import pytest

from amqp_support import AMQP_URL, PrivateRabbit, private_rabbit_node, require_rabbit
from machinery import Config, Server, Signature
from machinery.drivers.amqp.connection import HandshakeRefused, explain
from machinery.errors import BrokerError
from machinery.tasks.signature import encode_signature
from naming import unique
from servers import free_port


def lines(caplog: pytest.LogCaptureFixture, logger: str, text: str = "") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith(logger) and text in r.getMessage()]


def test_causes_in_words() -> None:
    url = "amqp://bob:pw@rabbit.example:5673/jobs"
    assert explain(HandshakeRefused(530, "NOT_ALLOWED - vhost jobs not found"), url, 10) == (
        "virtual host 'jobs' does not exist (NOT_ALLOWED - vhost jobs not found); create it "
        "(rabbitmqctl add_vhost jobs) or fix the URL's path", True)
    assert explain(HandshakeRefused(530, "NOT_ALLOWED - access to vhost 'jobs' refused for user 'bob'"), url, 10) == (
        "access to virtual host 'jobs' refused for user 'bob' (NOT_ALLOWED - access to vhost 'jobs' refused for "
        "user 'bob'); grant it (rabbitmqctl set_permissions -p jobs bob '.*' '.*' '.*')", True)
    assert explain(HandshakeRefused(320, "CONNECTION_FORCED - shutdown"), url, 10) == (
        "RabbitMQ closed the connection: 320 CONNECTION_FORCED - shutdown", False)
    refused = aiormq.exceptions.AMQPConnectionError(111, "Connection refused")
    assert explain(refused, url, 10) == ("connection refused: nothing listens on rabbit.example:5673", False)
    assert explain(TimeoutError(), "amqps://h/", 10) == ("no answer from h:5671 within 10 s", False)


def test_a_wrong_port_is_one_line_per_retry_with_back_off(caplog: pytest.LogCaptureFixture) -> None:
    port = free_port()
    server = Server(Config(broker=f"amqp://guest:guest@127.0.0.1:{port}/", result_backend="memory://"))
    server.get_broker().retry_window = 4.0  # type: ignore[attr-defined]
    started = time.monotonic()
    with caplog.at_level(logging.INFO), pytest.raises(BrokerError) as err:
        server.send_task(Signature("add", [1]))
    took = time.monotonic() - started
    server.close()
    assert 3.9 < took < 8  # dials at about 0, 0.5, 1.5 and 3.5 s, then the window closes
    assert f"connection refused: nothing listens on 127.0.0.1:{port}" in str(err.value)
    warned = lines(caplog, "machinery", "cannot connect")
    assert [re.sub(r".*retrying in ", "", w) for w in warned] == ["0.5 s", "1 s", "2 s", "4 s"]
    assert all(f"amqp://***@127.0.0.1:{port}/: connection refused" in w for w in warned)
    assert lines(caplog, "aiormq", "") == [], "aiormq's own lines for our dials were let through"


def test_a_worker_on_a_wrong_port_backs_off(caplog: pytest.LogCaptureFixture) -> None:
    from machinery.testing import running_worker

    server = Server(Config(broker=f"amqp://guest:guest@127.0.0.1:{free_port()}/", result_backend="memory://"))
    with caplog.at_level(logging.INFO), running_worker(server):
        time.sleep(5)
    server.close()
    warned = lines(caplog, "machinery", "cannot connect")
    assert 3 <= len(warned) <= 5, warned  # dials at about 0, 0.5, 1.5, 3.5 s: not every 0.5 s
    assert lines(caplog, "aiormq", "") == []


def test_other_aiormq_users_keep_their_lines(caplog: pytest.LogCaptureFixture) -> None:
    async def dial() -> None:
        with pytest.raises(ConnectionError):
            await aiormq.connect(f"amqp://guest:guest@127.0.0.1:{free_port()}/")

    Server(Config(broker="amqp://guest:guest@127.0.0.1:1/", result_backend="memory://")).close()
    with caplog.at_level(logging.ERROR):
        asyncio.run(dial())
    assert lines(caplog, "aiormq", "error when creating transport")


@pytest.mark.amqp
def test_a_missing_virtual_host_fails_at_once_naming_it() -> None:
    asyncio.run(require_rabbit())
    vhost = f"machinery_missing_{unique()}"  # never created
    server = Server(Config(broker=f"{AMQP_URL.rstrip('/')}/{vhost}", result_backend="memory://"))
    started = time.monotonic()
    with pytest.raises(BrokerError) as err:
        server.send_task(Signature("add", [1]))
    server.close()
    assert time.monotonic() - started < 5
    assert f"virtual host {vhost!r} does not exist" in str(err.value)
    assert f"rabbitmqctl add_vhost {vhost}" in str(err.value)


rabbit = pytest.fixture(scope="module", name="rabbit")(private_rabbit_node)


@pytest.mark.amqp
@pytest.mark.slow
def test_a_virtual_host_the_user_may_not_use(rabbit: PrivateRabbit) -> None:
    assert rabbit.ctl("add_vhost", "locked").returncode == 0  # guest has no permissions there
    from machinery.drivers.amqp.broker import AMQPBroker

    broker = AMQPBroker(Config(broker=f"{rabbit.url}locked", result_backend="memory://"))
    sig = Signature("add", [1])
    with pytest.raises(BrokerError) as err:
        asyncio.run(broker.publish(sig, encode_signature(sig), None))
    assert "access to virtual host 'locked' refused for user 'guest'" in str(err.value)


def test_without_aiormq_s_handshake_step_the_plain_connection_is_used(monkeypatch: pytest.MonkeyPatch) -> None:
    import aiormq

    from machinery.drivers.amqp import internals

    assert internals.connection_class() is not aiormq.Connection  # this release: the reason is kept
    assert issubclass(internals.connection_class(), aiormq.Connection)
    monkeypatch.delattr(aiormq.Connection, "_rpc")
    assert internals.connection_class() is aiormq.Connection
