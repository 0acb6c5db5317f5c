"""Redis broker: Go Machinery's lists and delayed zset, plus acks and leases Go does not have.

Wire layout as Go: RPUSH the signature JSON to the list named by its RoutingKey; delayed messages
in the zset `delayed_tasks` (score = ETA in Unix ns, member = the JSON). Go pops with BLPOP and
loses whatever a dying worker held; here a message leaves its list only into the queue's in-flight
hash, with a lease deadline per message (atomically, by one Lua script per fetch), or into the
consumer's own landing list by a blocked fetch's BLMOVE, where it runs unclaimed for a moment
(landing.py). ack() removes it once its final state is stored; renew() extends the leases
of long tasks; a lease that lapses puts the message back at the head of its queue at the next fetch
by any consumer of that queue.
See scripts.py for the key layout.

Needs Redis >= 6.2 (LMOVE, BLMOVE, LPOP with a count).
"""

from __future__ import annotations

import asyncio
import functools
import os
import random
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec
from redis.exceptions import ConnectionError as _RConnectionError
from redis.exceptions import TimeoutError as _RTimeoutError

from machinery.drivers.broker import Broker, Delivery, PublishItem
from machinery.drivers.capabilities import (
    BlockingPublish,
    DeadLetterListing,
    DelayedListing,
    EarlyHandout,
    Leases,
)
from machinery.drivers.redis import scripts as lua
from machinery.drivers.redis.blocking import BlockingClient
from machinery.drivers.redis.client import (
    Batch,
    Client,
    Clients,
    Lane,
    cancel_requested,
    same_slot,
    tagged,
    wrap_blocking_errors,
    wrap_errors,
)
from machinery.drivers.redis.landing import Landings
from machinery.drivers.redis.url import parse_redis_url
from machinery.errors import BrokerError
from machinery.log import get_logger
from machinery.loops import PerLoop
from machinery.tasks import gojson

T = TypeVar("T")
C = TypeVar("C")

if TYPE_CHECKING:
    from machinery.config import Config
    from machinery.tasks.signature import Signature

DEAD_LETTER_KEY = "machinery:dead_letters"
_WS = b" \t\n\r"


class _Keys:
    """The keys of one queue, in the queue's hash slot."""

    __slots__ = ("claim", "consumers", "inflight", "landing", "landing_prefix", "leases", "queue", "redelivered")

    def __init__(self, queue: str, consumer: str) -> None:
        self.queue = queue
        self.inflight = tagged(queue, ":machinery:inflight")
        self.leases = tagged(queue, ":machinery:leases")
        self.landing_prefix = tagged(queue, ":machinery:landing:")
        self.landing = self.landing_prefix + consumer
        self.consumers = tagged(queue, ":machinery:consumers")
        self.redelivered = tagged(queue, ":machinery:redelivered")
        seq = tagged(queue, ":machinery:seq")
        claimed = tagged(queue, ":machinery:claimed:") + consumer
        self.claim = [queue, self.landing, self.consumers, self.inflight, self.leases, self.redelivered, seq, claimed]


class _DeadLetter(msgspec.Struct, rename="pascal"):
    queue: str
    reason: str
    time: str
    body: str
    encoding: str = "utf-8"


_DL_ENC = msgspec.json.Encoder()
_DL_DEC = msgspec.json.Decoder(_DeadLetter)
_wrap = wrap_errors(BrokerError, "redis broker")
_TRANSIENT = (OSError, _RConnectionError, _RTimeoutError)


