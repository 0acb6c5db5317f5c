"""GCP Pub/Sub broker, wire-compatible with Go Machinery's, with pull-based fetches and leases.

URL `gcppubsub://PROJECT/SUBSCRIPTION`. As in Go, a task is published to the topic named by its
RoutingKey (the default queue when empty), `Data` = the Signature JSON, and the default queue is
consumed through the URL's SUBSCRIPTION; a worker of a custom queue Q reads the subscription named
Q (which must be attached to topic Q). Go workers and producers share these topics and
subscriptions with Python ones.

Consuming: fetch() pulls (unary Pull, max_messages = the free slots) until messages arrive or
`wait` passes; a receipt is the message's ack_id. A fetch that stops waiting leaves its Pull in
flight; messages it brings while no fetch waits are kept for the next fetch for up to 2 s (then
handed back), so they do not count one more delivery attempt. Every fetched message gets its ack
deadline set to `gcppubsub.lease_seconds` (skipped when the subscription's own deadline is that
already and the message was not kept), which the worker's renew loop extends for long tasks
(stopping after `gcppubsub.max_extension` seconds when that is set, Go's MaxExtension); a worker
that dies stops renewing and Pub/Sub redelivers.
ack() acknowledges in batches, requeue(delay) sets the deadline to the delay (at most 600 s),
`attempts` is the subscription's delivery_attempt (only Pub/Sub subscriptions with a dead-letter
policy count them; otherwise every delivery reports 1).

Delayed tasks (Go's ETA blocks the sender instead): the message is published at once with the
attribute `machinery_eta_ns`; a fetch that pulls it before its time does not hand it out but
pushes its ack deadline to the ETA (in steps of at most 600 s), keeping it in the fetch when it is
due before the fetch returns or within a second, even past `wait`: a hold lasts whole seconds, so it
would only make the message late and send it through one more delivery, whose Pull answer a
stalled service can lose to the Pull's deadline (hiding the message for the subscription's ack
deadline). Limits: each step is a redelivery, so it counts as a delivery attempt on a subscription
with a dead-letter policy (an ETA more than max_delivery_attempts x 10 min away would be
dead-lettered by Pub/Sub), an ETA cannot outlast the topic's message retention (7 days by default),
and Go workers ignore the attribute and run such a task at once.

dead_letter() publishes the message to the topic `<default_queue>.dead_letters` with the reason in
the attribute `machinery_reason` and acks the original; dead_letters() reads the subscription of
the same name (briefly leasing its messages and giving them back).

pending() returns [] and the broker has no DelayedListing: Pub/Sub cannot list a subscription's
messages without receiving them, and receiving would hide them from workers and count as delivery attempts.
Pub/Sub does not keep FIFO order either (the emulator mostly does).

Topics and subscriptions must exist, as Go requires (a topic with no subscription drops what is
published to it). Only against the emulator ($PUBSUB_EMULATOR_HOST set) does the broker create
missing ones (`create_missing`): the topic, its subscription (ack deadline = the lease, a
dead-letter policy of 100 attempts to the dead-letter topic) and the dead-letter topic with its
subscription.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Any, Final, TypeVar

from google.api_core import exceptions as gexc
from google.pubsub_v1.types import PubsubMessage, ReceivedMessage

from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import DeadLetterListing, Leases
from machinery.drivers.gcppubsub.client import (
    MAX_DEADLINE,
    MIN_SUBSCRIPTION_DEADLINE,
    TRANSIENT,
    InFlightPull,
    Link,
    ack_deadline,
    call,
    check_name,
    client_kwargs,
    describe,
    emulator_host,
    name_problem,
    parse_url,
    retry_policy,
)
from machinery.errors import BrokerError, ConfigError
from machinery.log import get_logger
from machinery.loops import PerLoop

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.tasks.signature import Signature

T = TypeVar("T")

ETA_ATTR: Final = "machinery_eta_ns"
REASON_ATTR: Final = "machinery_reason"
QUEUE_ATTR: Final = "machinery_queue"
#: set by Pub/Sub on messages its own dead-letter policy forwarded
NATIVE_DEAD_LETTER_ATTR: Final = "CloudPubSubDeadLetterSourceSubscription"
MAX_PULL: Final = 1000
ACK_BATCH: Final = 1000
PUBLISH_BATCH: Final = 1000
PUBLISH_BYTES: Final = 9_000_000  # a Publish request may carry 10 MB
ATTR_VALUE_BYTES: Final = 1024
_MIN_POLL, _MAX_POLL = 0.01, 0.2
_MIN_PULL_TIMEOUT = 0.05
#: a message due within this many ns stays in the fetch (past its wait) rather than being held: the
#: shortest hold is 1 s (ModifyAckDeadline takes whole seconds)
_KEEP_DUE_WITHIN_NS = 1_000_000_000
#: a Pull's deadline runs this long past the wait of the fetch that starts it (the emulator answers an
#: empty pull about 1 s before its deadline)
PULL_GRACE = 1.0
#: seconds the answer of a pull nobody waits for stays kept for the next fetch: well inside the shortest
#: ack deadline a subscription can have (10 s), so a kept message cannot lapse to another consumer
KEEP_GRACE = 2.0
_INSPECT_WAIT = 2.0  # an empty pull is trusted only after a long poll (a short one may miss messages)


class PubSubBroker(Broker, Leases, DeadLetterListing):
    """Publishes to topics, pulls from subscriptions; leases are ack deadlines."""

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.broker)
        self.target = parse_url(self.url)
        problem = name_problem(cnf.default_queue)
        if problem:
            raise ConfigError(f"config field default_queue: {cnf.default_queue!r} {problem} (it is the topic name)")
        self._client_kwargs = client_kwargs(cnf.gcppubsub.client)
        #: seconds a fetched message stays ours without renew() (sent rounded up to whole seconds)
        self.lease_seconds = float(cnf.gcppubsub.lease_seconds)
        #: stop renewing a message this many seconds after it was fetched (0 = never stop)
        self.max_extension = float(cnf.gcppubsub.max_extension)
        #: create missing topics and subscriptions (default: only against the emulator)
        self.create_missing = bool(emulator_host())
        self.dead_letter_topic = f"{cnf.default_queue}.dead_letters"
        #: the dead-letter policy of subscriptions this broker creates
        self.max_delivery_attempts = 100
        #: seconds an RPC keeps being retried on transient errors before it fails
        self.retry_window = 30.0
        #: seconds a pull's answer that came when no fetch waited is kept for the next one (< 10 s)
        self.keep_grace = KEEP_GRACE
        self._links: PerLoop[Link] = PerLoop()

    def _link(self) -> Link:
        return self._links.get(lambda: Link(self._client_kwargs))

    def _policy(self) -> dict[str, Any]:
        """Retry and timeout arguments of an RPC: transient errors are retried for retry_window seconds."""
        return {"retry": retry_policy(self.retry_window), "timeout": self.retry_window}

    # --- names -----------------------------------------------------------------------------

    def subscription_of(self, queue: str) -> str:
        """The subscription a worker of `queue` reads: the URL's for the default queue, else `queue`."""
        if queue == self.cnf.default_queue:
            return self.target.subscription
        return check_name(queue, "queue (Pub/Sub subscription)")

    def _sub_path(self, queue: str) -> str:
        return self.target.subscription_path(self.subscription_of(queue))

    # --- missing resources -----------------------------------------------------------------

    async def _rpc(self, link: Link, what: str, fn: Callable[[], Awaitable[T]], topic: str) -> T:
        """Run `fn`, an RPC on `topic` or on the subscription that reads it.

        With create_missing, both are made before this link first uses them: a message published
        after another client created the topic but before it created the subscription would be
        dropped (Pub/Sub keeps messages only for existing subscriptions).
        """
        if self.create_missing:
            await self._create(link, topic)
        try:
            return await call(what, fn)
        except BrokerError as exc:
            if not isinstance(exc.__cause__, gexc.NotFound):
                raise
            if not self.create_missing:
                sub = self.target.subscription if topic == self.cnf.default_queue else topic
                raise BrokerError(
                    f"Pub/Sub {what}: {describe(exc.__cause__)}. Create topic {topic!r} and a subscription "
                    f"{sub!r} on it in project {self.target.project!r} (the broker creates them only "
                    f"against the emulator)"
                ) from exc.__cause__
        link.ensured.clear()  # deleted behind our back: make them again
        await self._create(link, topic)
        return await call(what, fn)

    async def _create(self, link: Link, topic: str) -> None:
        """The topic and the subscription workers read it through (and the dead-letter pair first)."""
        dead = self.dead_letter_topic
        sub = self.target.subscription if topic == self.cnf.default_queue else topic
        topic_path = self.target.topic_path(topic)
        sub_path = self.target.subscription_path(sub)
        if sub_path in link.ensured:
            return
        if topic != dead:
            await self._create(link, dead)
        try:
            await call(f"create topic {topic!r}",
                       partial(link.publisher.create_topic, name=topic_path, **self._policy()))
        except BrokerError as exc:
            if not isinstance(exc.__cause__, gexc.AlreadyExists):
                raise
        deadline = max(MIN_SUBSCRIPTION_DEADLINE, ack_deadline(self.lease_seconds))
        request: dict[str, Any] = {"name": sub_path, "topic": topic_path, "ack_deadline_seconds": deadline}
        if topic != dead:
            request["dead_letter_policy"] = {
                "dead_letter_topic": self.target.topic_path(dead),
                "max_delivery_attempts": self.max_delivery_attempts,
            }
        try:
            await call(f"create subscription {sub!r}",
                       partial(link.subscriber.create_subscription, request=request, **self._policy()))
            link.deadlines[sub_path] = deadline
        except BrokerError as exc:
            if not isinstance(exc.__cause__, gexc.AlreadyExists):
                raise
        link.ensured.add(sub_path)

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        await self.publish_many([(sig, body, eta_ns)])

    async def publish_many(self, items: Sequence[tuple[Signature, bytes, int | None]]) -> None:
        """One Publish request per topic (per 1000 messages / 9 MB), the topics in parallel."""
        if not items:
            return
        now = time.time_ns()
        by_topic: dict[str, list[PubsubMessage]] = defaultdict(list)
        for sig, body, eta_ns in items:
            topic = check_name(sig.routing_key or self.cnf.default_queue, "routing key (Pub/Sub topic)")
            attrs = {ETA_ATTR: str(eta_ns)} if eta_ns is not None and eta_ns > now else None
            by_topic[topic].append(PubsubMessage(data=bytes(body), attributes=attrs))
        link = self._link()
        await asyncio.gather(*(self._publish(link, topic, msgs) for topic, msgs in by_topic.items()))

    async def _publish(self, link: Link, topic: str, msgs: list[PubsubMessage]) -> None:
        path = self.target.topic_path(topic)
        for chunk in _chunks(msgs):
            await self._rpc(link, f"publish to topic {topic!r}",
                            partial(link.publisher.publish, topic=path, messages=chunk, **self._policy()), topic)

    # --- consuming -------------------------------------------------------------------------

    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        """Pull until something is ready or `wait` passes; messages not yet due are held back
        (one due within a second is kept until due instead, so the fetch may outlast `wait` by that)."""
        if max_count <= 0:
            return []
        link = self._link()
        sub = self._sub_path(queue)
        deadline = time.monotonic() + max(wait, 0.0)
        ready: list[Delivery] = []
        soon: list[tuple[int, Delivery]] = []  # due before this fetch returns: kept here until then
        tried = pulled_ok = aged = False
        failure: BaseException | None = None
        poll = _MIN_POLL
        try:
            while True:
                now_ns = time.time_ns()
                ready.extend(d for eta, d in soon if eta <= now_ns)
                soon = [(eta, d) for eta, d in soon if eta > now_ns]
                left = deadline - time.monotonic()
                if ready or (left <= 0 and tried and not soon):
                    break
                if left <= 0 and soon:  # past the wait, only to hand out what is due shortly
                    await asyncio.sleep((min(eta for eta, _ in soon) - now_ns) / 1e9)
                    continue
                left = max(left, _MIN_PULL_TIMEOUT)  # fetch(wait=0) still asks once
                timeout = min(left, (min(eta for eta, _ in soon) - now_ns) / 1e9) if soon else left
                room = min(max_count - len(soon), MAX_PULL)
                if room <= 0:
                    await asyncio.sleep(timeout)
                    continue
                started = time.monotonic()
                tried = True
                try:
                    got, kept = await self._pull(link, queue, sub, room, timeout)
                except TRANSIENT as exc:
                    failure = exc
                    await asyncio.sleep(min(max(deadline - time.monotonic(), 0.0), poll))
                    poll = min(poll * 2, _MAX_POLL)
                    continue
                pulled_ok = True
                aged = aged or kept
                if not got:
                    # An empty answer well before the wait is over (the service may do that): poll.
                    if time.monotonic() - started < timeout * 0.9:
                        await asyncio.sleep(min(max(deadline - time.monotonic(), 0.0), poll, timeout))
                        poll = min(poll * 2, _MAX_POLL)
                    continue
                poll = _MIN_POLL
                now_ns = time.time_ns()
                until_ns = max(now_ns + int((deadline - time.monotonic()) * 1e9), now_ns + _KEEP_DUE_WITHIN_NS)
                later: list[tuple[int, Delivery]] = []
                for eta, d in got:
                    if eta <= now_ns:
                        ready.append(d)
                    elif eta <= until_ns:
                        soon.append((eta, d))
                    else:
                        later.append((eta, d))
                if later:
                    await self._hold(link, sub, later)
            if soon:
                await self._hold(link, sub, soon)
                soon = []
            if ready:
                await self._lease(link, sub, ready, force=aged)
        except BaseException:
            # Cancelled or failed after claiming: give everything back (held ones until their ETA).
            if ready:
                link.spawn(self._modify(link, sub, [d.receipt for d in ready], 0))
            if soon:
                link.spawn(self._hold(link, sub, soon))
            raise
        if not ready and not pulled_ok and failure is not None:
            raise BrokerError(f"Pub/Sub pull from {sub}: {describe(failure)}") from failure
        return ready

    async def _pull(self, link: Link, queue: str, sub: str, count: int,
                    wait: float) -> tuple[list[tuple[int, Delivery]], bool]:
        """(due time in Unix ns, delivery) per message the subscription's pull in flight (or kept
        answer) brings within `wait` seconds, and whether the answer was kept; a new Pull (deadline
        `wait` + PULL_GRACE) when none is in flight."""
        pull = link.pulls.get(sub)
        if pull is None or pull.claimed:
            request = {"subscription": sub, "max_messages": count}
            task = asyncio.ensure_future(self._rpc(link, f"pull from {sub}", partial(
                link.subscriber.pull, request=request, timeout=wait + PULL_GRACE, retry=None), queue))
            pull = link.pulls[sub] = InFlightPull(task)
            task.add_done_callback(partial(self._unwaited, link, sub, pull))
        pull.waiters += 1
        try:
            await asyncio.wait({pull.task}, timeout=wait)
        except asyncio.CancelledError:
            pull.waiters -= 1
            self._unwaited(link, sub, pull)
            raise
        pull.waiters -= 1
        if pull.overdue():  # its grace ran out before the timer could hand it back: it goes back now
            self._give_back(link, sub, pull)
            return [], False
        if not pull.claim():
            return [], False  # still in flight (a later fetch adopts it), or another fetch took it
        if link.pulls.get(sub) is pull:
            del link.pulls[sub]
        try:
            resp = pull.task.result()
        except BrokerError as exc:
            if isinstance(exc.__cause__, TRANSIENT):
                if isinstance(exc.__cause__, gexc.DeadlineExceeded):
                    return [], False  # the service held the pull to its deadline: nothing came
                raise exc.__cause__ from None
            raise
        received = list(resp.received_messages)
        if len(received) > count:  # adopted from a fetch that had more room: hand back the rest
            link.spawn(self._modify(link, sub, [m.ack_id for m in received[count:]], 0))
            received = received[:count]
        fetched_at = time.monotonic()
        now_ns = time.time_ns()
        return [_delivery(queue, sub, m, fetched_at, now_ns) for m in received], pull.kept_until is not None

    def _unwaited(self, link: Link, sub: str, pull: InFlightPull, _task: Any = None) -> None:
        """A finished pull nobody waits for: keep its messages for the next fetch for `keep_grace`
        seconds (handing them back now would count another delivery attempt), then hand them back."""
        if pull.waiters > 0 or pull.claimed or pull.kept_until is not None or not pull.task.done():
            return
        if link.closing or not _answer(pull):
            self._give_back(link, sub, pull)
        else:
            grace = min(self.keep_grace, MIN_SUBSCRIPTION_DEADLINE / 2)  # never near the ack deadline
            pull.keep(grace, partial(self._give_back, link, sub, pull))

    def _give_back(self, link: Link, sub: str, pull: InFlightPull) -> None:
        """Return the messages of a finished pull no fetch claimed to the subscription (ack deadline 0)."""
        if not pull.claim():
            return
        if link.pulls.get(sub) is pull:
            del link.pulls[sub]
        ids = [m.ack_id for m in _answer(pull)]
        if ids:
            link.spawn(self._modify(link, sub, ids, 0))

    async def _hold(self, link: Link, sub: str, held: Sequence[tuple[int, Delivery]]) -> None:
        """Hide messages until (just before) their ETA; the fetch that gets them then keeps the rest."""
        now_ns = time.time_ns()
        by_seconds: dict[int, list[Any]] = defaultdict(list)
        for eta, d in held:
            seconds = min(MAX_DEADLINE, max(1, math.floor((eta - now_ns) / 1e9)))
            by_seconds[seconds].append(d.receipt)
        await asyncio.gather(*(self._modify(link, sub, ids, s) for s, ids in by_seconds.items()))

    async def _lease(self, link: Link, sub: str, deliveries: Sequence[Delivery], force: bool = False) -> None:
        """Set the lease on fresh deliveries, unless the subscription's ack deadline already is it
        (`force`: some came from a kept answer, whose deadline has partly run)."""
        if not self.lease_seconds:
            return
        seconds = ack_deadline(self.lease_seconds)
        if sub not in link.deadlines:
            try:
                info = await link.subscriber.get_subscription(subscription=sub, timeout=10, retry=None)
                link.deadlines[sub] = int(info.ack_deadline_seconds)
            except gexc.GoogleAPICallError:  # e.g. no pubsub.subscriptions.get permission
                link.deadlines[sub] = None
        if force or link.deadlines[sub] != seconds:
            await self._modify(link, sub, [d.receipt for d in deliveries], seconds)

    async def _modify(self, link: Link, sub: str, ack_ids: Sequence[Any], seconds: int) -> None:
        for i in range(0, len(ack_ids), ACK_BATCH):
            chunk = list(ack_ids[i:i + ACK_BATCH])
            await call(f"modify ack deadline on {sub}", partial(
                link.subscriber.modify_ack_deadline, subscription=sub, ack_ids=chunk, ack_deadline_seconds=seconds,
                **self._policy()))

    # --- settling --------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        link = self._link()
        calls = []
        for sub, ids in _by_subscription(deliveries).items():
            for i in range(0, len(ids), ACK_BATCH):
                calls.append(call(f"acknowledge on {sub}", partial(
                    link.subscriber.acknowledge, subscription=sub, ack_ids=ids[i:i + ACK_BATCH],
                    **self._policy())))
        await asyncio.gather(*calls)

    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        """Visible again after `delay` (rounded up to whole seconds, at most 600)."""
        link = self._link()
        seconds = ack_deadline(delay) if delay > 0 else 0
        await asyncio.gather(*(self._modify(link, sub, ids, seconds)
                               for sub, ids in _by_subscription(deliveries).items()))

    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        if not self.lease_seconds:
            return
        if self.max_extension > 0:
            now = time.monotonic()
            deliveries = [d for d in deliveries if now - d.extra.get("fetched_at", now) < self.max_extension]
        link = self._link()
        seconds = ack_deadline(self.lease_seconds)
        await asyncio.gather(*(self._modify(link, sub, ids, seconds)
                               for sub, ids in _by_subscription(deliveries).items()))

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        """Publish to the dead-letter topic with the reason, then ack the original."""
        link = self._link()
        attrs = {REASON_ATTR: _clip(reason), QUEUE_ATTR: _clip(delivery.queue)}
        msg = PubsubMessage(data=delivery.body, attributes=attrs)
        await self._publish(link, self.dead_letter_topic, [msg])
        await self.ack([delivery])

    # --- inspection ------------------------------------------------------------------------

    async def pending(self, queue: str) -> list[bytes]:
        """Always []: Pub/Sub has no way to list messages without receiving them (see the module doc)."""
        return []

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        """The dead-letter subscription's messages by publish time; they are leased while read, then given back."""
        link = self._link()
        sub = self.target.subscription_path(self.dead_letter_topic)
        seen: dict[str, tuple[Any, bytes, str]] = {}
        ids: list[str] = []
        try:
            while True:
                try:
                    resp = await call(f"pull from {sub}", partial(
                        link.subscriber.pull, request={"subscription": sub, "max_messages": MAX_PULL},
                        timeout=_INSPECT_WAIT, retry=None))
                except BrokerError as exc:
                    if isinstance(exc.__cause__, gexc.NotFound):
                        return []
                    if isinstance(exc.__cause__, gexc.DeadlineExceeded):
                        break
                    raise
                if not resp.received_messages:
                    break
                for rm in resp.received_messages:
                    ids.append(rm.ack_id)
                    m = rm.message
                    seen.setdefault(m.message_id, (m.publish_time, bytes(m.data), _reason(m.attributes)))
        finally:
            if ids:
                await self._modify(link, sub, ids, 0)
        return [(body, reason) for _, body, reason in sorted(seen.values(), key=lambda v: v[0])]

    async def close(self) -> None:
        link = self._links.pop_current()
        if link is not None:
            await link.close()


