"""Lua scripts of the Redis broker: every step that moves a message is one atomic script.

Key layout (queue `q`, Go's plain list; our keys share its cluster hash slot through the `{q}` tag):
  q                                 Go's ready list: RPUSH to the tail, pop from the head
  {q}:machinery:inflight            hash id -> body of every claimed, unacked message
  {q}:machinery:leases              zset id -> lease deadline (ms, Redis server clock)
  {q}:machinery:seq                 counter for the ids
  {q}:machinery:landing:<consumer>  where a blocked consumer's BLMOVE drops one message; drained
                                    into `inflight` by that consumer's next claim
  {q}:machinery:claimed:<consumer>  that consumer's last claim: its token and ids (JSON), kept for
                                    a lease, so a claim whose reply was lost can be asked again
  {q}:machinery:consumers           zset consumer -> deadline, guarding the landing lists
  {q}:machinery:redelivered         hash sha1(body) -> times the body went back to the queue
  delayed_tasks                     Go's zset: member = signature JSON, score = ETA in Unix ns
  {delayed_tasks}:machinery:moving  cluster mode only: due messages being moved (zset, deadline ms)
"""

from __future__ import annotations

from machinery.drivers.redis.client import LuaScript

_NOW_MS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""

# A distinct run of JSON whitespace for every k >= 1 (bijective base 4). Appended to a delayed
# member whose exact bytes are already in the set, so identical bodies stay separate messages;
# Go's json.Unmarshal and ours ignore trailing whitespace, and the mover strips it.
_UNIQUE = """
local function ws(k)
  local chars = {' ', '\\t', '\\n', '\\r'}
  local s = ''
  while k > 0 do
    k = k - 1
    s = s .. chars[(k % 4) + 1]
    k = math.floor(k / 4)
  end
  return s
end
local function zadd_unique(key, score, member, seed)
  if redis.call('ZADD', key, 'NX', score, member) == 1 then return end
  local k = seed
  while redis.call('ZADD', key, 'NX', score, member .. ws(k)) == 0 do k = k + 1 end
end
"""

_ROUTE = """
local function strip(m)
  local e = #m
  while e > 0 do
    local b = string.byte(m, e)
    if b ~= 32 and b ~= 9 and b ~= 10 and b ~= 13 then break end
    e = e - 1
  end
  return string.sub(m, 1, e)
end
local function route(m, default)
  local ok, sig = pcall(cjson.decode, m)
  if ok and type(sig) == 'table' then
    local rk = sig['RoutingKey']
    if type(rk) == 'string' and rk ~= '' then return rk end
  end
  return default
end
"""

# Put the bodies of lease-expired ids back at the head of the queue (oldest claim first) and
# count the redelivery; drain the landing lists of consumers that died inside a BLMOVE.
_REAP = """
local function reap(q, inflight, leases, redelivered, consumers, prefix, me, now, limit)
  local expired = redis.call('ZRANGEBYSCORE', leases, '-inf', now, 'LIMIT', 0, limit)
  if #expired > 0 then
    local bodies = redis.call('HMGET', inflight, unpack(expired))
    for i = #expired, 1, -1 do
      local m = bodies[i]
      if m then
        redis.call('LPUSH', q, m)
        redis.call('HINCRBY', redelivered, redis.sha1hex(m), 1)
      end
    end
    redis.call('HDEL', inflight, unpack(expired))
    redis.call('ZREM', leases, unpack(expired))
    redis.call('EXPIRE', redelivered, 604800)
  end
  local dead = redis.call('ZRANGEBYSCORE', consumers, '-inf', now, 'LIMIT', 0, limit)
  for _, c in ipairs(dead) do
    if c ~= me then
      while redis.call('LMOVE', prefix .. c, q, 'RIGHT', 'LEFT') do end
      redis.call('ZREM', consumers, c)
    end
  end
end
"""

