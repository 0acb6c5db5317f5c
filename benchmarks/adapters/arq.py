"""arq adapter: two `arq` worker processes (default max_jobs=10 each); no batch enqueue API."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import arq` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402

POLL = 0.001  # Job.result() polls Redis; its default poll_delay is 0.5 s


class ArqSystem(benchkit.System):
    name = "arq"
    setups = ("workers2",)
    supports_bulk = False

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import arq_app
        from arq import create_pool

        self.runner = asyncio.Runner()
        self.pool = self.runner.run(create_pool(arq_app.WorkerSettings.redis_settings))

    def version(self) -> str:
        from importlib.metadata import version

        return version("arq")

    def describe(self, setup: str) -> str:
        return "2 x `arq` worker (max_jobs 10)"

    def worker_argv(self, setup: str) -> list[list[str]]:
        return [[benchkit.bin_path("arq"), "arq_app.WorkerSettings"] for _ in range(2)]

    async def _enqueue(self, n: int) -> None:
        for _ in range(n):
            await self.pool.enqueue_job("noop", _queue_name=self.cfg.queue)

    def enqueue(self, n: int, bulk: bool) -> str:
        if bulk:
            raise benchkit.NotSupported("arq has no batch enqueue")
        self.runner.run(self._enqueue(n))
        return "await enqueue_job() per job"

    async def _roundtrip(self, timeout: float) -> None:
        job = await self.pool.enqueue_job("ping", _queue_name=self.cfg.queue)
        assert job is not None
        assert await job.result(timeout=timeout, poll_delay=POLL) == 1

    def roundtrip(self, timeout: float) -> None:
        self.runner.run(self._roundtrip(timeout))

    def close(self) -> None:
        self.runner.run(self.pool.aclose())
        self.runner.close()


if __name__ == "__main__":
    benchkit.main(ArqSystem)
