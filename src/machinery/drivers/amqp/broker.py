"""RabbitMQ (AMQP 0-9-1) broker: Go Machinery's exchange, queues and delay queues, without its bugs.

Queue mapping (exchange `amqp.exchange`, durable, of type `amqp.exchange_type`):

* The default queue `default_queue` is bound with `amqp.binding_key` (what Go producers publish to)
  and with its own name. A custom queue Q is bound with Q only, so a custom-queue worker never
  receives default tasks (Go binds every queue with the binding key: duplicates).
* A signature goes to the default queue when its routing key is empty, the default queue's name or
  (direct exchange) the binding key; any other routing key names the queue. The wire routing key is
  then Go's: the binding key for the default queue on a direct exchange, else the queue name.
* Before publishing, the producer declares and binds the target queue with the arguments the
  workers use, so tasks sent before any worker starts are kept; it never creates Go's orphan
  `<binding_key>` queue. A Go worker on default settings reads `default_queue` bound with the
  binding key: the same queue as a Python worker.
* fanout and headers exchanges route by themselves: every matching queue gets a copy.
* ETA: `delay.<ms>.<exchange>.<routing key>` with Go's arguments (x-dead-letter-exchange,
  x-dead-letter-routing-key, x-message-ttl, x-expires = 2 x ms), fed through the default exchange
  (never bound, so a fanout exchange does not copy every task into them), with confirms. Delays above
  10 s are rounded up to 4 significant digits so bulk sends share queues; delays under 10 ms are
  published at once. `amqp.delayed_queue` selects Go's single delay queue with per-message expiration
  (head-of-line blocking: a long delay holds back shorter ones behind it).
* requeue(delay) uses `delay.<ms>..<queue>`, dead-lettering straight back to that queue.
* dead_letter() moves a message to `<default_queue>.dead_letters`, the reason in a header.
* `<default_queue>.delay_index` records which delay queues exist so that delayed() can list them
  (AMQP cannot list queues).

fetch() runs basic.consume with QoS = the largest batch the worker asked for (its free slots), so a
worker never holds more unacked messages than it can run (`amqp.prefetch_count`, Go's bound for
unlimited workers, is not needed). A consumer keeps its QoS window filled: pending() lists what this
process holds but has not fetched, not what other processes hold; and a requeued message may come
back to the same consumer. RabbitMQ redelivers the unacked messages of a dead connection itself
(no Leases capability). It also takes a task away from a live worker whose ack is overdue by
`consumer_timeout` (30 min by default): consumers ask for `x-consumer-timeout` = `consumer_timeout`
below (7 days), which RabbitMQ >= 3.11.15 honours; older servers need consumer_timeout raised in
rabbitmq.conf, and we log an error naming it when it fires.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final

from aiormq import exceptions as amqp_exc
from aiormq.abc import AbstractChannel, DeliveredMessage

from machinery.drivers.amqp.connection import (
    PERMANENT_ERRORS,
    TRANSIENT_ERRORS,
    AMQPLink,
    clamp_ms,
    close_quietly,
    delay_ms_until,
    delivery_tag,
    describe,
    get_all,
    int_header,
    properties,
    publish,
    round_delay_ms,
    settle,
    split_urls,
)
from machinery.drivers.amqp.consumer import (
    BOUNCED_HEADER,
    ETA_HEADER,
    REQUEUES_HEADER,
    Chan,
    Consumer,
    republish_headers,
    to_delivery,
)
from machinery.drivers.broker import Broker, Delivery
from machinery.drivers.capabilities import DeadLetterListing, DelayedListing
from machinery.errors import BrokerError
from machinery.log import get_logger
from machinery.loops import PerLoop
from machinery.tasks.signature import Signature

if TYPE_CHECKING:
    from machinery.config import Config

MIN_DELAY_MS: Final = 10
MAX_PREFETCH: Final = 65535
REASON_HEADER: Final = "x-machinery-reason"
SOURCE_HEADER: Final = "x-machinery-queue"
UNTIL_HEADER: Final = "x-machinery-until"


@dataclass(frozen=True, slots=True)
class _Decl:
    """A queue to declare (and bind to the exchange) before publishing to it."""

    queue: str
    durable: bool = True
    auto_delete: bool = False
    arguments: dict[str, Any] | None = None
    bind_keys: tuple[str, ...] = ()
    max_age: float | None = None  # re-declare after this (queues with x-expires)
    index_ms: int | None = None  # a delay queue: record it in the delay index (0 = never expires)


@dataclass(slots=True)
class _Out:
    exchange: str
    routing_key: str
    body: bytes
    props: Any
    needs: tuple[_Decl, ...]


class _LoopState:
    def __init__(self, link: AMQPLink) -> None:
        self.link = link
        self.consumers: dict[str, Consumer] = {}


class AMQPBroker(Broker, DelayedListing, DeadLetterListing):
    """Publishes with confirms, consumes with basic.consume and a bounded prefetch."""

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.broker)
        self.urls = split_urls(self.url, cnf.multiple_broker_separator, "broker")
        self._states: PerLoop[_LoopState] = PerLoop()
        #: seconds a running task may stay unacked before RabbitMQ gives it to another worker
        #: (the x-consumer-timeout consumer argument; None leaves the server's consumer_timeout)
        self.consumer_timeout: float | None = 7 * 24 * 3600.0
        #: seconds an operation keeps reconnecting (trying every URL in order) before it fails
        self.retry_window = 30.0

    def _state(self) -> _LoopState:
        return self._states.get(
            lambda: _LoopState(AMQPLink(self.urls, tls=self.cnf.tls, error=BrokerError, role="broker",
                                        retry_window=self.retry_window))
        )

    # --- mapping ---------------------------------------------------------------------------

    @property
    def dead_letter_queue(self) -> str:
        return f"{self.cnf.default_queue}.dead_letters"

    @property
    def delay_index_queue(self) -> str:
        return f"{self.cnf.default_queue}.delay_index"

    def route(self, routing_key: str) -> tuple[str, str]:
        """(target queue, wire routing key) for a signature's routing key."""
        a = self.cnf.amqp
        default = self.cnf.default_queue
        direct = a.exchange_type == "direct"
        if not routing_key or routing_key == default or (direct and routing_key == a.binding_key):
            return default, (a.binding_key if direct else default)
        return routing_key, routing_key

    def queue_decl(self, queue: str) -> _Decl:
        """How workers and producers declare and bind a task queue (the same on both sides)."""
        a = self.cnf.amqp
        if a.exchange_type in ("fanout", "headers"):
            keys: tuple[str, ...] = (queue,)
        elif queue == self.cnf.default_queue:
            keys = tuple(dict.fromkeys((a.binding_key, queue)))
        else:
            keys = (queue,)
        return _Decl(queue, arguments=a.queue_declare_args, bind_keys=keys)

    def _delay_decl(self, ms: int, exchange: str, routing_key: str, target: str) -> tuple[_Decl, str | None]:
        a = self.cnf.amqp
        if a.delayed_queue and exchange:
            name = a.delayed_queue if target == self.cnf.default_queue else f"{a.delayed_queue}.{target}"
            shared = {"x-dead-letter-exchange": exchange, "x-dead-letter-routing-key": routing_key}
            return _Decl(name, auto_delete=a.auto_delete, arguments=shared, index_ms=0), str(ms)
        args: dict[str, Any] = {
            "x-dead-letter-exchange": exchange,
            "x-dead-letter-routing-key": routing_key,
            "x-message-ttl": clamp_ms(ms),
            "x-expires": clamp_ms(2 * ms),
        }
        # Re-declared (which resets x-expires) often enough that a message is dead-lettered before
        # its queue can expire under it.
        return _Decl(f"delay.{ms}.{exchange}.{routing_key}", auto_delete=a.auto_delete, arguments=args,
                     max_age=ms / 2000, index_ms=ms), None

    def _plan(self, sig: Signature, body: bytes, eta_ns: int | None) -> _Out:
        queue, key = self.route(sig.routing_key)
        target = self.queue_decl(queue)
        ms = delay_ms_until(eta_ns)
        if ms < MIN_DELAY_MS or eta_ns is None:
            return _Out(self.cnf.amqp.exchange, key, body, properties(headers=sig.headers, priority=sig.priority),
                        (target,))
        decl, expiration = self._delay_decl(ms, self.cnf.amqp.exchange, key, queue)
        headers = {**(sig.headers or {}), ETA_HEADER: eta_ns}
        props = properties(headers=headers, priority=sig.priority, expiration=expiration)
        return _Out("", decl.queue, body, props, (target, decl))

    # --- declarations ----------------------------------------------------------------------

    async def _ensure(self, st: _LoopState, decls: Sequence[_Decl]) -> None:
        link = st.link
        todo = [d for d in {d.queue: d for d in decls}.values() if not link.fresh(f"q:{d.queue}", d.max_age)]
        if not todo:
            return
        ch = await link.channel("declare", confirms=False)
        a = self.cnf.amqp
        if not link.fresh("x") and any(d.bind_keys for d in todo):
            await ch.exchange_declare(a.exchange, exchange_type=a.exchange_type, durable=True)
            link.mark("x")
        for d in todo:
            await ch.queue_declare(d.queue, durable=d.durable, auto_delete=d.auto_delete, arguments=d.arguments)
            for key in d.bind_keys:
                await ch.queue_bind(d.queue, a.exchange, routing_key=key, arguments=a.queue_binding_args)
            if d.index_ms is not None:
                await self._index(st, ch, d.queue, d.index_ms)
            link.mark(f"q:{d.queue}")

    async def _index(self, st: _LoopState, ch: AbstractChannel, queue: str, ms: int) -> None:
        """Note a delay queue in the index delayed() reads (a best-effort record, no confirm)."""
        index = self.delay_index_queue
        if not st.link.fresh(f"q:{index}"):
            await ch.queue_declare(index, durable=True)
            st.link.mark(f"q:{index}")
        until = time.time_ns() + 2 * ms * 1_000_000 if ms else 0
        expiration = str(min(2 * ms + 60_000, 2**31 - 1)) if ms else None
        props = properties(headers={UNTIL_HEADER: until}, expiration=expiration)
        await ch.basic_publish(queue.encode(), exchange="", routing_key=index, properties=props)

    # --- publishing ------------------------------------------------------------------------

    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        await self.publish_many([(sig, body, eta_ns)])

    async def publish_many(self, items: Sequence[tuple[Signature, bytes, int | None]]) -> None:
        if items:
            await self._send(self._state(), [self._plan(s, b, eta) for s, b, eta in items], "publish")

    async def _send(self, st: _LoopState, outs: list[_Out], what: str) -> None:
        """Publish with confirms (pipelined); after a reconnect only unconfirmed messages go again."""
        pending = list(outs)
        returned: set[int] = set()
        missing: list[BaseException] = []

        async def attempt() -> None:
            await st.link.connection()  # reconnect (maybe to another URL) before trusting the cache
            await self._ensure(st, [d for o in pending for d in o.needs])
            ch = await st.link.channel("publish", confirms=True)
            results = await asyncio.gather(
                *(publish(ch, o.body, exchange=o.exchange, routing_key=o.routing_key, props=o.props)
                  for o in pending),
                return_exceptions=True,
            )
            failed: list[_Out] = []
            error: BaseException | None = None
            for out, res in zip(pending, results, strict=True):
                if isinstance(res, amqp_exc.PublishError):
                    # Unroutable: a queue we declared earlier was deleted; declare it again, once.
                    if id(out) in returned:
                        raise BrokerError(
                            f"{what}: no queue is bound to exchange {out.exchange!r} for routing key "
                            f"{out.routing_key!r} (check amqp.exchange_type, queue_binding_args and headers)"
                        )
                    returned.add(id(out))
                    for d in out.needs:
                        st.link.forget(f"q:{d.queue}")
                    failed.append(out)
                    error = error or ConnectionError("message returned as unroutable")
                elif isinstance(res, TypeError):
                    raise BrokerError(f"{what}: a header value cannot be carried by AMQP: {res}")
                elif isinstance(res, amqp_exc.ChannelNotFoundEntity) and not missing:
                    missing.append(res)  # the exchange vanished (or a new node lacks it): declare again
                    st.link.declared.clear()
                    failed.append(out)
                    error = error or ConnectionError(str(res))
                elif isinstance(res, BaseException):
                    failed.append(out)
                    error = error or res
            pending[:] = failed
            if error is not None:
                raise error

        await st.link.call(attempt, what=what)

    # --- consuming -------------------------------------------------------------------------

    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        if max_count <= 0:
            return []
        st = self._state()
        cons = st.consumers.get(queue)
        if cons is None:
            cons = st.consumers[queue] = Consumer(queue)
        deadline = time.monotonic() + wait
        while True:
            try:
                await self._ensure_consumer(st, cons, max_count)
            except BrokerError:
                raise
            except PERMANENT_ERRORS as exc:
                raise BrokerError(f"consume from queue {queue!r}: RabbitMQ refused it: {describe(exc)}") from exc
            except TRANSIENT_ERRORS as exc:  # connection trouble: nothing now, retried on later calls
                get_logger().debug("AMQP consumer on %s not ready: %s", queue, describe(exc))
                left = deadline - time.monotonic()
                if left <= 0:
                    return []
                await asyncio.sleep(min(left, 0.5))
                continue
            if cons.buffer:
                # Let deliveries that arrived in the same read join the batch.
                for _ in range(8):
                    if len(cons.buffer) >= max_count:
                        break
                    await asyncio.sleep(0)
                out = self._take(cons, max_count)
                if out:
                    return out
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            cons.arrived.clear()
            try:
                await asyncio.wait_for(cons.arrived.wait(), left)
            except TimeoutError:
                if not cons.buffer:
                    return []

    def _take(self, cons: Consumer, max_count: int) -> list[Delivery]:
        """Pop up to max_count live deliveries (synchronously, so a cancelled fetch loses none)."""
        out: list[Delivery] = []
        while cons.buffer and len(out) < max_count:
            chan, msg = cons.buffer.popleft()
            if chan is cons.chan and chan.usable():
                out.append(to_delivery(cons.queue, chan, msg))
            # else its channel died: RabbitMQ has requeued it already
        return out

    async def _ensure_consumer(self, st: _LoopState, cons: Consumer, max_count: int) -> None:
        want = min(max_count, MAX_PREFETCH)
        if cons.alive() and want <= cons.prefetch:
            return
        async with cons.lock:
            if cons.alive() and want <= cons.prefetch:
                return
            if cons.alive() and cons.chan is not None:
                # A per-consumer QoS applies to new consumers only: consume again. Deliveries made to
                # the old consumer stay valid on this channel.
                chan = cons.chan
                await chan.channel.basic_qos(prefetch_count=want)
                old = chan.tag
                ok = await chan.channel.basic_consume(cons.queue, partial(self._on_message, cons, chan),
                                                      arguments=self._consumer_args())
                chan.tag = str(ok.consumer_tag)
                cons.prefetch = want
                await chan.channel.basic_cancel(old)
                return
            ch = await st.link.open_channel(confirms=False)
            chan = Chan(ch, cons.ident)
            try:
                ch.closing.add_done_callback(partial(self._on_channel_closed, cons, chan))
                ch.on_consumer_cancel_callbacks.add(partial(self._on_cancelled, cons, chan))
                await self._declare_consumed(ch, cons.queue)
                await ch.basic_qos(prefetch_count=want)
                ok = await ch.basic_consume(cons.queue, partial(self._on_message, cons, chan),
                                            arguments=self._consumer_args())
            except BaseException:
                chan.dead = True
                cons.close_later(ch)  # never leave a consumer nobody reads
                raise
            chan.tag = str(ok.consumer_tag)
            cons.chan, cons.prefetch = chan, want

    def _consumer_args(self) -> dict[str, Any] | None:
        if self.consumer_timeout is None:
            return None
        return {"x-consumer-timeout": clamp_ms(int(self.consumer_timeout * 1000))}

    async def _declare_consumed(self, ch: AbstractChannel, queue: str) -> None:
        a = self.cnf.amqp
        await ch.exchange_declare(a.exchange, exchange_type=a.exchange_type, durable=True)
        d = self.queue_decl(queue)
        await ch.queue_declare(d.queue, durable=True, arguments=d.arguments)
        for key in d.bind_keys:
            await ch.queue_bind(d.queue, a.exchange, routing_key=key, arguments=a.queue_binding_args)

    @staticmethod
    async def _on_message(cons: Consumer, chan: Chan, msg: DeliveredMessage) -> None:
        chan.outstanding.add(delivery_tag(msg))
        cons.buffer.append((chan, msg))
        cons.wake()

    @staticmethod
    def _on_channel_closed(cons: Consumer, chan: Chan, fut: asyncio.Future[Any]) -> None:
        try:
            exc = None if fut.cancelled() else fut.exception()
        except BaseException as err:  # only read for the log line
            exc = err
        chan.dead = True
        chan.outstanding.clear()
        if exc is not None and "acknowledgement" in str(exc) and "timed out" in str(exc):
            get_logger().error(
                "RabbitMQ closed the consumer channel of %s because a task ran longer than its "
                "consumer_timeout; its unacked tasks will run again. Raise consumer_timeout in "
                "rabbitmq.conf above your longest task (%s)", cons.queue, exc,
            )
        cons.wake()

    @staticmethod
    def _on_cancelled(cons: Consumer, chan: Chan, _frame: Any = None) -> None:
        """The broker cancelled our consumer (its queue was deleted): a new channel re-declares."""
        chan.dead = True
        cons.close_later(chan.channel)
        cons.wake()

    # --- settling --------------------------------------------------------------------------

    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self._settle(deliveries, ack=True)

    async def _settle(self, deliveries: Sequence[Delivery], *, ack: bool) -> None:
        by_chan: dict[Chan, set[int]] = {}
        for d in deliveries:
            chan, tag = d.receipt
            by_chan.setdefault(chan, set()).add(tag)
        for chan, tags in by_chan.items():
            if not chan.usable():
                continue  # RabbitMQ requeued these when the channel closed
            try:
                await settle(chan.channel, chan.outstanding, tags, ack=ack)
            except (amqp_exc.AMQPError, amqp_exc.ChannelInvalidStateError, ConnectionError) as exc:
                get_logger().warning("AMQP %s failed (%s); RabbitMQ will redeliver those tasks",
                                     "ack" if ack else "requeue", describe(exc))

    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        ms = round_delay_ms(math.ceil(delay * 1000)) if delay > 0 else 0
        if ms < MIN_DELAY_MS:
            await self._settle(deliveries, ack=False)
            return
        # A message that came back from its delay to the very consumer that bounced it (workers
        # lacking its task, in lockstep with RabbitMQ's round-robin) is handed on at once: the nack
        # puts it back at the head and the next consumer in turn gets it. If that is us again (we
        # are alone), it waits the delay. So no consumer keeps a message it cannot run, no hot loop.
        mine = [d for d in deliveries if d.extra.get("bounced_by") == d.receipt[0].ident
                and not d.extra.get("amqp_redelivered")]
        if mine:
            await self._settle(mine, ack=False)
        later = [d for d in deliveries if d not in mine]
        outs = []
        eta = time.time_ns() + ms * 1_000_000
        for d in later:
            decl, _ = self._delay_decl(ms, "", d.queue, d.queue)
            headers = republish_headers(d)
            requeues = headers.get(REQUEUES_HEADER)
            headers[REQUEUES_HEADER] = (requeues if isinstance(requeues, int) else 0) + 1
            headers[ETA_HEADER] = eta
            headers[BOUNCED_HEADER] = d.receipt[0].ident
            props = properties(headers=headers, priority=d.extra.get("priority"))
            outs.append(_Out("", decl.queue, d.body, props, (decl,)))
        if outs:
            await self._send(self._state(), outs, "requeue")
            await self._settle(later, ack=True)

    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        headers = republish_headers(delivery)
        headers[REASON_HEADER] = reason
        headers[SOURCE_HEADER] = delivery.queue
        props = properties(headers=headers, priority=delivery.extra.get("priority"))
        out = _Out("", self.dead_letter_queue, delivery.body, props, (_Decl(self.dead_letter_queue),))
        await self._send(self._state(), [out], "dead_letter")
        await self._settle([delivery], ack=True)

    # --- inspection ------------------------------------------------------------------------

    async def _inspect(self, ch: AbstractChannel, queue: str) -> list[DeliveredMessage] | None:
        """basic.get every message without ack (None if the queue does not exist). Closing the
        channel afterwards puts them all back at their original positions: nothing is reordered."""
        try:
            return await get_all(ch, queue)
        except amqp_exc.ChannelNotFoundEntity:
            return None

    async def _read(self, queue: str) -> list[DeliveredMessage]:
        st = self._state()

        async def look() -> list[DeliveredMessage]:
            ch = await st.link.open_channel(confirms=False)
            try:
                return await self._inspect(ch, queue) or []
            finally:
                await close_quietly(ch)

        return await st.link.call(look, what=f"inspect queue {queue!r}")

    async def pending(self, queue: str) -> list[bytes]:
        """Ready messages, after those this process's consumer holds but fetch() has not taken yet
        (delivered earlier, so older). Other processes' prefetched messages are not visible."""
        ready = await self._read(queue)
        st = self._states.current()
        cons = st.consumers.get(queue) if st is not None else None
        held = [m.body for c, m in cons.buffer if c is cons.chan and c.usable()] if cons else []
        return held + [m.body for m in ready]

    async def delayed(self) -> list[bytes]:
        """Messages in the delay queues noted in the delay index, by ETA; stale notes are dropped."""
        st = self._state()

        async def look() -> list[bytes]:
            index_ch = await st.link.open_channel(confirms=False)
            try:
                notes = await self._inspect(index_ch, self.delay_index_queue) or []
                now = time.time_ns()
                live: dict[str, int] = {}
                drop: set[int] = set()
                for note in notes:
                    name = note.body.decode()
                    until = int_header(note, UNTIL_HEADER)
                    if (until and until < now) or name in live:
                        drop.add(delivery_tag(note))
                    else:
                        live[name] = delivery_tag(note)
                held: list[tuple[int, int, bytes]] = []
                for name, tag in live.items():
                    ch = await st.link.open_channel(confirms=False)
                    try:
                        msgs = await self._inspect(ch, name)
                    finally:
                        await close_quietly(ch)
                    if msgs is None:
                        drop.add(tag)
                        continue
                    for m in msgs:
                        held.append((int_header(m, ETA_HEADER), len(held), m.body))
                for tag in sorted(drop):
                    await index_ch.basic_ack(tag)
                return [body for _, _, body in sorted(held)]
            finally:
                await close_quietly(index_ch)

        return await st.link.call(look, what="list delayed tasks")

    async def dead_letters(self) -> list[tuple[bytes, str]]:
        out = []
        for m in await self._read(self.dead_letter_queue):
            reason = (m.header.properties.headers or {}).get(REASON_HEADER, "")
            out.append((m.body, reason.decode() if isinstance(reason, bytes) else str(reason)))
        return out

    async def close(self) -> None:
        st = self._states.pop_current()
        if st is not None:
            st.consumers.clear()
            await st.link.close()