class RedisBroker(Broker, Leases, EarlyHandout, BlockingPublish, DelayedListing, DeadLetterListing):
    """Reliable Redis broker, wire-compatible with Go Machinery's redis broker."""

    #: messages moved per delayed-set step; expired leases and dead consumers reaped per fetch
    move_batch = 1000
    reap_limit = 1000
    #: seconds a BLMOVE-landed message runs unclaimed: a task done by then (with its state stored
    #: on this Redis) costs no claim, see landing.py; a slower one is claimed then
    landed_claim_delay = 0.005

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.broker)
        self.target = parse_redis_url(self.url, cnf, "broker")
        #: seconds a fetched message stays claimed without renew(); the worker renews well within it
        self.lease_seconds = cnf.redis.lease_seconds
        self._consumer = ("", 0)  # (id, pid): see consumer_id
        self.delayed_key = cnf.redis.delayed_tasks_key or "delayed_tasks"
        self.moving_key = tagged(self.delayed_key, ":machinery:moving")
        self.dead_letter_key = DEAD_LETTER_KEY
        self._clients = Clients(self.target, cnf)
        self._blocking = BlockingClient(self.target, cnf)
        self._lanes: PerLoop[Lane] = PerLoop()  # the fetch loop's own connection
        self._keys: dict[str, _Keys] = {}
        self._next_move = 0.0  # monotonic time of the next look at the delayed set
        period = cnf.redis.delayed_tasks_poll_period or 500
        self._move_period = period / 1000.0
        self._cluster = self.target.cluster
        #: deliveries handed out straight from BLMOVE, not yet committed or claimed
        self._landing = Landings()
        self._claimed_extra: dict[str, list[Delivery]] = {}
        #: queue -> monotonic time of its next lease lapse, set when a landed message's claim or
        #: commit found the queue empty: the next fetch blocks at once instead of claiming again
        #: (one round trip less per task when work trickles in)
        self._drained: dict[str, float] = {}
        #: queue -> monotonic time of its next lease lapse, as the last claim saw it
        self._lapse_at: dict[str, float] = {}
        #: queue -> the token of a claim that raised (its reply may have been lost after Redis ran
        #: it): the next claim of that queue sends it again, to get back what that claim took
        self._unanswered: dict[str, str] = {}

    # --- plumbing --------------------------------------------------------------------------

    @property
    def consumer_id(self) -> str:
        """This process's consumer name (its landing list and its entry in the consumers zset).

        Made per process: a broker built before fork() (the worker supervisor imports the app,
        then forks) must not give its children one shared landing list.
        """
        cid, pid = self._consumer
        if pid != os.getpid():
            cid = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
            self._consumer = (cid, os.getpid())
            self._keys.clear()  # they name the landing list
        return cid

    async def _client(self) -> Client:
        return await self._clients.get()

    def _queue_keys(self, queue: str) -> _Keys:
        consumer = self.consumer_id  # first: after a fork it drops the parent's keys
        keys = self._keys.get(queue)
        if keys is None:
            keys = _Keys(queue, consumer)
            if self._cluster and not same_slot(queue, keys.consumers):
                raise BrokerError(f"queue name {queue!r} has a hash tag this broker cannot share a slot with")
            self._keys[queue] = keys
        return keys

    def _lease_ms(self) -> int:
        return max(1, int(self.lease_seconds * 1000))

    def _route(self, sig: Signature) -> str:
        return sig.routing_key or self.cnf.default_queue

    # --- publish ---------------------------------------------------------------------------

    @_wrap
    async def publish(self, sig: Signature, body: bytes, eta_ns: int | None) -> None:
        client = await self._client()
        if eta_ns is not None and eta_ns > time.time_ns():
            await lua.DELAY(client, [self.delayed_key], [_seed(), eta_ns, body])
            self._note_eta(eta_ns)
        else:
            await client.rpush(self._route(sig), body)

    @_wrap
    async def publish_many(self, items: Sequence[PublishItem]) -> None:
        batch = Batch()
        self.publish_ops(batch, items)
        if batch:
            await batch.run(await self._client())

    def publish_ops(self, batch: Batch, items: Sequence[PublishItem]) -> None:
        """Add the publishes to a batch (also used by a Redis backend on the same server)."""
        now = time.time_ns()
        ready: dict[str, list[bytes]] = {}
        later: list[Any] = []
        for sig, body, eta_ns in items:
            if eta_ns is not None and eta_ns > now:
                later += (eta_ns, body)
                self._note_eta(eta_ns)
            else:
                ready.setdefault(self._route(sig), []).append(body)
        for queue, bodies in ready.items():
            batch.command("RPUSH", queue, *bodies)
        if later:
            batch.script(lua.DELAY, [self.delayed_key], [_seed(), *later])

    def capability(self, kind: type[C]) -> C | None:
        """BlockingPublish on a standalone server only (Sentinel and Cluster take the asyncio path)."""
        if kind is BlockingPublish and not self._blocking.available:
            return None
        return super().capability(kind)

    @wrap_blocking_errors(BrokerError, "redis broker")
    def publish_blocking(self, item: PublishItem) -> bool:
        """One ready message in one blocking RPUSH, in the caller's thread."""
        queue = self.ready_queue(item)
        if queue is None:
            return False
        self._blocking.call("RPUSH", queue, item[1])
        return True

    def ready_queue(self, item: PublishItem) -> str | None:
        """The list a message goes to now, or None when its ETA holds it in the delayed set."""
        sig, _, eta_ns = item
        if eta_ns is not None and eta_ns > time.time_ns():
            return None
        return self._route(sig)

    def _note_eta(self, eta_ns: int) -> None:
        at = time.monotonic() + max(0.0, (eta_ns - time.time_ns()) / 1e9)
        self._next_move = min(self._next_move, at)

    # --- consume ---------------------------------------------------------------------------

    @_wrap
    async def fetch(self, queue: str, max_count: int, wait: float) -> list[Delivery]:
        """Claim up to max_count in one round trip; else block up to `wait` (BLMOVE wakes on a publish)."""
        client = await self._client()
        lane = self._lanes.get(lambda: Lane(client, self.target))
        keys = self._queue_keys(queue)
        deadline = time.monotonic() + max(0.0, wait)
        max_count = max(1, max_count)
        backoff = 0.05
        while True:
            if self._landing:  # a claim drains the landing list: wait until it holds no handed-out message
                await self._landing.resolved()
            extra = self._claimed_extra.pop(queue, None)
            if extra:
                return extra
            try:
                lapse = self._drained.pop(queue, None)
                if time.monotonic() >= self._next_move:
                    await self._move_due(client)
                    lapse = None
                if lapse is None:
                    got, next_lease = await self._claim(lane, keys, max_count)
                    if got:
                        return got
                else:
                    next_lease = lapse - time.monotonic()
                if cancel_requested():
                    raise asyncio.CancelledError
                now = time.monotonic()
                left = deadline - now
                if left <= 0:
                    return []
                # wake for the next delayed message and the next lease to lapse, as well as a publish
                block = min(left, self._next_move - now, self._block_cap(), next_lease)
                if block < 0.001:
                    await asyncio.sleep(max(0.0, block))
                    continue
                landed = await lane.call("BLMOVE", queue, keys.landing, "LEFT", "RIGHT", round(block, 3))
                if landed is None:
                    if cancel_requested():
                        raise asyncio.CancelledError
                    continue
                # The message is ours (in our landing list): hand it out now, unclaimed. A task done
                # within landed_claim_delay is committed straight from the landing list; else it
                # is claimed then (anything else the claim finds is kept for the next fetch).
                d = Delivery(landed, keys.queue)
                self._landing.add(d, functools.partial(self._claim_landed, lane, keys, d, max_count),
                                  self.landed_claim_delay)
                return [d]
            except _TRANSIENT as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrokerError(f"redis broker fetch from {queue!r}: {exc}") from exc
                await asyncio.sleep(min(backoff, left))
                backoff = min(backoff * 2, 1.0)

    def _block_cap(self) -> float:
        """Block well inside both the lease (set just before) and the socket read timeout."""
        cap = self.lease_seconds / 2
        read = self.cnf.redis.read_timeout
        if read:
            cap = min(cap, max(0.05, read - 1.0))
        return cap

    async def _claim_landed(self, lane: Lane, keys: _Keys, d: Delivery, count: int) -> None:
        """Claim what our landing list holds (and up to `count` in all) and give `d` its receipt;
        retried until it works (the landing list keeps the message meanwhile, and a dead
        consumer's list is reaped)."""
        backoff = 0.05
        while True:
            try:
                got, next_lease = await self._claim(lane, keys, count)
                break
            except _TRANSIENT as exc:
                get_logger().warning("claiming a landed message from %s failed, retrying: %s", keys.queue, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
        rest: list[Delivery] = []
        for c in got:
            if d.receipt is None and c.body == d.body:
                d.receipt, d.redelivered, d.attempts = c.receipt, c.redelivered, c.attempts
            else:
                rest.append(c)
        if rest:  # more queued work, or left in the landing list by a fetch cancelled inside BLMOVE
            self._claimed_extra.setdefault(keys.queue, []).extend(rest)
        if len(got) < count:
            self._drained[keys.queue] = time.monotonic() + next_lease

    def unclaimed(self, delivery: Delivery) -> bool:
        return delivery in self._landing

    def claim_soon(self, delivery: Delivery) -> None:
        self._landing.claim(delivery)

    def hold(self, delivery: Delivery) -> bool:
        return self._landing.hold(delivery)

    def take_landed(self, deliveries: Sequence[Delivery]) -> list[Delivery]:
        """Hold the landed, unclaimed deliveries among these for a landed commit; return them."""
        return [d for d in deliveries if d in self._landing and self._landing.hold(d) and d.receipt is None]

    async def settle(self, deliveries: Sequence[Delivery]) -> None:
        await self._landing.settle(deliveries)

    def landed_groups(
        self, paired: Sequence[tuple[T, Delivery]]
    ) -> list[tuple[list[str], list[Any], list[tuple[T, Delivery]]]]:
        """The held landed deliveries of `paired` by queue, for the result backend's landed commit:
        keys (landing list, consumers, queue), arguments (consumer id, lease ms) and the items."""
        groups: dict[str, list[tuple[T, Delivery]]] = {}
        for item, d in paired:
            if d.receipt is None and self._landing.held(d):
                groups.setdefault(d.queue, []).append((item, d))
        out = []
        for queue, items in groups.items():
            keys = self._queue_keys(queue)
            out.append(([keys.landing, keys.consumers, queue], [self.consumer_id, self._lease_ms()], items))
        return out

    def landed_committed(self, deliveries: Sequence[Delivery], queue_length: int) -> None:
        """A landed commit ran; with its queue found empty, the next fetch blocks at once."""
        if deliveries and queue_length == 0:
            queue = deliveries[0].queue
            self._drained[queue] = self._lapse_at.get(queue, time.monotonic())
        self._landing.committed(deliveries)

    def landed_failed(self, deliveries: Sequence[Delivery]) -> None:
        self._landing.failed(deliveries)

    async def _claim(self, lane: Lane, keys: _Keys, count: int) -> tuple[list[Delivery], float]:
        """One round trip: reap lapsed leases, claim up to `count`; also seconds to the next lapse.

        A claim that raised may have run on Redis all the same (the connection dropped before its
        reply, or Redis died after writing it to its AOF): its token goes with the next claim,
        which then hands back what it took, instead of those messages waiting out their leases
        claimed by nobody. (The client's own retries of a command send the same token too.)"""
        token = self._unanswered.pop(keys.queue, None) or uuid.uuid4().hex
        try:
            ids, bodies, counts, next_ms = await lane.script(
                lua.CLAIM, keys.claim,
                [self.consumer_id, self._lease_ms(), count, keys.landing_prefix, self.reap_limit, token])
        except BaseException:
            self._unanswered[keys.queue] = token
            raise
        next_lease = next_ms / 1000.0 if next_ms >= 0 else float("inf")
        self._lapse_at[keys.queue] = time.monotonic() + min(next_lease, 86400.0)
        if not counts:
            return [Delivery(b, keys.queue, i) for i, b in zip(ids, bodies, strict=True)], next_lease
        return [
            Delivery(b, keys.queue, i, redelivered=c > 0, attempts=c + 1)
            for i, b, c in zip(ids, bodies, counts, strict=True)
        ], next_lease

    @_wrap
    async def ack(self, deliveries: Sequence[Delivery]) -> None:
        await self.settle(deliveries)
        batch = Batch()
        self.ack_ops(batch, deliveries)
        if batch:
            await batch.run(await self._client())

    def ack_ops(self, batch: Batch, deliveries: Sequence[Delivery]) -> None:
        """Add the acks to a batch (also used by a Redis backend on the same server); settle() first."""
        for queue, ids in _group(deliveries).items():
            keys = self._queue_keys(queue)
            batch.script(lua.ACK, [keys.inflight, keys.leases, keys.redelivered], ids)

    def ack_groups(self, paired: Sequence[tuple[T, Delivery]]) -> list[tuple[list[str], list[tuple[T, Any]]]]:
        """`paired` grouped by queue: the queue's ack keys (inflight, leases, redelivered) and each
        item with its delivery's receipt id; deliveries not claimed here are left out."""
        groups: dict[str, list[tuple[T, Any]]] = {}
        for item, d in paired:
            if d.receipt is not None:
                groups.setdefault(d.queue, []).append((item, d.receipt))
        out = []
        for queue, items in groups.items():
            keys = self._queue_keys(queue)
            out.append(([keys.inflight, keys.leases, keys.redelivered], items))
        return out

    @_wrap
    async def renew(self, deliveries: Sequence[Delivery]) -> None:
        """Extend the leases of these deliveries (one round trip); lapsed ones are not revived."""
        await self.settle(deliveries)
        batch = Batch()
        for queue, ids in _group(deliveries).items():
            batch.script(lua.RENEW, [self._queue_keys(queue).leases], [self._lease_ms(), *ids])
        if batch:
            await batch.run(await self._client())

    @_wrap
    async def requeue(self, deliveries: Sequence[Delivery], delay: float = 0.0) -> None:
        """Back to the tail of their queue, or into the delayed set; only messages still claimed."""
        await self.settle(deliveries)
        client = await self._client()
        groups = _group(deliveries)
        batch = Batch()
        if delay <= 0:
            for queue, ids in groups.items():
                keys = self._queue_keys(queue)
                batch.script(lua.RETURN, [keys.inflight, keys.leases, queue, keys.redelivered], ["push", 0, 0, *ids])
            if batch:
                await batch.run(client)
            return
        eta_ns = time.time_ns() + int(delay * 1e9)
        if not self._cluster:
            for queue, ids in groups.items():
                keys = self._queue_keys(queue)
                batch.script(lua.RETURN, [keys.inflight, keys.leases, self.delayed_key, keys.redelivered],
                             ["delay", eta_ns, _seed(), *ids])
        else:  # other slots: delayed set first, then release (a crash between can only duplicate)
            pairs = [x for d in deliveries if d.receipt is not None for x in (eta_ns, d.body)]
            if pairs:
                await lua.DELAY(client, [self.delayed_key], [_seed(), *pairs])
            for queue, ids in groups.items():
                keys = self._queue_keys(queue)
                batch.script(lua.RETURN, [keys.inflight, keys.leases, keys.leases, keys.redelivered],
                             ["drop", 0, 0, *ids])
        if batch:
            await batch.run(client)
        self._note_eta(eta_ns)

    @_wrap
    async def dead_letter(self, delivery: Delivery, reason: str) -> None:
        await self.settle([delivery])
        keys = self._queue_keys(delivery.queue)
        entry = _encode_dead(delivery, reason)
        client = await self._client()
        if delivery.receipt is None:  # not claimed through this broker: record it anyway
            await client.rpush(self.dead_letter_key, entry)
        elif not self._cluster:
            await lua.DEAD_LETTER(client, [keys.inflight, keys.leases, self.dead_letter_key, keys.redelivered],
                                  [delivery.receipt, entry])
        else:  # other slots: record first, then release (a crash between can only duplicate)
            await client.rpush(self.dead_letter_key, entry)
            await lua.ACK(client, [keys.inflight, keys.leases, keys.redelivered], [delivery.receipt])

    # --- delayed messages ------------------------------------------------------------------

    async def _move_due(self, client: Client) -> None:
        """Move every due delayed message to its queue, in batches, atomically (see scripts.py)."""
        next_score: Any = None
        for _ in range(16):
            now_ns = time.time_ns()
            if self._cluster:
                moved, next_score = await self._move_due_cluster(client, now_ns)
            else:
                moved, next_score = await lua.MOVE_DUE(
                    client, [self.delayed_key], [now_ns, self.move_batch, self.cnf.default_queue])
            if moved < self.move_batch:
                break
        wait = self._move_period
        if next_score is not None:
            wait = min(wait, max(0.0, (float(next_score) - time.time_ns()) / 1e9))
        self._next_move = time.monotonic() + wait

    async def _move_due_cluster(self, client: Client, now_ns: int) -> tuple[int, Any]:
        pairs, next_score = await lua.CLAIM_DUE(
            client, [self.delayed_key, self.moving_key],
            [now_ns, self.move_batch, self._lease_ms(), self.cnf.default_queue])
        if not pairs:
            return 0, next_score
        ready: dict[str, list[bytes]] = {}
        members = pairs[1::2]
        for queue, member in zip(pairs[0::2], members, strict=True):
            ready.setdefault(queue.decode(), []).append(member.rstrip(_WS))
        batch = Batch()
        for queue, bodies in ready.items():
            batch.command("RPUSH", queue, *bodies)
        await batch.run(client)
        await client.zrem(self.moving_key, *members)
        return len(members), next_score

    # --- inspection ------------------------------------------------------------------------

    @_wrap
    async def pending(self, queue: str) -> list[bytes]:
        client = await self._client()
        items: list[bytes] = await client.lrange(queue, 0, -1)
        return items

    @_wrap
    async def delayed(self) -> list[bytes]:
        client = await self._client()
        items: list[bytes] = await client.zrange(self.delayed_key, 0, -1)
        return [m.rstrip(_WS) for m in items]

    @_wrap
    async def dead_letters(self) -> list[tuple[bytes, str]]:
        out: list[tuple[bytes, str]] = []
        client = await self._client()
        for raw in await client.lrange(self.dead_letter_key, 0, -1):
            try:
                e = _DL_DEC.decode(raw)
            except msgspec.DecodeError:
                out.append((raw, "unreadable dead-letter entry"))
                continue
            body = e.body.encode() if e.encoding == "utf-8" else _b64decode(e.body)
            out.append((body, e.reason))
        return out

    @_wrap
    async def inflight(self, queue: str) -> list[bytes]:
        """Bodies claimed from `queue` by any consumer and not yet acked (for tests and tools)."""
        client = await self._client()
        items: list[bytes] = await client.hvals(self._queue_keys(queue).inflight)
        return items

    async def close(self) -> None:
        """Release the current loop's connections (claims stay until acked or their leases lapse)."""
        self._landing.close()
        lane = self._lanes.pop_current()
        if lane is not None:
            await lane.close()
        await self._clients.close()
        self._blocking.close()


def _group(deliveries: Sequence[Delivery]) -> dict[str, list[Any]]:
    """Receipt ids by queue; deliveries without a receipt were not claimed here and are skipped."""
    out: dict[str, list[Any]] = {}
    for d in deliveries:
        if d.receipt is not None:
            out.setdefault(d.queue, []).append(d.receipt)
    return out


def _seed() -> int:
    return random.randrange(1, 1 << 30)


def _encode_dead(d: Delivery, reason: str) -> bytes:
    try:
        text, enc = d.body.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        import base64

        text, enc = base64.b64encode(d.body).decode(), "base64"
    now = gojson.format_time(datetime.now(UTC))
    return _DL_ENC.encode(_DeadLetter(queue=d.queue, reason=reason, time=now, body=text, encoding=enc))


def _b64decode(text: str) -> bytes:
    import base64

    return base64.b64decode(text)


