"""Dramatiq adapter: the CLI's default 2 processes x 8 threads; group(...).run() for bulk sends."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import dramatiq` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402


class DramatiqSystem(benchkit.System):
    name = "dramatiq"
    setups = ("p2t8",)
    supports_workflows = True
    transports = ("redis", "amqp")

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import dramatiq_app

        self.mod = dramatiq_app

    def version(self) -> str:
        import dramatiq

        return dramatiq.__version__

    def describe(self, setup: str) -> str:
        return "dramatiq CLI, 2 processes x 8 threads"

    def worker_argv(self, setup: str) -> list[list[str]]:
        return [[sys.executable, "-m", "dramatiq", "dramatiq_app", "-p", "2", "-t", "8", "-Q", self.cfg.queue]]

    def enqueue(self, n: int, bulk: bool) -> str:
        import dramatiq

        noop = self.mod.noop
        if bulk:
            dramatiq.group(noop.message() for _ in range(n)).run()
            return "group(...).run()"
        for _ in range(n):
            noop.send()
        return "send() per task"

    def roundtrip(self, timeout: float) -> None:
        msg = self.mod.ping.send()
        assert msg.get_result(block=True, timeout=int(timeout * 1000)) == 1

    def chord(self, n: int, timeout: float) -> None:
        import dramatiq

        # Dramatiq's group completion callback takes no results: the nearest thing to a chord.
        callback = self.mod.done.message()
        g = dramatiq.group(self.mod.add_one.message(i) for i in range(n))
        g.add_completion_callback(callback)
        g.run()
        assert callback.get_result(block=True, timeout=int(timeout * 1000)) == 1

    def chain(self, n: int, timeout: float) -> None:
        import dramatiq

        add_one = self.mod.add_one
        p = dramatiq.pipeline([add_one.message(0), *(add_one.message() for _ in range(n - 1))]).run()
        assert p.get_result(block=True, timeout=int(timeout * 1000)) == n


if __name__ == "__main__":
    benchkit.main(DramatiqSystem)
