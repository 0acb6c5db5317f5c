"""Huey adapter: `huey_consumer -w 2 -k process`; no batch enqueue API; chords and pipelines (Huey 3)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import huey` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402

# SQLite has no blocking pop: the consumer polls. Its defaults (0.1 s, backing off to 10 s) would add up
# to seconds of latency after an idle spell, so the embedded runs poll from 1 ms, backing off to 0.1 s.
SQLITE_POLL = ["--delay", "0.001", "--max-delay", "0.1"]


class HueySystem(benchkit.System):
    name = "huey"
    setups = ("process2",)
    supports_bulk = False
    supports_workflows = True
    transports = ("redis", "sqlite")

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import huey_app

        self.mod = huey_app

    def version(self) -> str:
        import huey

        return huey.__version__

    def describe(self, setup: str) -> str:
        return "`huey_consumer -w 2 -k process`"

    def worker_argv(self, setup: str) -> list[list[str]]:
        argv = [benchkit.bin_path("huey_consumer"), "huey_app.huey", "-w", "2", "-k", "process", "-q"]
        return [argv + (SQLITE_POLL if self.cfg.transport == "sqlite" else [])]

    def enqueue(self, n: int, bulk: bool) -> str:
        if bulk:
            raise benchkit.NotSupported("huey has no batch enqueue")
        noop = self.mod.noop
        for _ in range(n):
            noop()
        return "task() per task"

    def _get(self, result: object, timeout: float) -> object:
        # Redis: BLPOP on the notify key. SQLite: the library's poll loop, at a 1 ms interval.
        return result.get(blocking=True, timeout=timeout, backoff=1.0, max_delay=0.001)  # type: ignore[attr-defined]

    def roundtrip(self, timeout: float) -> None:
        assert self._get(self.mod.ping(), timeout) == 1

    def chord(self, n: int, timeout: float) -> None:
        from huey.api import group

        add_one, collect = self.mod.add_one, self.mod.collect
        result = self.mod.huey.enqueue(group([add_one.s(i) for i in range(n)]).then(collect))
        assert self._get(result, timeout) == n

    def chain(self, n: int, timeout: float) -> None:
        add_one = self.mod.add_one
        head = add_one.s(0)
        for _ in range(n - 1):
            head.then(add_one)
        results = self.mod.huey.enqueue(head)
        assert self._get(list(results)[-1], timeout) == n


if __name__ == "__main__":
    benchkit.main(HueySystem)
