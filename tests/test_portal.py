"""The portal: how the sync API runs the asyncio core on its own loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading

import pytest

from machinery.portal import Portal


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_results_errors_timeouts_and_cancellation(kind: str) -> None:
    portal = Portal(event_loop=kind)
    try:
        async def double(x: int) -> int:
            await asyncio.sleep(0)
            return 2 * x

        assert [portal.run(double(i)) for i in range(100)] == [2 * i for i in range(100)]

        async def fail() -> None:
            raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            portal.run(fail())

        cancelled = threading.Event()

        async def slow() -> None:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                cancelled.set()
                raise

        with pytest.raises(concurrent.futures.TimeoutError):
            portal.run(slow(), timeout=0.05)
        assert cancelled.wait(2), "a timed-out call must cancel its coroutine"

        async def nested() -> None:
            portal.run(double(1))  # a blocking call made on the portal's own thread

        with pytest.raises(RuntimeError, match="a\\* twin"):
            portal.run(nested())
    finally:
        portal.close()


def test_calls_from_many_threads() -> None:
    portal = Portal()
    try:
        async def ident(x: int) -> int:
            await asyncio.sleep(0.001)
            return x

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            assert sorted(pool.map(lambda i: portal.run(ident(i)), range(200))) == list(range(200))
    finally:
        portal.close()
