"""The Lock contract used by periodic tasks: one holder per key until a deadline."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from machinery.drivers.capabilities import Capable

if TYPE_CHECKING:
    from machinery.config import Config


class Lock(Capable, ABC):
    """A named lock that expires by itself at `expires_at_ns` (Unix nanoseconds). No lock
    capability exists yet; capability() answers as for brokers and backends."""

    def __init__(self, cnf: Config, url: str = "") -> None:
        self.cnf = cnf
        self.url = url

    @abstractmethod
    async def acquire(self, key: str, expires_at_ns: int) -> bool:
        """Take `key` until `expires_at_ns`; False if a live holder has it."""

    @abstractmethod
    async def release(self, key: str) -> None:
        """Give `key` up early."""

    async def close(self) -> None:
        """Release connections of the current event loop."""
