"""machinery adapter: `machinery worker --processes 2 --concurrency N`; Server.send_tasks for bulk sends."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # `import machinery` must not find us
sys.path.insert(0, str(HERE / "lib"))

import benchkit  # noqa: E402


class MachinerySystem(benchkit.System):
    name = "machinery"
    setups = ("processes2",)
    supports_workflows = True
    transports = ("redis", "amqp", "sqlite")

    def __init__(self, cfg: benchkit.Settings) -> None:
        super().__init__(cfg)
        import machinery_app

        self.mod = machinery_app
        self.server = machinery_app.server

    def version(self) -> str:
        from importlib.metadata import version

        return version("machinery")

    def describe(self, setup: str) -> str:
        return f"`machinery worker --processes 2 --concurrency {self.cfg.concurrency}`"

    def worker_argv(self, setup: str) -> list[list[str]]:
        return [[
            benchkit.bin_path("machinery"), "worker", "--app", "machinery_app:server",
            "--processes", "2", "--concurrency", str(self.cfg.concurrency),
        ]]

    def enqueue(self, n: int, bulk: bool) -> str:
        from machinery import Signature

        if bulk:
            send_tasks = getattr(self.server, "send_tasks", None)
            if send_tasks is None:
                raise benchkit.NotSupported("Server.send_tasks does not exist yet")
            send_tasks([Signature("noop") for _ in range(n)])
            return "send_tasks([...])"
        for _ in range(n):
            self.server.send_task(Signature("noop"))
        return "send_task() per task"

    def roundtrip(self, timeout: float) -> None:
        from machinery import Signature

        assert self.server.send_task(Signature("ping")).get(timeout=timeout) == 1

    def chord(self, n: int, timeout: float) -> None:
        from machinery import Chord, Group, Signature

        header = Group(*(Signature("add_one", args=[i]) for i in range(n)))
        result = self.server.send_chord(Chord(header, Signature("collect")), send_concurrency=0)
        assert result.get(timeout=timeout) == n

    def chain(self, n: int, timeout: float) -> None:
        from machinery import Chain, Signature

        links = [Signature("add_one", args=[0]), *(Signature("add_one") for _ in range(n - 1))]
        assert self.server.send_chain(Chain(*links)).get(timeout=timeout) == n

    def close(self) -> None:
        close = getattr(self.server, "close", None)
        if callable(close):
            close()


if __name__ == "__main__":
    benchkit.main(MachinerySystem)
