"""Helpers that let tests check a timing mechanism by what happened, not by how long it took.

`Calls` counts calls of an object's coroutine method and lets a test wait until a number of them
has happened; `RecordingAsyncio` stands in for the `asyncio` module inside one module under test
and records the timeouts that module waits with (its poll intervals).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

import pytest

T = TypeVar("T")


class Calls:
    """Counts the calls of `obj.name` (a coroutine method) that have returned."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, obj: object, name: str) -> None:
        self.count = 0
        self._returned = asyncio.Event()
        original = getattr(obj, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            try:
                return await original(*args, **kwargs)
            finally:
                self.count += 1
                self._returned.set()

        monkeypatch.setattr(obj, name, counted)

    async def reach(self, count: int, timeout: float = 10.0) -> None:
        """Wait (up to `timeout` seconds) until `count` calls have returned."""
        async with asyncio.timeout(timeout):
            while self.count < count:
                self._returned.clear()
                await self._returned.wait()


class RecordingAsyncio:
    """The asyncio module, except that `wait_for` records its timeout first (install it with
    `monkeypatch.setattr(module, "asyncio", RecordingAsyncio())`)."""

    def __init__(self) -> None:
        self.timeouts: list[float | None] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(asyncio, name)

    def wait_for(self, aw: Awaitable[T], timeout: float | None) -> Awaitable[T]:
        self.timeouts.append(timeout)
        return asyncio.wait_for(aw, timeout)
