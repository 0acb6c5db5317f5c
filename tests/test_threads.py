"""The task thread pool's interruptible calls: abandoning a thread, and the guard that keeps an
exception injected as a call returns out of the pool's own loop."""

from __future__ import annotations

import asyncio
import gc
import sys
import threading
from typing import Any

from machinery.threads import SyncRunner


def test_an_abandoned_thread_is_replaced_and_exits_when_its_call_returns() -> None:
    class Stop(Exception):
        pass

    release = threading.Event()

    def blocked() -> str:
        release.wait(10)  # a C-level wait: the injected exception waits for it to return
        return "late"

    async def main() -> tuple[bool, str, bool]:
        loop = asyncio.get_running_loop()
        pool = SyncRunner(loop, 1, "abandon")
        first = pool.run(blocked, [], watched=True)
        await asyncio.sleep(0.1)
        stopped, thread = pool.abandon(first, Stop)
        assert stopped and thread is not None and thread.is_alive()
        # the pool's one slot is free again: a fresh thread takes the next call
        second = await asyncio.wait_for(pool.run(lambda: "next", []), 5)
        release.set()
        thread.join(5)
        pool.shutdown()
        return first.cancelled(), second, thread.is_alive()

    cancelled, second, alive = asyncio.run(main())
    assert cancelled and second == "next" and not alive


def test_abandon_after_the_call_returned_changes_nothing() -> None:
    async def main() -> tuple[Any, Any]:
        pool = SyncRunner(asyncio.get_running_loop(), 1, "done")
        fut = pool.run(lambda: 7, [], watched=True)
        value = await fut
        gone = pool.abandon(fut, RuntimeError)
        again = await pool.run(lambda: 8, [], watched=True)
        pool.shutdown()
        return (value, again), gone

    values, gone = asyncio.run(main())
    assert values == (7, 8) and gone == (False, None)


def test_a_call_abandoned_before_it_started_never_runs_and_its_thread_stays() -> None:
    release = threading.Event()
    ran: list[str] = []

    async def main() -> tuple[bool, Any, str, set[str]]:
        pool = SyncRunner(asyncio.get_running_loop(), 1, "queued")
        busy = pool.run(release.wait, [10])
        queued = pool.run(ran.append, ["queued"], watched=True)
        stopped, thread = pool.abandon(queued, RuntimeError)
        release.set()
        await busy
        after = await asyncio.wait_for(pool.run(lambda: "after", []), 5)
        names = {t.name for t in threading.enumerate() if t.name.startswith("queued")}
        pool.shutdown()
        return stopped and queued.cancelled(), thread, after, names

    dropped, thread, after, names = asyncio.run(main())
    assert dropped and thread is None and after == "after" and ran == [] and names == {"queued-0"}



def test_an_injection_racing_the_return_never_reaches_the_pool_loop() -> None:
    """Interrupts fired at calls as they return are dropped, never raised in the pool's own
    code: the same thread keeps taking jobs, and every call's future gets an outcome."""

    class Late(Exception):
        pass

    async def main() -> tuple[int, int, set[str]]:
        loop = asyncio.get_running_loop()
        pool = SyncRunner(loop, 1, "guard")
        current: list[asyncio.Future[Any]] = []
        done = threading.Event()

        def pester() -> None:
            while not done.is_set():
                if current:
                    pool.interrupt(current[-1], Late)

        def short(i: int) -> int:
            x = 0
            while x < (i % 40) * 100:  # 0 to about 0.2 ms: some end before a shot, some after
                x += 1
            return i

        shooter = threading.Thread(target=pester, daemon=True)
        shooter.start()
        ok = late = 0
        names: set[str] = set()
        try:
            for i in range(3000):
                fut = pool.run(short, [i], watched=True)
                current.append(fut)
                try:
                    assert await asyncio.wait_for(fut, 5) == i
                    ok += 1
                except Late:
                    late += 1
            names = {t.name for t in threading.enumerate() if t.name.startswith("guard")}
        finally:
            done.set()
            shooter.join()
            pool.shutdown()
        return ok, late, names

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)  # the threads take turns often: shots land everywhere
    # Without the collector, no finalizer of earlier tests' garbage runs in the pool thread while
    # shots fly (one hit there is "ignored" by Python and reported by pytest: not what is tested).
    gc.collect()
    gc.disable()
    try:
        ok, late, names = asyncio.run(main())
    finally:
        gc.enable()
        sys.setswitchinterval(interval)
    assert ok + late == 3000 and late > 0 and ok > 0
    assert names == {"guard-0"}, "a pool thread died (or was replaced) under the interrupts"
