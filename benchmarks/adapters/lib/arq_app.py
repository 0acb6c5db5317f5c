"""The arq worker settings and job coroutines the benchmark runs."""

from __future__ import annotations

import logging
from typing import Any

from arq.connections import RedisSettings
from benchkit import mark, settings

cfg = settings()
# arq's CLI logs two INFO lines per job; the other systems run with per-task logging off. A filter,
# because the CLI's dictConfig() resets the level of arq's child loggers after importing this module.
logging.getLogger("arq.worker").addFilter(lambda record: record.levelno >= logging.WARNING)


async def noop(ctx: dict[str, Any]) -> None:
    mark()


async def ping(ctx: dict[str, Any]) -> int:
    return 1


class WorkerSettings:
    functions = [noop, ping]
    redis_settings = RedisSettings.from_dsn(cfg.broker_url)
    queue_name = cfg.queue
    keep_result = 600 if cfg.results else 0  # 0: arq stores no result
    max_tries = 1