# KEYS: queue, our landing list, consumers, inflight, leases, redelivered, seq, our last claim
# ARGV: consumer id, lease ms, max messages, landing key prefix, reap limit, claim token
# Claims what is in our landing list, then pops from the queue head up to the maximum; each gets an
# id, its body in `inflight` and a deadline in `leases`. The claim is recorded under its token; a
# call with the token of our last claim is that claim asked again (its reply was lost with the
# connection): it takes nothing new and hands back what that claim took and still holds, with
# fresh leases, instead of leaving those messages claimed by nobody until their leases end.
# Returns {ids, bodies, redelivery counts (empty when none), ms until the earliest lease ends or -1}.
CLAIM = LuaScript(_NOW_MS + _REAP + """
local q, landing, consumers, inflight, leases, redelivered, seq, claimed =
  KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local lease = tonumber(ARGV[2])
reap(q, inflight, leases, redelivered, consumers, ARGV[4], ARGV[1], now, tonumber(ARGV[5]))
redis.call('ZADD', consumers, now + lease, ARGV[1])
local last = redis.call('GET', claimed)
if last then last = cjson.decode(last) end
local got, ids = {}, {}
if last and last[1] == ARGV[6] then
  local asked = last[2]
  for i = 1, #asked, 2000 do
    local chunk = {unpack(asked, i, math.min(i + 1999, #asked))}
    local bodies = redis.call('HMGET', inflight, unpack(chunk))
    for j, id in ipairs(chunk) do
      if bodies[j] then  -- else its lease ended and the reaper put it back on the queue
        ids[#ids + 1] = id
        got[#got + 1] = bodies[j]
        redis.call('ZADD', leases, 'XX', now + lease, id)
      end
    end
  end
else
  got = redis.call('LRANGE', landing, 0, -1)
  if #got > 0 then redis.call('DEL', landing) end
  local want = tonumber(ARGV[3]) - #got
  if want > 0 then
    local more = redis.call('LPOP', q, want)
    if more then
      for _, m in ipairs(more) do got[#got + 1] = m end
    end
  end
  if #got > 0 then
    local first = redis.call('INCRBY', seq, #got) - #got
    for i = 1, #got, 2000 do
      local h, z = {}, {}
      for j = i, math.min(i + 1999, #got) do
        local id = string.format('%d', first + j)
        ids[j] = id
        h[#h + 1] = id
        h[#h + 1] = got[j]
        z[#z + 1] = now + lease
        z[#z + 1] = id
      end
      redis.call('HSET', inflight, unpack(h))
      redis.call('ZADD', leases, unpack(z))
    end
    redis.call('SET', claimed, cjson.encode({ARGV[6], ids}), 'PX', lease)
  end
end
local counts = {}
if #got > 0 and redis.call('EXISTS', redelivered) == 1 then
  for i, m in ipairs(got) do counts[i] = tonumber(redis.call('HGET', redelivered, redis.sha1hex(m)) or '0') end
end
local earliest = redis.call('ZRANGE', leases, 0, 0, 'WITHSCORES')
local next_ms = -1
if earliest[2] then next_ms = math.max(0, tonumber(earliest[2]) - now) end
return {ids, got, counts, next_ms}
""")

# KEYS: leases; ARGV: lease ms, ids. Only ids still claimed are extended.
RENEW = LuaScript(_NOW_MS + """
local z = {}
for i = 2, #ARGV do
  z[#z + 1] = now + tonumber(ARGV[1])
  z[#z + 1] = ARGV[i]
end
if #z == 0 then return 0 end
return redis.call('ZADD', KEYS[1], 'XX', 'CH', unpack(z))
""")

# Release claimed ids: their bodies, leases and redelivery marks. Also part of the result
# backend's COMMIT script (a task's final state and its ack in one atomic call).
ACK_FN = """
local function ack(inflight, leases, redelivered, ids)
  if redis.call('EXISTS', redelivered) == 1 then
    local bodies = redis.call('HMGET', inflight, unpack(ids))
    for _, m in ipairs(bodies) do
      if m then redis.call('HDEL', redelivered, redis.sha1hex(m)) end
    end
  end
  redis.call('ZREM', leases, unpack(ids))
  return redis.call('HDEL', inflight, unpack(ids))
end
"""

