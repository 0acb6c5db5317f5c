"""One scheduler process for tests/test_periodic.py: records each fire in a shared file until a deadline.

Usage: python periodic_child.py LOCK_URL PROGRAM NAME SPEC OUT_FILE UNTIL_NS
Each fire appends "<pid> <unix ns>" with one O_APPEND write, so lines from processes never interleave.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time

from machinery.config import Config
from machinery.drivers.registry import make_lock
from machinery.periodic import PeriodicScheduler


async def main(argv: list[str]) -> None:
    lock_url, program, name, spec, out_path = argv[:5]
    until_ns = int(argv[5])
    lock = make_lock(Config(broker="memory", result_backend="memory"), lock_url)
    scheduler = PeriodicScheduler(lock, program=program)
    pid = os.getpid()

    async def fire() -> None:
        fd = os.open(out_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{pid} {time.time_ns()}\n".encode())
        finally:
            os.close(fd)

    scheduler.add(spec, name, fire)
    print("ready", flush=True)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(scheduler.run(), (until_ns - time.time_ns()) / 1e9)
    await lock.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:7]))
