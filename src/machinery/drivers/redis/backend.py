"""Redis result backend, with Go Machinery's keys: the task UUID key holds the TaskState JSON and the
group UUID key the GroupMeta JSON, each written with SET ... EX results_expire_in.

Beyond Go: states are stored in one round trip per batch; Go's merge (later states keep the stored
TaskName and CreatedAt) runs inside the same Lua script; a completed state is PUBLISHed on
`machinery:done:<uuid>` so waiters wake at once; group progress is counted once per member in
`{group}:machinery:progress` (same cluster slot as the group key); the chord flag flips atomically
and respects Go's redsync `TriggerChordMutex`, so a mixed Go/Python fleet never fires a chord twice.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, TypeVar

from machinery.drivers.backend import Backend, GroupProgress
from machinery.drivers.capabilities import BlockingReads, ConditionalPending
from machinery.drivers.redis.blocking import BlockingRedis
from machinery.drivers.redis.client import (
    Batch,
    Client,
    Clients,
    Lane,
    LuaScript,
    tagged,
    wrap_errors,
)
from machinery.drivers.redis.notify import AsyncWaits
from machinery.drivers.redis.url import parse_redis_url
from machinery.drivers.redis.waits import CHANNEL_PREFIX
from machinery.errors import BackendError
from machinery.loops import PerLoop
from machinery.tasks import gojson
from machinery.tasks.state import (
    PENDING,
    GroupMeta,
    TaskState,
    decode_group_meta,
    decode_state,
    encode_group_meta,
    encode_state,
)

if TYPE_CHECKING:
    from machinery.config import Config

C = TypeVar("C")

CHORD_MUTEX = "TriggerChordMutex"  # Go's redsync mutex, one for all groups
_ZERO_TOKEN = gojson.encode(gojson.ZERO_TIME)
_NAME_KEY = b'"TaskName":'
_CREATED_KEY = b'"CreatedAt":'

# The raw JSON string token after `key` in a stored state, quotes included, so that the merged
# value keeps exactly the bytes (and Go's escaping) it was stored with.
_RAW_STRING = """
local function raw_string(s, key)
  local _, e = string.find(s, key, 1, true)
  if not e then return nil end
  local p = e + 2
  while true do
    local q = string.find(s, '"', p, true)
    if not q then return nil end
    local k, n = q - 1, 0
    while k > e + 1 and string.byte(s, k) == 92 do n = n + 1; k = k - 1 end
    if n % 2 == 0 then return string.sub(s, e + 1, q) end
    p = q + 1
  end
end
"""

# store(first, last, base) writes KEYS[first..last] from ARGV[base + i]: a flag digit (1 merge
# TaskName, 2 merge CreatedAt, 4 publish) and the JSON; merging CreatedAt only (a worker's state),
# the JSON cut in two at the CreatedAt value, which is Go's zero time unless one is stored; merging
# TaskName, in five NUL-separated parts (head, name token, middle, created token, tail). One
# argument per state keeps packing cheap.
STORE_FN = _RAW_STRING + """
local ZERO = '""" + _ZERO_TOKEN.decode() + """'
local function store(ex, prefix, first, last, base)
  for i = first, last do
    local key, arg = KEYS[i], ARGV[base + i]
    local flags = string.byte(arg, 1) - 48
    local json
    if flags % 4 == 0 then
      json = string.sub(arg, 2)
    elseif flags % 2 == 0 then
      local q = string.find(arg, '\\0', 2, true)
      local old = redis.call('GET', key)
      local created = old and raw_string(old, '"CreatedAt":') or ZERO
      json = string.sub(arg, 2, q - 1) .. created .. string.sub(arg, q + 1)
    else
      local cut, p = {}, 2
      for k = 1, 4 do
        local q = string.find(arg, '\\0', p, true)
        cut[k] = string.sub(arg, p, q - 1)
        p = q + 1
      end
      local name, created = cut[2], cut[4]
      local old = redis.call('GET', key)
      if old then
        if flags % 2 == 1 then name = raw_string(old, '"TaskName":') or name end
        if math.floor(flags / 2) % 2 == 1 then created = raw_string(old, '"CreatedAt":') or created end
      end
      json = cut[1] .. name .. cut[3] .. created .. string.sub(arg, p)
    end
    redis.call('SET', key, json, 'EX', ex)
    if flags >= 4 then redis.call('PUBLISH', prefix .. key, json) end
  end
