"""Cross-thread, cross-loop wake-ups: a future per waiter, resolved from whichever thread notifies."""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import Hashable


class Waiters:
    """Wake coroutines waiting on a key; safe to notify from any thread or event loop."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waiting: defaultdict[Hashable, list[asyncio.Future[None]]] = defaultdict(list)

    def register(self, key: Hashable) -> asyncio.Future[None]:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._waiting[key].append(fut)
        return fut

    def discard(self, key: Hashable, fut: asyncio.Future[None]) -> None:
        with self._lock:
            futs = self._waiting.get(key)
            if futs and fut in futs:
                futs.remove(fut)
                if not futs:
                    del self._waiting[key]

    def notify(self, key: Hashable) -> None:
        with self._lock:
            futs = self._waiting.pop(key, None)
        for fut in futs or ():
            loop = fut.get_loop()
            if loop.is_closed():
                continue
            loop.call_soon_threadsafe(_resolve, fut)

    async def wait(self, key: Hashable, timeout: float | None) -> bool:
        """Wait for a notify on `key`; False on timeout. Register before checking state to avoid races."""
        fut = self.register(key)
        try:
            await asyncio.wait_for(fut, timeout)
            return True
        except TimeoutError:
            return False
        finally:
            self.discard(key, fut)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
