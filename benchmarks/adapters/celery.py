"""Celery adapter: prefork -c 2 (the default pool) or two solo workers; group for bulk sends."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import celery` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402

# Gossip, mingle and heartbeat only matter for remote control; they are commonly turned off for throughput.
QUIET = ["--loglevel", "WARNING", "--without-gossip", "--without-mingle", "--without-heartbeat"]


class CelerySystem(benchkit.System):
    name = "celery"
    setups = ("prefork", "solo")
    supports_workflows = True
    transports = ("redis", "amqp")

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import celery_app

        self.mod = celery_app

    def version(self) -> str:
        import celery

        return celery.__version__

    def describe(self, setup: str) -> str:
        return {"prefork": "1 worker, prefork pool -c 2", "solo": "2 workers, solo pool"}[setup]

    def worker_argv(self, setup: str) -> list[list[str]]:
        base = [sys.executable, "-m", "celery", "-A", "celery_app", "worker", "-Q", self.cfg.queue, *QUIET]
        if setup == "prefork":
            return [[*base, "-P", "prefork", "-c", "2", "-n", "prefork@%h"]]
        return [[*base, "-P", "solo", "-n", f"solo{i}@%h"] for i in range(2)]

    def enqueue(self, n: int, bulk: bool) -> str:
        from celery import group

        noop = self.mod.noop
        if bulk:
            group(noop.s() for _ in range(n)).apply_async()
            return "group(...).apply_async()"
        for _ in range(n):
            noop.apply_async()
        return "apply_async() per task"

    def roundtrip(self, timeout: float) -> None:
        assert self.mod.ping.delay().get(timeout=timeout) == 1

    def chord(self, n: int, timeout: float) -> None:
        from celery import chord

        add_one, collect = self.mod.add_one, self.mod.collect
        assert chord(add_one.s(i) for i in range(n))(collect.s()).get(timeout=timeout) == n

    def chain(self, n: int, timeout: float) -> None:
        from celery import chain

        add_one = self.mod.add_one
        links = [add_one.s(0), *(add_one.s() for _ in range(n - 1))]
        assert chain(*links).apply_async().get(timeout=timeout) == n


if __name__ == "__main__":
    benchkit.main(CelerySystem)
