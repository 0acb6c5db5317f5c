"""Redis lock for periodic tasks, wire-compatible with Go Machinery's (locks/redis).

Like Go, the key's value is the holder's expiry in Unix nanoseconds (decimal) and the key gets a PX
time-to-live up to that moment, so Go and Python processes can take the same keys. Acquire is one Lua
script: take the key if it is absent or its stored expiry has passed by the caller's clock, else fail.
The value check is what Go's GETSET fallback does (its PX can outlive the stored expiry by the round
trip, and the next tick must not find the key still held); here it is atomic, not GET then GETSET.

Unlike Go, the URL's db and username are honoured, `rediss://` uses TLS (with `cnf.tls` when set), and
Sentinel / Cluster / unix-socket URLs work as for the Redis broker and backend (see machinery.drivers.redis.url).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from machinery.drivers.lock import Lock
from machinery.drivers.redis import client as _redis
from machinery.drivers.redis.url import parse_redis_url
from machinery.errors import BackendError
from machinery.loops import PerLoop

if TYPE_CHECKING:
    from machinery.config import Config

# KEYS[1] lock key; ARGV[1] expiry ns, ARGV[2] caller's now ns, ARGV[3] time-to-live ms.
# Digit strings are compared by length, then lexically: exact for nanosecond values beyond 2^53.
_ACQUIRE = _redis.LuaScript("""
local held = redis.call('GET', KEYS[1])
if held then
  if not string.match(held, '^%d+$') then return 0 end
  local now = ARGV[2]
  if #held > #now or (#held == #now and held > now) then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
""")


class RedisLock(Lock):
    """`redis://[[user]:pass@]host:port[/db]`, `rediss://...`; one client per event loop."""

    def __init__(self, cnf: Config, url: str = "redis://127.0.0.1:6379") -> None:
        super().__init__(cnf, url)
        self.target = parse_redis_url(url, cnf, "lock")
        self._clients: PerLoop[_redis.Client] = PerLoop()

    def _client(self) -> _redis.Client:
        return self._clients.get(lambda: _redis.create_client(self.target, self.cnf))

    async def acquire(self, key: str, expires_at_ns: int) -> bool:
        return await self._acquire(key, expires_at_ns)

    async def release(self, key: str) -> None:
        await self._release(key)

    @_redis.wrap_errors(BackendError, "redis lock")
    async def _acquire(self, key: str, expires_at_ns: int) -> bool:
        now = time.time_ns()
        ttl_ms = max(1, -(-(expires_at_ns - now) // 1_000_000))  # ceil: never expire before the deadline
        won = await _ACQUIRE(self._client(), [key], [str(expires_at_ns), str(now), str(ttl_ms)])
        return bool(won)

    @_redis.wrap_errors(BackendError, "redis lock")
    async def _release(self, key: str) -> None:
        await self._client().delete(key)

    async def close(self) -> None:
        client = self._clients.pop_current()
        if client is not None:
            await client.aclose()
