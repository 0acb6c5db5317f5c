"""In-process lock (Go's "eager" lock): no deduplication across processes."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from machinery.drivers.lock import Lock

if TYPE_CHECKING:
    from machinery.config import Config


class MemoryLock(Lock):
    def __init__(self, cnf: Config, url: str = "eager") -> None:
        super().__init__(cnf, url)
        self._mutex = threading.Lock()
        self._held: dict[str, int] = {}

    async def acquire(self, key: str, expires_at_ns: int) -> bool:
        now = time.time_ns()
        with self._mutex:
            current = self._held.get(key)
            if current is not None and current > now:
                return False
            self._held[key] = expires_at_ns
            return True

    async def release(self, key: str) -> None:
        with self._mutex:
            self._held.pop(key, None)