end
"""

# KEYS: task uuids. ARGV: expiry, channel prefix, then one state argument per key (see store).
SET_STATES = LuaScript(STORE_FN + """
store(ARGV[1], ARGV[2], 1, #KEYS, 2)
return #KEYS
""")

# KEYS: task uuids. ARGV: expiry, the state JSONs in KEYS order, each ended by a newline (encoded
# JSON has none of its own). SET NX EX each (set_pending). One blob instead of an argument per
# state: redis-py packs arguments one by one in Python.
SET_PENDING = LuaScript("""
local ex, blob, p = ARGV[1], ARGV[2], 1
for _, key in ipairs(KEYS) do
  local q = string.find(blob, '\\n', p, true)
  redis.call('SET', key, string.sub(blob, p, q - 1), 'EX', ex, 'NX')
  p = q + 1
end
return #KEYS
""")

# KEYS: progress hash. ARGV: task uuid, failed (0/1), expiry. Returns {done, failed, counted}.
MEMBER_DONE = LuaScript("""
local new = redis.call('HSETNX', KEYS[1], 'm:' .. ARGV[1], ARGV[2])
if new == 1 then
  redis.call('HINCRBY', KEYS[1], 'done', 1)
  if ARGV[2] == '1' then redis.call('HINCRBY', KEYS[1], 'failed', 1) end
end
redis.call('EXPIRE', KEYS[1], ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'done', 'failed')
return {tonumber(v[1] or '0'), tonumber(v[2] or '0'), new}
""")

# KEYS: group meta, progress hash[, Go's TriggerChordMutex (standalone: checked in the same step)].
# ARGV: token of this call (a retried call that already won still wins), expiry.
# Returns 1 fired by this token, 0 already fired or no group, -1 Go holds the mutex: retry.
TRIGGER = LuaScript("""
if KEYS[3] and redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local meta = redis.call('GET', KEYS[1])
if not meta then return 0 end
local function mine()
  if redis.call('HGET', KEYS[2], 'chord') == ARGV[1] then return 1 end
  return 0
end
local out
local s, e = string.find(meta, '"ChordTriggered":false', 1, true)
if s then
  out = string.sub(meta, 1, s - 1) .. '"ChordTriggered":true' .. string.sub(meta, e + 1)
elseif string.find(meta, '"ChordTriggered":true', 1, true) then
  return mine()
else
  local ok, obj = pcall(cjson.decode, meta)
  if not ok or type(obj) ~= 'table' then return redis.error_reply('group meta is not JSON') end
  if obj['ChordTriggered'] == true then return mine() end
  obj['ChordTriggered'] = true
  out = cjson.encode(obj)
end
redis.call('SET', KEYS[1], out, 'EX', ARGV[2])
redis.call('HSET', KEYS[2], 'chord', ARGV[1])
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
""")

# redsync's release: delete the mutex only if it still holds our token.
UNLOCK = LuaScript("""
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
""")

#: redis-py errors become BackendError (also for the pairing's calls)
wrap_backend = wrap_errors(BackendError, "redis backend")
_wrap = wrap_backend


class RedisBackend(Backend, ConditionalPending):
    """Go-compatible Redis result backend with atomic group counting and wake-on-completion."""

    #: states per script call in standalone mode (the whole batch still goes in one round trip)
    chunk = 256
    #: PENDING states per script call in standalone mode (set_pending)
    pending_chunk = 1000
    #: how long trigger_chord waits for a Go worker holding TriggerChordMutex (its expiry is 8 s)
    mutex_wait = 10.0

    def __init__(self, cnf: Config, url: str = "") -> None:
        super().__init__(cnf, url or cnf.result_backend)
        self.target = parse_redis_url(self.url, cnf, "result_backend")
        self._clients = Clients(self.target, cnf)
        #: the asyncio face of result waits, and of the pairing's one-task sends
        self.waits = AsyncWaits(self._clients.get)
        self._cluster = self.target.cluster
        #: the blocking face: BlockingReads, and the pairing's blocking send
        self.blocking = BlockingRedis(self.target, cnf)
        self._lanes: PerLoop[Lane] = PerLoop()
        self._send_lanes: PerLoop[Lane] = PerLoop()  # one-task sends: no pool checkout per send

    async def client(self) -> Client:
        """This event loop's pooled client."""
        return await self._clients.get()

    async def commit_lane(self) -> Lane:
        """This loop's connection for a worker's commits (the pairing's joint commit)."""
        client = await self.client()
        return self._lanes.get(lambda: Lane(client, self.target))

    async def send_lane(self) -> Lane:
        """This loop's connection for one-task sends: no pool checkout per send."""
        client = await self.client()
        return self._send_lanes.get(lambda: Lane(client, self.target))

    @staticmethod
    def _progress_key(group_uuid: str) -> str:
        return tagged(group_uuid, ":machinery:progress")

    # --- states ----------------------------------------------------------------------------

    @_wrap
    async def set_states(self, states: Sequence[TaskState]) -> None:
        if not states:
            return
        batch = Batch()
        self.state_ops(batch, states)
        await batch.run(await self.client())

    def state_ops(self, batch: Batch, states: Sequence[TaskState]) -> None:
        """Add the writes of these states to a batch (see STORE_FN; also the pairing's commits)."""
        head = [self.expire_in, CHANNEL_PREFIX]
        if self._cluster:  # every task key may live on another node: one script call each
            for s in states:
                batch.script(SET_STATES, [s.task_uuid], [*head, state_arg(s)])
        else:
            for i in range(0, len(states), self.chunk):
                part = states[i:i + self.chunk]
                batch.script(SET_STATES, [s.task_uuid for s in part], [*head, *map(state_arg, part)])

    @_wrap
    async def set_pending(self, states: Sequence[TaskState]) -> None:
        """PENDING only where no state is stored yet (SET NX), so it may race the publish safely."""
        if not states:
            return
        batch = Batch()
        self.pending_ops(batch, states)
        await batch.run(await self.client())

    def pending_ops(self, batch: Batch, states: Sequence[TaskState]) -> None:
        """Add SET NX writes of PENDING states to a batch (also the pairing's sends)."""
        ex = self.expire_in
        if self._cluster or len(states) == 1:  # cluster: every task key may live on another node
            for s in states:
                batch.command("SET", s.task_uuid, encode_state(s), "EX", ex, "NX")
            return
        # one script call per chunk: redis-py's per-command packing and parsing cost more than Redis
        for i in range(0, len(states), self.pending_chunk):
            part = states[i:i + self.pending_chunk]
            blob = b"\n".join(map(encode_state, part)) + b"\n"
            if blob.count(b"\n") == len(part):
                batch.script(SET_PENDING, [s.task_uuid for s in part], [ex, blob])
            else:  # cannot happen: JSON escapes newlines
                for s in part:
                    batch.command("SET", s.task_uuid, encode_state(s), "EX", ex, "NX")

    def capability(self, kind: type[C]) -> C | None:
        """BlockingReads on a standalone server (Sentinel and Cluster take the asyncio path)."""
        if kind is BlockingReads:
            return self.blocking if self.blocking.available and isinstance(self.blocking, kind) else None
        return super().capability(kind)

    @_wrap
    async def get_states(self, task_uuids: Sequence[str]) -> list[TaskState | None]:
        if not task_uuids:
            return []
        client = await self.client()
        if self._cluster:
            raw = await client.mget_nonatomic(list(task_uuids))
        else:
            raw = await client.mget(list(task_uuids))
        return [decode_state(r) if r is not None else None for r in raw]

    @_wrap
    async def purge_state(self, task_uuid: str) -> None:
        client = await self.client()
        await client.delete(task_uuid)

    # --- groups ----------------------------------------------------------------------------

    @_wrap
    async def init_group(self, group_uuid: str, task_uuids: Sequence[str]) -> None:
        """Create the group; a live one keeps its progress (a redelivered parent may send it again)."""
        meta = GroupMeta(group_uuid, list(task_uuids), created_at=gojson.now())
        client = await self.client()
        if await client.set(group_uuid, encode_group_meta(meta), ex=self.expire_in, nx=True):
            await client.delete(self._progress_key(group_uuid))  # left over from an expired namesake
        else:
            await client.expire(group_uuid, self.expire_in)

    @_wrap
    async def get_group_meta(self, group_uuid: str) -> GroupMeta | None:
        client = await self.client()
        raw = await client.get(group_uuid)
        return decode_group_meta(raw) if raw is not None else None

    @_wrap
    async def group_member_done(self, group_uuid: str, task_uuid: str, total: int, failed: bool) -> GroupProgress:
        client = await self.client()
        done, nfailed, counted = await MEMBER_DONE(
            client, [self._progress_key(group_uuid)], [task_uuid, int(failed), self.expire_in])
        return GroupProgress(int(done), int(nfailed), bool(counted))

    @_wrap
    async def trigger_chord(self, group_uuid: str) -> bool:
        client = await self.client()
        token = uuid.uuid4().hex
        keys = [group_uuid, self._progress_key(group_uuid)]
        deadline = time.monotonic() + self.mutex_wait
        while True:
            if self._cluster:  # the mutex is in another slot: take it as redsync does
                if await client.set(CHORD_MUTEX, token, nx=True, px=8000):
                    try:
                        result = await TRIGGER(client, keys, [token, self.expire_in])
                    finally:
                        await UNLOCK(client, [CHORD_MUTEX], [token])
                else:
                    result = -1
            else:
                result = await TRIGGER(client, [*keys, CHORD_MUTEX], [token, self.expire_in])
            if result != -1:
                return bool(result == 1)
            if time.monotonic() >= deadline:
                raise BackendError(f"trigger_chord {group_uuid}: {CHORD_MUTEX} stayed locked for {self.mutex_wait}s")
            await asyncio.sleep(random.uniform(0.05, 0.25))  # redsync's retry delay

    @_wrap
    async def purge_group_meta(self, group_uuid: str) -> None:
        client = await self.client()
        await client.delete(group_uuid, self._progress_key(group_uuid))

    # --- waiting ---------------------------------------------------------------------------

    @_wrap
    async def wait_completed(self, task_uuid: str, timeout: float | None) -> TaskState | None:
        """Woken by the PUBLISH that stores the final state; re-reads cover states written by Go
        (which does not publish) and a lost pub/sub connection (see waits.py)."""
        return await self.waits.wait(task_uuid, timeout)

    async def close(self) -> None:
        await self.waits.close()
        for lanes in (self._lanes, self._send_lanes):
            lane = lanes.pop_current()
            if lane is not None:
                await lane.close()
        await self._clients.close()
        self.blocking.close()


def state_arg(s: TaskState) -> bytes:
    """The script's argument for one state: a flag digit and the JSON, cut open (NUL-separated) at
    the TaskName and CreatedAt values that the script fills from the stored state."""
    flags = 4 if s.is_completed() else 0
    merge_name = not s.task_name and s.state != PENDING
    merge_created = s.created_at is None and s.state != PENDING
    raw = encode_state(s)
    if not (merge_name or merge_created):
        return _FLAG[flags] + raw
    # where CreatedAt stands: found in Go's fields alone (the details after them, a progress
    # value say, may hold the same key); they are the start of the full encoding
    core = raw if not (s.exc_type or s.traceback or s.progress is not None) else encode_state(TaskState(
        s.task_uuid, s.state, task_name=s.task_name, results=s.results, error=s.error, ttl=s.ttl))
    created_at = core.rindex(_CREATED_KEY)
    if not merge_name:  # the usual worker state: cut at CreatedAt's (zero time) value
        j = created_at + len(_CREATED_KEY)
        return _FLAG[flags | 2] + raw[:j] + b"\0" + raw[j + len(_ZERO_TOKEN):]
    # the keys occur once: inside JSON strings a quote is always escaped
    i = raw.index(_NAME_KEY) + len(_NAME_KEY) if merge_name else 0
    j = created_at + len(_CREATED_KEY) if merge_created else len(raw)
    name = raw[i:i + 2] if merge_name else b""  # b'""'
    created = raw[j:j + len(_ZERO_TOKEN)] if merge_created else b""
    flags |= (1 if merge_name else 0) | (2 if merge_created else 0)
    return _FLAG[flags] + b"\0".join((raw[:i], name, raw[i + len(name):j], created, raw[j + len(created):]))


_FLAG = [str(n).encode() for n in range(8)]
