"""AWS SQS broker, wire-compatible with Go Machinery's SQS broker, without its bugs.

Wire (as Go): the message body is the signature JSON, sent to the queue named by its RoutingKey (else
the default queue) at broker URL + "/" + name (see client.py for the URL forms). A queue whose name ends
in `.fifo` gets MessageGroupId = the signature's BrokerMessageGroupId (required) and
MessageDeduplicationId = its UUID (UUID + ":" + ETA in ns when it has an ETA, so that a retry, which
republishes the same UUID, is not dropped as a duplicate within SQS's 5-minute window). A standard
queue delays a message by its ETA with DelaySeconds (rounded up: never early).

Where Go fails or is wrong:

* An ETA beyond SQS's 15-minute limit does not fail the send: the message goes out with the maximum
  delay and a `machinery.eta` message attribute (Unix ns); a consumer that receives it early sends it
  again with the remaining delay (and deletes the early copy) until it is due. FIFO queues take no
  per-message delay, so there an early message is hidden with ChangeMessageVisibility until due
  (this holds back its message group, and each hold counts as a receive). The body is unchanged, so
  a Go worker can read it (it ignores the attribute and runs the task early).
* Every fetch receives up to min(10, max_count) messages, also for workers of unlimited concurrency.
* A message stays invisible for `lease_seconds` (sqs.visibility_timeout, else 30 s) and the worker's
  renew loop extends it with ChangeMessageVisibilityBatch while the task runs (Go v2's heartbeat,
  always on here, started once), so a long task is not handed to a second worker.
* A fetch cancelled mid-receive gives back what that receive brings (no receiver left running).
* requeue() is ChangeMessageVisibility to the delay; ack() is DeleteMessageBatch; dead_letter() sends
  the message to `<queue>_dead_letters` (`<name>_dead_letters.fifo` for FIFO queues) with the reason
  in the `machinery.reason` attribute, then deletes it. Queues that do not exist are created on the
  first publish or fetch (Go expects them to exist).

SQS cannot list a queue without receiving its messages (which counts as a delivery), so pending()
returns [] and the broker has no DelayedListing; queue_counts() gives SQS's approximate numbers instead.
"""

from __future__ import annotations

import asyncio
import base64
import math
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import DeadLetterListing, Leases
from machinery.drivers.sqs.client import (
    BATCH,
    MAX_DELAY,
    MAX_VISIBILITY,
    MAX_WAIT,
    Clients,
    LoopClient,
    batch_failures,
    chunks,
    is_missing_queue,
    parse_sqs_url,
    send_batches,
    session_factory,
    wrap_errors,
    xml_safe,
)
from machinery.errors import BrokerError, ConfigError
from machinery.log import get_logger

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.tasks.signature import Signature

T = TypeVar("T")

ETA_ATTR = "machinery.eta"
REASON_ATTR = "machinery.reason"
SOURCE_ATTR = "machinery.queue"
ENCODING_ATTR = "machinery.encoding"
DEAD_LETTER_SUFFIX = "_dead_letters"
DEFAULT_LEASE = 30.0
_SYSTEM_ATTRS = ["ApproximateReceiveCount", "MessageGroupId", "SentTimestamp"]
_PEEK_VISIBILITY = 10
_SLACK = 0.05  # seconds a fetch may overrun `wait` to long-poll whole seconds


def is_fifo(queue: str) -> bool:
    return queue.endswith(".fifo")


def dead_letter_queue(queue: str) -> str:
    """`<queue>_dead_letters`, keeping the `.fifo` suffix last (SQS requires it on FIFO queues)."""
    if is_fifo(queue):
        return queue[: -len(".fifo")] + DEAD_LETTER_SUFFIX + ".fifo"
    return queue + DEAD_LETTER_SUFFIX


