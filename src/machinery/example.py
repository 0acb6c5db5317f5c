"""`machinery example`: a worker and a producer in one process on the embedded SQLite default."""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime, timedelta

from machinery.config import Config
from machinery.server import Server
from machinery.tasks.signature import Signature
from machinery.tasks.workflow import Chain, Chord, Group

QUEUE = "machinery_example"


def build_server(db: str | None = None) -> tuple[Server, dict[str, int]]:
    url = f"sqlite:///{db}" if db else Config().broker
    server = Server(Config(broker=url, result_backend=url, default_queue=QUEUE))
    calls = {"flaky": 0}
    lock = threading.Lock()

    @server.task
    def add(*args: int) -> int:
        return sum(args)

    @server.task
    async def multiply(*args: int) -> int:
        product = 1
        for a in args:
            product *= a
        return product

    @server.task
    def flaky(value: int) -> int:
        with lock:
            calls["flaky"] += 1
            n = calls["flaky"]
        if n < 3:
            raise RuntimeError(f"transient failure #{n}")
        return value

    return server, calls


def run(db: str | None = None, out: object = None) -> int:
    """Run the tour; returns a process exit code."""
    server, calls = build_server(db)
    print(f"machinery example: {server.where()} (queue {QUEUE})")
    worker = server.new_worker("example", concurrency=4)
    stopped = worker.launch_async()
    try:
        add = Signature("add", args=[1, 1])
        print("add(1, 1) =", server.send_task(add).get(timeout=30))
        print("multiply(2, 3, 7) =", server.send_task(Signature("multiply", args=[2, 3, 7])).get(timeout=30))

        group = Group(Signature("add", [1, 1]), Signature("add", [2, 2]), Signature("add", [5, 6]))
        print("group [add(1,1), add(2,2), add(5,6)] =", [r.get(timeout=30) for r in server.send_group(group)])

        chord = Chord(Group(Signature("add", [1, 1]), Signature("add", [5, 5])), Signature("multiply"))
        print("chord multiply(add(1,1), add(5,5)) =", server.send_chord(chord).get(timeout=30))

        chain = Chain(Signature("add", [1, 1]), Signature("add", [5, 5]), Signature("multiply", [4]))
        print("chain 4 * (5 + 5 + (1 + 1)) =", server.send_chain(chain).get(timeout=30))

        started = time.monotonic()
        delayed = Signature("add", [20, 22], eta=datetime.now(UTC) + timedelta(seconds=1))
        value = server.send_task(delayed).get(timeout=30)
        print(f"delayed add(20, 22) = {value} (ran after {time.monotonic() - started:.1f} s)")

        started = time.monotonic()
        retried = Signature("flaky", [7], retry_count=3)
        value = server.send_task(retried).get(timeout=60)
        print(f"retried flaky(7) = {value} after {calls['flaky']} attempts "
              f"({time.monotonic() - started:.1f} s of Fibonacci back-off)")
    finally:
        worker.quit()
        stopped.result(timeout=30)
        server.close()
    print("example finished: all results correct")
    return 0
