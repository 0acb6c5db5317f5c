"""The Redis broker and result backend on one server: sends and commits in one round trip.

A send stores PENDING (SET NX) and pushes the message in one pipeline, or one script for one
task (SEND_ONE), also in the caller's thread for the sync facade. A worker's commit stores final
states and acks messages in one pipeline; a task's state and its message's ack go in one script
(COMMIT, the broker's ack inside), so neither lands without the other; a task never claimed (a
blocked fetch moved it into the consumer's landing list) is committed from there (COMMIT_LANDED).
The broker and the backend do not know each other: this module joins them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from machinery.drivers.capabilities import BlockingSend, JointCommit, JointSend, Pairing, Send
from machinery.drivers.redis import scripts as broker_lua
from machinery.drivers.redis.backend import STORE_FN, RedisBackend, state_arg, wrap_backend
from machinery.drivers.redis.broker import RedisBroker
from machinery.drivers.redis.client import Batch, LuaScript
from machinery.drivers.redis.waits import CHANNEL_PREFIX
from machinery.errors import BackendError
from machinery.tasks.state import encode_state

if TYPE_CHECKING:
    from machinery.drivers.backend import Backend
    from machinery.drivers.broker import Broker, Delivery, PublishItem
    from machinery.tasks.state import TaskState

C = TypeVar("C")

# A worker's commit of finished tasks, atomic: their final states, then their acks; an error in
# a state write stops the script before any ack, so no message is released without its state.
# KEYS: n task uuids, then the queue's inflight, leases and redelivered keys. ARGV: expiry,
# channel prefix, n state arguments (see backend.STORE_FN), then the n delivery ids.
COMMIT = LuaScript(STORE_FN + broker_lua.ACK_FN + """
local n = #KEYS - 3
store(ARGV[1], ARGV[2], 1, n, 2)
local ids = {}
for i = n + 3, #ARGV do ids[#ids + 1] = ARGV[i] end
ack(KEYS[n + 1], KEYS[n + 2], KEYS[n + 3], ids)
return n
""")

# A worker's commit of tasks whose messages it never claimed (a blocked fetch's BLMOVE dropped each
# in the consumer's landing list): their final states, then each message out of the landing list,
# and the consumer's deadline renewed (only while it is registered: a reaped consumer's list is
# already back on the queue, so its messages run again, as any lapsed claim's). KEYS: n task uuids,
# then the landing list, consumers zset and queue. ARGV: expiry, channel prefix, n state arguments,
# consumer id, lease ms, then the n message bodies. Returns the queue's length.
COMMIT_LANDED = LuaScript(STORE_FN + """
local n = #KEYS - 3
store(ARGV[1], ARGV[2], 1, n, 2)
for i = n + 5, #ARGV do redis.call('LREM', KEYS[n + 1], 1, ARGV[i]) end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[n + 2], 'XX', now + tonumber(ARGV[n + 4]), ARGV[n + 3])
return redis.call('LLEN', KEYS[n + 3])
""")

# KEYS: task uuid, queue. ARGV: expiry, PENDING JSON, message[, completion channel]. One task sent
# in one command (a pipeline of SET and RPUSH costs redis-py about half a round trip more). With a
# channel, returns its subscriber count: above 0, a subscription made before the send is in place.
SEND_ONE = LuaScript("""
redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[1], 'NX')
local n = redis.call('RPUSH', KEYS[2], ARGV[3])
if ARGV[4] then return redis.call('PUBSUB', 'NUMSUB', ARGV[4])[2] end
return n
""")


def pair(broker: Broker, backend: Backend) -> Pairing | None:
    """The pairing of a Redis broker and a Redis backend on the same standalone or Sentinel
    server (a cluster spreads task keys and queues over nodes: no shared script there)."""
    if not isinstance(broker, RedisBroker) or not isinstance(backend, RedisBackend):
        return None
    if broker.target != backend.target or backend.target.cluster:
        return None
    return RedisPairing(broker, backend)


class RedisPairing(Pairing, JointSend, JointCommit, BlockingSend):
    """JointSend and JointCommit; BlockingSend on a standalone server (not Sentinel)."""

    def __init__(self, broker: RedisBroker, backend: RedisBackend) -> None:
        self.broker = broker
        self.backend = backend

    def capability(self, kind: type[C]) -> C | None:
        if kind is BlockingSend and not self.backend.blocking.available:
            return None
        return super().capability(kind)

    # --- JointSend -------------------------------------------------------------------------

    @wrap_backend
    async def send(self, states: Sequence[TaskState], items: Sequence[PublishItem]) -> None:
        """PENDING states and the publish in one pipeline; one task in one script call."""
        broker, backend = self.broker, self.backend
        if len(states) == 1 and len(items) == 1 and (queue := broker.ready_queue(items[0])) is not None:
            state = states[0]
            await backend.waits.send(await backend.send_lane(), SEND_ONE, [state.task_uuid, queue],
                                     [backend.expire_in, encode_state(state), items[0][1]])
            return
        batch = Batch()
        backend.pending_ops(batch, states)
        broker.publish_ops(batch, items)
        await batch.run(await backend.client())

    # --- BlockingSend ----------------------------------------------------------------------

    def send_blocking(self, state: TaskState, item: PublishItem) -> bool:
        """One ready task in one blocking script call (SEND_ONE, as on the asyncio path)."""
        queue = self.broker.ready_queue(item)
        if queue is None:
            return False
        backend = self.backend
        backend.blocking.send(SEND_ONE, [state.task_uuid, queue], [backend.expire_in, encode_state(state), item[1]])
        return True

    # --- JointCommit -----------------------------------------------------------------------

    async def commit(
        self, states: Sequence[TaskState], acks: Sequence[Delivery],
        paired: Sequence[tuple[TaskState, Delivery]] = (), sends: Sequence[Send] = (),
    ) -> tuple[Exception | None, Exception | None, list[int]]:
        """States and acks in one pipeline; each paired state and its ack in one script, so
        neither lands without the other; follow-up sends after the states."""
        broker, backend = self.broker, self.backend
        taken = broker.take_landed(acks)  # acked from the landing list, no claim first
        if taken:
            out = {id(d) for d in taken}
            acks = [d for d in acks if id(d) not in out]
        if acks or paired:
            await broker.settle([*acks, *(d for _, d in paired)])
        groups = broker.landed_groups(paired)
        in_groups = {id(d) for _, _, items in groups for _, d in items}
        # a pair whose message has no receipt and is not landed here has nothing to ack
        loose = [s for s, d in paired if d.receipt is None and id(d) not in in_groups]
        batch = Batch()
        backend.state_ops(batch, [*states, *loose] if loose else states)
        head = [backend.expire_in, CHANNEL_PREFIX]
        chunk = backend.chunk
        for keys, pairs in broker.ack_groups(paired):
            for i in range(0, len(pairs), chunk):
                part = pairs[i:i + chunk]
                batch.script(COMMIT, [*(s.task_uuid for s, _ in part), *keys],
                             [*head, *(state_arg(s) for s, _ in part), *(r for _, r in part)])
        landed: list[tuple[int, list[Delivery]]] = []  # batch index, its deliveries
        for keys, args, items in groups:
            landed.append((len(batch), [d for _, d in items]))
            batch.script(COMMIT_LANDED, [*(s.task_uuid for s, _ in items), *keys],
                         [*head, *(state_arg(s) for s, _ in items), *args, *(d.body for _, d in items)])
        spans = []  # each send's commands in the batch
        for pending, messages in sends:  # follow-ups go out after the states they follow
            start = len(batch)
            backend.pending_ops(batch, pending)
            broker.publish_ops(batch, messages)
            spans.append((start, len(batch)))
        n = len(batch)  # the state writes and sends (results[n:] are acks only)
        broker.ack_ops(batch, acks)
        for keys, args, no_states in broker.landed_groups([(None, d) for d in taken]):
            landed.append((len(batch), [d for _, d in no_states]))  # no state: just out of the landing list
            batch.script(COMMIT_LANDED, keys, [*head, *args, *(d.body for _, d in no_states)])
        try:
            client = await backend.client()
            results = await batch.run(client, raise_errors=False, lane=await backend.commit_lane())
        except Exception as exc:
            for _, ds in landed:
                broker.landed_failed(ds)
            return ((BackendError(f"redis backend: {exc}") if states or paired or sends else None),
                    exc if acks or taken else None, list(range(len(sends))))
        for i, ds in landed:
            if isinstance(results[i], Exception):
                broker.landed_failed(ds)
            else:
                broker.landed_committed(ds, int(results[i]))
        failed_states = next((r for r in results[:n] if isinstance(r, Exception)), None)
        failed_acks = next((r for r in results[n:] if isinstance(r, Exception)), None)
        unsent = [i for i, (a, b) in enumerate(spans) if any(isinstance(r, Exception) for r in results[a:b])]
        return (None if failed_states is None else BackendError(f"redis backend: {failed_states}"),
                failed_acks, unsent)