class SQSBroker(Broker, Leases, DeadLetterListing):
    """AWS SQS broker, wire-compatible with Go Machinery's."""

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.broker)
        sessions = session_factory(cnf)
        self.target = parse_sqs_url(self.url, sessions().get_config_variable("region"))
        vt = cnf.sqs.visibility_timeout
        if vt == 0:
            raise ConfigError(
                "config field sqs.visibility_timeout: 0 would hand every fetched task to the next receive at once; "
                "use 1..43200 or leave it unset (30 s)"
            )
        #: the visibility timeout of fetched messages; the worker renews it while a task runs
        self.lease_seconds = float(vt) if vt else DEFAULT_LEASE
        self._clients = Clients(sessions, self.target)
        self._urls: dict[str, str] = {}
        self._dead_queues: set[str] = {dead_letter_queue(cnf.default_queue)}

    # --- queues ----------------------------------------------------------------------------

    def _visibility(self) -> int:
        return max(1, min(MAX_VISIBILITY, math.ceil(self.lease_seconds)))

    async def _queue_url(self, client: Any, queue: str) -> str:
        url = self._urls.get(queue)
        if url is None:
            if self.target.base_url is not None:
                url = f"{self.target.base_url}/{queue}"
            else:
                owner = {"QueueOwnerAWSAccountId": self.target.account} if self.target.account else {}
                url = str((await client.get_queue_url(QueueName=queue, **owner))["QueueUrl"])
            self._urls[queue] = url
        return url

    async def _create_queue(self, client: Any, queue: str) -> str:
        attributes = {"FifoQueue": "true"} if is_fifo(queue) else {}
        get_logger().warning("sqs broker: creating the missing queue %r", queue)
        url = str((await client.create_queue(QueueName=queue, Attributes=attributes))["QueueUrl"])
        if self.target.base_url is None:
            self._urls[queue] = url
        return self._urls.get(queue, url)

    async def _on_queue(self, queue: str, call: Callable[[Any, str], Awaitable[T]], create: bool) -> T:
        """Run call(client, queue_url); when the queue does not exist, create it (if asked) and retry once."""
        entry = await self._clients.get()
        client = entry.client
        try:
            return await call(client, await self._queue_url(client, queue))
        except Exception as exc:
            if not is_missing_queue(exc) or not create:
                raise
        return await call(client, await self._create_queue(client, queue))

    # --- publish ---------------------------------------------------------------------------

    def _route(self, sig: Signature) -> str:
        return sig.routing_key or self.cnf.default_queue

    def _message(self, sig: Signature, body: bytes, eta_ns: int | None, queue: str) -> dict[str, Any]:
        """The SendMessage parameters for one signature (also a SendMessageBatch entry, without Id)."""
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BrokerError(f"sqs broker publish to {queue!r}: the message body is not UTF-8 text: {exc}") from None
        out: dict[str, Any] = {"MessageBody": text}
        delay = 0.0 if eta_ns is None else (eta_ns - time.time_ns()) / 1e9
        if is_fifo(queue):
            if not sig.broker_message_group_id:
                raise BrokerError(
                    f"sqs broker publish to FIFO queue {queue!r}: task {sig.name} ({sig.uuid}) has no "
                    "broker_message_group_id (BrokerMessageGroupId), which SQS needs as the MessageGroupId"
                )
            out["MessageGroupId"] = sig.broker_message_group_id
            if sig.uuid:  # (without one, the queue must have content-based deduplication)
                out["MessageDeduplicationId"] = sig.uuid if eta_ns is None else f"{sig.uuid}:{eta_ns}"
            if delay > 0:  # no per-message delay on FIFO queues: the consumer holds it (see module doc)
                out["MessageAttributes"] = _eta_attribute(eta_ns)
            return out
        if delay > 0:
            out["DelaySeconds"] = min(MAX_DELAY, math.ceil(delay))
            if delay > MAX_DELAY:
                out["MessageAttributes"] = _eta_attribute(eta_ns)
        return out

    @wrap_errors
    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        queue = self._route(sig)
        message = self._message(sig, body, eta_ns, queue)
        await self._on_queue(queue, lambda c, url: c.send_message(QueueUrl=url, **message), create=True)

    @wrap_errors
    async def publish_many(self, items: Sequence[tuple[Signature, bytes, int | None]]) -> None:
        """SendMessageBatch per queue, in order; queues in parallel."""
        by_queue: dict[str, list[dict[str, Any]]] = {}
        for sig, body, eta_ns in items:
            queue = self._route(sig)
            by_queue.setdefault(queue, []).append(self._message(sig, body, eta_ns, queue))
        await asyncio.gather(*(self._send_all(q, entries) for q, entries in by_queue.items()))

    async def _send_all(self, queue: str, messages: list[dict[str, Any]]) -> None:
        for batch in send_batches(messages):
            entries = [{"Id": str(i), **m} for i, m in enumerate(batch)]

            def send(c: Any, url: str, entries: list[dict[str, Any]] = entries) -> Awaitable[dict[str, Any]]:
                result: Awaitable[dict[str, Any]] = c.send_message_batch(QueueUrl=url, Entries=entries)
                return result

            response = await self._on_queue(queue, send, create=True)
            failed = batch_failures(response)
            if failed:
                raise BrokerError(f"sqs broker publish to {queue!r}: {len(failed)} messages refused: {failed[0]}")

    # --- consume ---------------------------------------------------------------------------

    @wrap_errors
    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        """Long-poll in whole seconds up to `wait` (sqs.wait_time_seconds, when larger, for waits of >= 1 s).

        SQS waits in whole seconds only, so the part of `wait` under a second is slept and followed
        by one more short receive.
        """
        count = max(1, min(BATCH, max_count))
        deadline = time.monotonic() + max(0.0, wait)
        floor = self.cnf.sqs.wait_time_seconds if wait >= 1 else 0
        while True:
            left = deadline - time.monotonic() + _SLACK  # fetch(q, n, 1.0) long-polls 1 s, not 0
            poll = max(floor, min(MAX_WAIT, int(left)))
            floor = 0
            got = await self._receive_guarded(queue, count, poll)
            if got:
                return got
            left = deadline - time.monotonic()
            if left <= _SLACK:
                return []
            if left < 1:
                await asyncio.sleep(left)

    async def _receive_guarded(self, queue: str, count: int, poll: int) -> list[Delivery]:
        """Receive in a task of its own: if the caller is cancelled, what it brings is given back."""
        entry = await self._clients.get()
        task = asyncio.get_running_loop().create_task(self._receive(entry, queue, count, poll))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            if not task.cancelled():
                entry.adopt(asyncio.get_running_loop().create_task(self._give_back(task)))
            raise

    async def _give_back(self, task: asyncio.Task[list[Delivery]]) -> None:
        """Make what an abandoned receive brought visible again, within half its visibility timeout.

        A late give-back could reach a message that has meanwhile come back by itself and been
        received by another consumer (SQS may accept the stale receipt handle): that one would then
        be handed out twice. Past the deadline the message is left to come back on its own.
        """
        try:
            deliveries = await task
        except Exception:
            return
        if deliveries:
            try:
                async with asyncio.timeout(self._visibility() / 2):
                    await self._change_visibility(deliveries, 0)
            except Exception as exc:  # they come back when their visibility timeout ends
                get_logger().info("sqs broker: %d messages of a cancelled fetch come back on their own: %r",
                                  len(deliveries), exc)

    async def _receive(self, entry: LoopClient, queue: str, count: int, poll: int) -> list[Delivery]:
        used: list[str] = []

        def receive(c: Any, url: str) -> Awaitable[dict[str, Any]]:
            used.append(url)
            result: Awaitable[dict[str, Any]] = c.receive_message(
                QueueUrl=url, MaxNumberOfMessages=count, WaitTimeSeconds=poll,
                VisibilityTimeout=self._visibility(), MessageSystemAttributeNames=_SYSTEM_ATTRS,
                MessageAttributeNames=[ETA_ATTR],
            )
            return result

        response = await self._on_queue(queue, receive, create=True)
        url = used[-1]
        deliveries = [_delivery(m, queue, url) for m in response.get("Messages") or []]
        now = time.time_ns()
        early = [d for d in deliveries if d.extra["eta"] > now]
        if not early:
            return deliveries
        await self._hold(entry, queue, url, early)
        return [d for d in deliveries if d.extra["eta"] <= now]

    async def _hold(self, entry: LoopClient, queue: str, url: str, early: list[Delivery]) -> None:
        """Put messages received before their ETA out of sight again until it (see the module doc)."""
        client = entry.client
        now = time.time_ns()
        if is_fifo(queue):
            for batch in chunks(early):
                await client.change_message_visibility_batch(QueueUrl=url, Entries=[
                    {"Id": str(i), "ReceiptHandle": d.receipt,
                     "VisibilityTimeout": min(MAX_VISIBILITY, math.ceil((d.extra["eta"] - now) / 1e9))}
                    for i, d in enumerate(batch)])
            return
        for batch in chunks(early):
            entries = [{"Id": str(i), "MessageBody": d.body.decode(),
                        "DelaySeconds": min(MAX_DELAY, math.ceil((d.extra["eta"] - now) / 1e9)),
                        "MessageAttributes": _eta_attribute(d.extra["eta"])} for i, d in enumerate(batch)]
            response = await client.send_message_batch(QueueUrl=url, Entries=entries)
            failed = {int(f["Id"]) for f in response.get("Failed") or []}
            sent = [d for i, d in enumerate(batch) if i not in failed]  # the others come back to try again
            if sent:
                await self._delete(client, url, sent)

    # --- settle ----------------------------------------------------------------------------

    @wrap_errors
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        entry = await self._clients.get()
        for url, group in _by_url(deliveries).items():
            await self._delete(entry.client, url, group)

    async def _delete(self, client: Any, url: str, deliveries: Sequence[Delivery]) -> None:
        for batch in chunks(deliveries):
            response = await client.delete_message_batch(
                QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": d.receipt} for i, d in enumerate(batch)])
            failed = batch_failures(response)
            if failed:  # a stale receipt handle: the message was received again, it will run again
                get_logger().warning("sqs broker: %d deletes refused on %s: %s", len(failed), url, failed[0])

    @wrap_errors
    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Extend the visibility timeout of messages whose tasks still run (Go v2's heartbeat)."""
        await self._change_visibility(deliveries, self._visibility())

    @wrap_errors
    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        """Visible again after `delay` (rounded up to whole seconds, at most 12 h)."""
        await self._change_visibility(deliveries, min(MAX_VISIBILITY, max(0, math.ceil(delay))))

    async def _change_visibility(self, deliveries: Sequence[Delivery], seconds: int) -> None:
        entry = await self._clients.get()
        for url, group in _by_url(deliveries).items():
            for batch in chunks(group):
                response = await entry.client.change_message_visibility_batch(QueueUrl=url, Entries=[
                    {"Id": str(i), "ReceiptHandle": d.receipt, "VisibilityTimeout": seconds}
                    for i, d in enumerate(batch)])
                failed = batch_failures(response)
                if failed:  # no longer in flight here (deleted, or received by another consumer)
                    get_logger().debug("sqs broker: %d visibility changes refused: %s", len(failed), failed[0])

    @wrap_errors
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Send to `<queue>_dead_letters` with the reason, then delete the original (a crash between duplicates)."""
        queue = dead_letter_queue(delivery.queue)
        attributes = {REASON_ATTR: _text(xml_safe(reason, 4096) or "-"), SOURCE_ATTR: _text(delivery.queue)}
        try:
            text = delivery.body.decode("utf-8")
            if xml_safe(text) != text:
                raise UnicodeError
        except UnicodeError:
            text = base64.b64encode(delivery.body).decode()
            attributes[ENCODING_ATTR] = _text("base64")
        message: dict[str, Any] = {"MessageBody": text or " ", "MessageAttributes": attributes}
        if is_fifo(queue):
            message["MessageGroupId"] = delivery.extra.get("group") or "machinery"
            message["MessageDeduplicationId"] = delivery.extra.get("id") or uuid.uuid4().hex
        await self._on_queue(queue, lambda c, url: c.send_message(QueueUrl=url, **message), create=True)
        self._dead_queues.add(queue)
        if delivery.receipt is not None:
            entry = await self._clients.get()
            url = delivery.extra.get("url") or await self._queue_url(entry.client, delivery.queue)
            await self._delete(entry.client, url, [delivery])

    # --- inspection ------------------------------------------------------------------------

    async def pending(self, queue: str) -> list[bytes]:
        """Always []: SQS can only list messages by receiving them, which counts as a delivery.

        See queue_counts() for SQS's approximate numbers.
        """
        return []

    @wrap_errors
    async def queue_counts(self, queue: str = "") -> dict[str, int]:
        """SQS's approximate counts for `queue`: visible, in flight (NotVisible) and delayed messages."""
        names = ["ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible",
                 "ApproximateNumberOfMessagesDelayed"]
        response = await self._on_queue(
            queue or self.cnf.default_queue,
            lambda c, url: c.get_queue_attributes(QueueUrl=url, AttributeNames=names), create=False)
        attributes = response.get("Attributes") or {}
        return {name.removeprefix("ApproximateNumberOf"): int(attributes.get(name, 0)) for name in names}

    @wrap_errors
    async def dead_letters(self) -> list[tuple[bytes, str]]:
        """(body, reason) in the dead-letter queues of the default queue and of queues this broker dead-lettered
        from. Reading them receives them for a moment (they stay in place; their receive counts go up)."""
        out: list[tuple[int, bytes, str]] = []
        for queue in sorted(self._dead_queues):
            try:
                out.extend(await self._on_queue(queue, self._peek, create=False))
            except Exception as exc:
                if not is_missing_queue(exc):
                    raise
        out.sort(key=lambda item: item[0])
        return [(body, reason) for _, body, reason in out]

    async def _peek(self, client: Any, url: str) -> list[tuple[int, bytes, str]]:
        seen: dict[str, tuple[int, bytes, str]] = {}
        receipts: list[Delivery] = []
        try:
            while True:
                response = await client.receive_message(
                    QueueUrl=url, MaxNumberOfMessages=BATCH, WaitTimeSeconds=0, VisibilityTimeout=_PEEK_VISIBILITY,
                    MessageSystemAttributeNames=["SentTimestamp"],
                    MessageAttributeNames=[REASON_ATTR, ENCODING_ATTR])
                messages = [m for m in response.get("Messages") or [] if m["MessageId"] not in seen]
                if not messages:
                    break
                for m in messages:
                    receipts.append(Delivery(b"", "", m["ReceiptHandle"], extra={"url": url}))
                    attrs = m.get("MessageAttributes") or {}
                    body = m.get("Body", "")
                    raw = base64.b64decode(body) if _attr(attrs, ENCODING_ATTR) == "base64" else body.encode()
                    sent = int((m.get("Attributes") or {}).get("SentTimestamp", 0))
                    seen[m["MessageId"]] = (sent, raw, _attr(attrs, REASON_ATTR))
        finally:
            if receipts:
                await self._change_visibility(receipts, 0)
        return list(seen.values())

    async def close(self) -> None:
        """Close the current loop's client (fetched messages come back when their visibility ends)."""
        await self._clients.close()


def _delivery(m: dict[str, Any], queue: str, url: str) -> Delivery:
    attrs = m.get("Attributes") or {}
    count = int(attrs.get("ApproximateReceiveCount", 1))
    eta = _attr(m.get("MessageAttributes") or {}, ETA_ATTR)
    return Delivery(
        m.get("Body", "").encode(), queue, m["ReceiptHandle"], redelivered=count > 1, attempts=max(1, count),
        extra={"url": url, "id": m.get("MessageId", ""), "group": attrs.get("MessageGroupId", ""),
               "eta": int(eta) if eta.isdigit() else 0},
    )


def _by_url(deliveries: Sequence[Delivery]) -> dict[str, list[Delivery]]:
    """Deliveries received from SQS by queue URL; others (no receipt) are skipped."""
    out: dict[str, list[Delivery]] = {}
    for d in deliveries:
        url = d.extra.get("url")
        if d.receipt is not None and url:
            out.setdefault(url, []).append(d)
    return out


def _eta_attribute(eta_ns: int | None) -> dict[str, Any]:
    return {ETA_ATTR: {"DataType": "Number", "StringValue": str(eta_ns)}}


def _text(value: str) -> dict[str, str]:
    return {"DataType": "String", "StringValue": value}


def _attr(attrs: dict[str, Any], name: str) -> str:
    return str((attrs.get(name) or {}).get("StringValue", ""))

