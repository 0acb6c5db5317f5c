"""The Huey instance and tasks the benchmark runs: RedisHuey, or SqliteHuey for the embedded workload."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchkit import mark, settings
from huey import Huey, RedisHuey, SqliteHuey

cfg = settings()
huey: Huey
if cfg.transport == "sqlite":
    huey = SqliteHuey(cfg.queue, filename=str(Path(cfg.work_dir) / "huey.db"), results=cfg.results)
else:
    # notify_result: result waits use BLPOP instead of polling (Huey 3).
    huey = RedisHuey(cfg.queue, url=cfg.broker_url, results=cfg.results, notify_result=True)


@huey.task()
def noop() -> None:
    mark()


@huey.task()
def ping() -> int:
    return 1


@huey.task()
def add_one(x: int) -> int:
    return x + 1


@huey.task()
def collect(values: list[Any]) -> int:
    return len(values)