# KEYS: inflight, leases, redelivered; ARGV: ids
ACK = LuaScript(ACK_FN + """
return ack(KEYS[1], KEYS[2], KEYS[3], ARGV)
""")

# KEYS: delayed zset; ARGV: seed, then score/member pairs
DELAY = LuaScript(_UNIQUE + """
local seed = tonumber(ARGV[1])
for i = 2, #ARGV, 2 do zadd_unique(KEYS[1], ARGV[i], ARGV[i + 1], seed) end
return (#ARGV - 1) / 2
""")

# Give claimed messages back; only ids still claimed (one whose lease already ended was returned
# by the reaper). KEYS: inflight, leases, target, redelivered. ARGV: mode, score, seed, ids.
# mode 'push': RPUSH to the target queue; 'delay': into the target delayed zset at `score`
# (standalone only: another slot in a cluster); 'drop': release and count only (the caller has
# already put the bodies in the delayed set).
RETURN = LuaScript(_UNIQUE + """
local mode = ARGV[1]
local ids = {}
for i = 4, #ARGV do ids[#ids + 1] = ARGV[i] end
local bodies = redis.call('HMGET', KEYS[1], unpack(ids))
local n = 0
for _, m in ipairs(bodies) do
  if m then
    if mode == 'push' then
      redis.call('RPUSH', KEYS[3], m)
    elseif mode == 'delay' then
      zadd_unique(KEYS[3], ARGV[2], m, tonumber(ARGV[3]))
    end
    redis.call('HINCRBY', KEYS[4], redis.sha1hex(m), 1)
    n = n + 1
  end
end
redis.call('HDEL', KEYS[1], unpack(ids))
redis.call('ZREM', KEYS[2], unpack(ids))
if n > 0 then redis.call('EXPIRE', KEYS[4], 604800) end
return n
""")

# Standalone only. KEYS: inflight, leases, dead-letter list, redelivered; ARGV: id, entry
DEAD_LETTER = LuaScript("""
local m = redis.call('HGET', KEYS[1], ARGV[1])
if not m then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('HDEL', KEYS[4], redis.sha1hex(m))
return 1
""")

# Standalone: due delayed messages go to the tail of their RoutingKey list in one atomic step.
# KEYS: delayed zset; ARGV: now ns, batch size, default queue. Returns {moved, next score or false}.
MOVE_DUE = LuaScript(_ROUTE + """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('RPUSH', route(m, ARGV[3]), strip(m))
  redis.call('ZREM', KEYS[1], m)
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {#due, first[2] or false}
""")

# Cluster step 1 of 3 (the queue lists live in other slots): claim due members into the moving
# zset with a deadline; members a crashed mover left there are claimed again after it passes.
# KEYS: delayed zset, moving zset; ARGV: now ns, batch size, lease ms, default queue.
# Returns {{queue, member, ...}, next score or false}; steps 2 and 3 are RPUSH, then ZREM moving.
CLAIM_DUE = LuaScript(_NOW_MS + _ROUTE + """
local limit = tonumber(ARGV[2])
local deadline = now + tonumber(ARGV[3])
local out = {}
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, limit)
for _, m in ipairs(stale) do
  redis.call('ZADD', KEYS[2], deadline, m)
  out[#out + 1] = route(m, ARGV[4])
  out[#out + 1] = m
end
if #stale < limit then
  local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit - #stale)
  for _, m in ipairs(due) do
    redis.call('ZREM', KEYS[1], m)
    redis.call('ZADD', KEYS[2], deadline, m)
    out[#out + 1] = route(m, ARGV[4])
    out[#out + 1] = m
  end
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {out, first[2] or false}
""")
