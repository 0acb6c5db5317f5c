"""Child for tests/test_sqlite_doorbell.py: a doorbell bound before fork() in a process that forks.

Usage: python doorbell_child.py DB_PATH
The parent binds its broker bell socket, then forks. The child waits on the same Doorbell object
(which must bind a socket of its own), prints the directory, and exits normally so that exit-time
cleanup runs in it. The parent then prints the directory again and whether its socket still hears
a ring. Each process prints one JSON line: {"who": ..., "pid": ..., "sockets": [...], ...}.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys

from machinery.drivers.sqlite.doorbell import Doorbell
from machinery.waiters import Waiters


async def listen_once(bell: Doorbell) -> bool:
    with bell.listening() as live:
        return live


async def hears_a_ring(bell: Doorbell, waiters: Waiters, db: str) -> bool:
    ringer = Doorbell(db, "broker", lambda key: None)
    with bell.listening():
        fut = waiters.register("k")
        ringer.ring(["k"])
        try:
            await asyncio.wait_for(fut, 5)
            return True
        except TimeoutError:
            return False
        finally:
            ringer.close()


def report(who: str, bell: Doorbell, **extra: object) -> None:
    assert bell.directory is not None
    line = {"who": who, "pid": os.getpid(), "sockets": sorted(os.listdir(bell.directory)), **extra}
    print(json.dumps(line), flush=True)


def main(db: str) -> None:
    waiters = Waiters()
    bell = Doorbell(db, "broker", waiters.notify)
    assert asyncio.run(listen_once(bell))
    pid = os.fork()
    if pid == 0:
        live = asyncio.run(listen_once(bell))
        report("child", bell, live=live)
        sys.exit(0)  # a normal exit: exit-time cleanup runs here, and must spare the parent's socket
    _, status = os.waitpid(pid, 0)
    report("parent", bell, child_status=status, heard=asyncio.run(hears_a_ring(bell, waiters, db)))
    bell.close()


if __name__ == "__main__":
    main(sys.argv[1])
