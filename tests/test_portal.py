"""The portal: how the sync API runs the asyncio core on its own loop thread."""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

import pytest

from machinery.errors import ServerClosedError, UsageError
from machinery.errors import TimeoutError as MachineryTimeout
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


@pytest.mark.parametrize("kind", ["asyncio", "uvloop"])
def test_close_cancels_what_still_runs_on_the_loop(kind: str, caplog: pytest.LogCaptureFixture) -> None:
    """A task left on the loop (a driver's reader) is cancelled and finished by close(), not
    dropped pending with the loop, which makes asyncio log "Task was destroyed but it is pending!"
    when it is collected; a call waiting meanwhile gets ServerClosedError."""
    import gc

    portal = Portal(event_loop=kind)
    finished = threading.Event()

    async def reader() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            finished.set()

    async def spawn() -> None:
        asyncio.get_running_loop().create_task(reader())  # held by nobody but the loop

    portal.run(spawn())
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(portal.run, asyncio.sleep(30))
        time.sleep(0.1)
        with caplog.at_level("ERROR", logger="asyncio"):
            portal.close()
            gc.collect()
        assert finished.is_set(), "the pending task ran its cleanup"
        assert not [r for r in caplog.records if "destroyed" in r.getMessage()]
        with pytest.raises(ServerClosedError):
            waiting.result(timeout=5)
    with pytest.raises(ServerClosedError):
        portal.run(asyncio.sleep(0))
    portal.close()  # again: nothing


def test_timeouts_and_misuse_raise_the_librarys_errors() -> None:
    portal = Portal()
    try:
        with pytest.raises(MachineryTimeout):
            portal.run(asyncio.sleep(5), timeout=0.05)

        async def nested() -> None:
            portal.run(asyncio.sleep(0))

        with pytest.raises(UsageError):
            portal.run(nested())
    finally:
        portal.close()
