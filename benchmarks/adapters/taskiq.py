"""taskiq adapter: `taskiq worker --workers 2` on RedisStreamBroker; kiq() gathered for bulk sends."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import taskiq` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402

POLL = 0.001  # wait_result() polls the backend; its default check_interval is 0.2 s
GATHER = 1000  # kiq() calls in flight at once for the "bulk" send


class TaskiqSystem(benchkit.System):
    name = "taskiq"
    setups = ("workers2",)
    stop_grace = 3.0  # its workers do not exit on SIGTERM with RedisStreamBroker; killed after this

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import taskiq_app

        self.mod = taskiq_app
        self.runner = asyncio.Runner()
        self.runner.run(taskiq_app.broker.startup())

    def version(self) -> str:
        from importlib.metadata import version

        return f"{version('taskiq')} (taskiq-redis {version('taskiq-redis')})"

    def describe(self, setup: str) -> str:
        return "`taskiq worker --workers 2` (max 100 async tasks each)"

    def worker_argv(self, setup: str) -> list[list[str]]:
        return [[
            benchkit.bin_path("taskiq"), "worker", "taskiq_app:broker", "--workers", "2",
            "--log-level", "WARNING",
        ]]

    async def _enqueue(self, n: int, bulk: bool) -> None:
        noop = self.mod.noop
        if not bulk:
            for _ in range(n):
                await noop.kiq()
            return
        for start in range(0, n, GATHER):
            await asyncio.gather(*(noop.kiq() for _ in range(min(GATHER, n - start))))

    def enqueue(self, n: int, bulk: bool) -> str:
        self.runner.run(self._enqueue(n, bulk))
        return f"asyncio.gather(kiq() x {GATHER})" if bulk else "await kiq() per task"

    async def _roundtrip(self, timeout: float) -> None:
        task = await self.mod.ping.kiq()
        result = await task.wait_result(check_interval=POLL, timeout=timeout)
        assert result.return_value == 1

    def roundtrip(self, timeout: float) -> None:
        self.runner.run(self._roundtrip(timeout))

    def close(self) -> None:
        self.runner.run(self.mod.broker.shutdown())
        self.runner.close()


if __name__ == "__main__":
    benchkit.main(TaskiqSystem)
