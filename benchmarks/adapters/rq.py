"""RQ adapter: two `rq worker` processes (fork a work horse per job); enqueue_many for bulk sends."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import rq` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402


class RQSystem(benchkit.System):
    name = "rq"
    setups = ("workers2",)

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import rq_app
        from redis import Redis
        from rq import Queue

        self.mod = rq_app
        self.queue = Queue(cfg.queue, connection=Redis.from_url(cfg.broker_url))
        # RQ always writes the job hash; result_ttl=0 drops the result as soon as the job ends.
        self.opts: dict[str, Any] = {} if cfg.results else {"result_ttl": 0}

    def version(self) -> str:
        import rq

        return rq.__version__

    def describe(self, setup: str) -> str:
        return "2 x `rq worker` (fork per job)"

    def worker_argv(self, setup: str) -> list[list[str]]:
        argv = [benchkit.bin_path("rq"), "worker", "--url", self.cfg.broker_url, "--quiet", self.cfg.queue]
        return [[*argv, "--name", f"bench-{i}"] for i in range(2)]

    def enqueue(self, n: int, bulk: bool) -> str:
        from rq import Queue

        noop = self.mod.noop
        if bulk:
            self.queue.enqueue_many([Queue.prepare_data(noop, **self.opts) for _ in range(n)])
            return "enqueue_many([prepare_data(...)])"
        for _ in range(n):
            self.queue.enqueue(noop, **self.opts)
        return "enqueue() per job"

    def roundtrip(self, timeout: float) -> None:
        job = self.queue.enqueue(self.mod.ping)
        result = job.latest_result(timeout=max(1, round(timeout)))
        assert result is not None and result.return_value == 1


if __name__ == "__main__":
    benchkit.main(RQSystem)