# --- helpers ---------------------------------------------------------------------------------


def _delivery(queue: str, sub: str, rm: ReceivedMessage, fetched_at: float, now_ns: int) -> tuple[int, Delivery]:
    msg = rm.message
    attempt = int(rm.delivery_attempt or 0)
    d = Delivery(bytes(msg.data), queue, rm.ack_id, attempt > 1, max(attempt, 1),
                 {"subscription": sub, "fetched_at": fetched_at, "message_id": msg.message_id})
    eta_text = msg.attributes.get(ETA_ATTR) if msg.attributes else None
    eta = now_ns
    if eta_text:
        try:
            eta = int(eta_text)
        except ValueError:
            get_logger().warning("Pub/Sub message %s has a bad %s attribute %r; running it now",
                                 msg.message_id, ETA_ATTR, eta_text)
    return eta, d


def _answer(pull: InFlightPull) -> Sequence[ReceivedMessage]:
    """The messages of a finished pull ([] when it failed or was cancelled)."""
    if pull.task.cancelled() or pull.task.exception() is not None:
        return []
    return list(pull.task.result().received_messages)


def _by_subscription(deliveries: Sequence[Delivery]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = defaultdict(list)
    for d in deliveries:
        sub = d.extra.get("subscription")
        if isinstance(d.receipt, str) and isinstance(sub, str):
            out[sub].append(d.receipt)
    return out


def _chunks(msgs: list[PubsubMessage]) -> list[list[PubsubMessage]]:
    out: list[list[PubsubMessage]] = [[]]
    size = 0
    for m in msgs:
        n = len(m.data) + 64
        if out[-1] and (len(out[-1]) >= PUBLISH_BATCH or size + n > PUBLISH_BYTES):
            out.append([])
            size = 0
        out[-1].append(m)
        size += n
    return out


def _clip(text: str) -> str:
    """An attribute value fits in 1024 bytes."""
    raw = text.encode()
    return text if len(raw) <= ATTR_VALUE_BYTES else raw[:ATTR_VALUE_BYTES].decode(errors="ignore")


def _reason(attrs: Any) -> str:
    if not attrs:
        return ""
    if REASON_ATTR in attrs:
        return str(attrs[REASON_ATTR])
    if NATIVE_DEAD_LETTER_ATTR in attrs:
        return f"Pub/Sub dead-lettered it from {attrs[NATIVE_DEAD_LETTER_ATTR]} after too many delivery attempts"
    return ""
